"""``python -m revjax compare``: every gradient method on one network, side by side.

For a model (``mlp``: additive GELU-MLP couplings; ``revnet``: the RevNet CNN; ``transformer``:
the reversible transformer) at a given depth and dtype, each method computes the gradient of the
same loss at the same parameters and inputs. One row per method:

* ``grad_error``: ``||g - g_ref|| / ||g_ref||`` over all parameters (joint norm), ``g_ref``
  being plain backprop of the same network in float32. ``--dtype bfloat16`` casts parameters
  and inputs to bfloat16 for every method (compute and stream), so its rows show each
  method's total error, backprop's own rounding included;
* ``temp_mib``: compiled temp memory of the gradient (XLA memory analysis, nothing executed);
* ``ms``: median wall time of the jitted gradient (``--repeats`` runs after warm-up). On CPU
  this is indicative only: revjax's timing claims are measured on GPUs (``benchmarks/``).

Methods: ``backprop``, ``checkpoint`` (``jax.checkpoint`` per layer), ``reversible``
(``reversible_scan``), ``anchored`` (``reversible_scan`` storing the stream every ``k`` layers,
``k`` the largest divisor of L not above sqrt(L); ``mlp`` and ``transformer``; not run where
``k`` would be 1, L prime or below 4), and

* for ``mlp``, Moonwalk's ``moonwalk`` (pure forward) and ``mixed_moonwalk``, exact forward
  mode ``forward`` (one JVP per parameter, so only run up to ``FORWARD_MAX_PARAMS``
  parameters) and the ``projected_forward`` gradient (``PROJECTED_TANGENTS`` Gaussian
  tangents; unbiased but noisy: its relative error is about ``sqrt(P / tangents)`` for P
  parameters, shown to make that cost visible);
* for ``revnet``, ``across_stages`` (one reconstruction through the whole trunk).

A method that does not apply gets a row with ``None`` numbers and a ``note`` saying why
(other rows have an empty note); asking for it by name raises with that reason. Moonwalk and
the forward-mode methods are not offered for ``revnet`` and ``transformer``: their heads
(pooling and a linear classifier, or layer norm and an unembedding) are outside the
invertible stack, and ``revjax.moonwalk`` differentiates only the layers it is given.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import jax.numpy as jnp

from revjax._validate import positive_int
from revjax.bench import environment
from revjax.diagnostics import format_table, relative_error
from revjax.memory import compiled_memory
from revjax.precision import LowPrecisionStreamWarning, _cast_floats
from revjax.timing import median_ms

PyTree = Any
COLUMNS = [
    ("method", "method", "s"),
    ("grad_error", "grad error vs f32 backprop", ".1e"),
    ("temp_mib", "grad temp MiB", ".3f"),
    ("ms", "ms", ".2f"),
]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FORWARD_MAX_PARAMS = 20_000
PROJECTED_TANGENTS = 16
Problem = tuple[dict[str, Callable], PyTree, dict[str, str]]
FORWARD_METHODS = ("moonwalk", "mixed_moonwalk", "forward", "projected_forward")


def _not_offered(model: str, head: str) -> dict[str, str]:
    reason = (
        f"not offered for {model}: its head ({head}) is outside the invertible stack, and "
        "revjax.moonwalk differentiates only the layers it is given (see --model mlp)"
    )
    return dict.fromkeys(FORWARD_METHODS, reason)


def anchor_interval_for(depth: int) -> int:
    """Largest divisor of ``depth`` not above ``sqrt(depth)`` (at least 1)."""
    return max(k for k in range(1, math.isqrt(depth) + 1) if depth % k == 0)


def _anchors_unavailable(depth: int) -> dict[str, str]:
    """``{"anchored": reason}`` where the anchor interval is 1 (``depth`` prime, or below 4):
    an anchor at every layer stores each layer's input, which ``checkpoint`` already shows."""
    if anchor_interval_for(depth) > 1:
        return {}
    return {
        "anchored": f"not run: L = {depth} has no divisor between 2 and sqrt(L), so anchors "
        "would be every layer, storing each layer's input as checkpoint does"
    }


def mlp_problem(
    depth: int, dtype: Any, width: int = 32, hidden: int = 128, batch: int = 64
) -> Problem:
    """Gradient functions ``name -> params -> grads`` for additive MLP couplings, the params,
    and ``name -> reason`` for methods that do not apply at this size."""
    from revjax import moonwalk as mw
    from revjax.models.mlp import init_mlp_stack, mlp_coupling
    from revjax.scan import plain_scan, reversible_scan

    block = mlp_coupling()
    params = _cast_floats(init_mlp_stack(jax.random.key(0), depth, width, hidden), dtype)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = _cast_floats(
        (jax.random.normal(k1, (batch, width)), jax.random.normal(k2, (batch, width))), dtype
    )
    per_example = lambda y: jnp.sum(jnp.tanh(y[0]) * y[1], axis=-1).astype(jnp.float32)
    mean = lambda y: jnp.mean(per_example(y))
    k = anchor_interval_for(depth)
    scans = {
        "backprop": lambda p, x: plain_scan(block, p, x),
        "checkpoint": lambda p, x: plain_scan(block, p, x, remat=True),
        "reversible": lambda p, x: reversible_scan(block, p, x),
    }
    if k > 1:
        scans[f"anchored (k={k})"] = lambda p, x: reversible_scan(block, p, x, checkpoint_every=k)
    methods = {
        name: jax.grad(lambda p, scan=scan: mean(scan(p, x))) for name, scan in scans.items()
    }
    net = mw.stack(mw.from_coupling(block))
    for name in ("moonwalk", "mixed_moonwalk"):
        fn = mw.value_and_grad(net, per_example, method=name)
        methods[name] = lambda p, fn=fn: fn(p, x)[1]
    unavailable = _anchors_unavailable(depth)
    size = sum(leaf.size for leaf in jax.tree.leaves(params))
    if size <= FORWARD_MAX_PARAMS:
        forward = mw.value_and_grad(net, per_example, method="forward")
        methods["forward"] = lambda p: forward(p, x)[1]
    else:
        unavailable["forward"] = (
            f"not run: {size} parameters would need {size} JVPs "
            f"(limit {FORWARD_MAX_PARAMS}; try --depth 1)"
        )
    projected = mw.value_and_grad(
        net, per_example, method="projected_forward", num_tangents=PROJECTED_TANGENTS
    )
    key = jax.random.key(2)
    methods[f"projected_forward ({PROJECTED_TANGENTS} tangents)"] = lambda p: projected(
        p, x, key=key
    )[1]
    return methods, params, unavailable


def revnet_problem(depth: int, dtype: Any, batch: int = 32) -> Problem:
    """RevNet CNN on 8x8x1 inputs, 2 stages of ``depth`` couplings."""
    from revjax.models.revnet import init_revnet, revnet_logits

    params = _cast_floats(init_revnet(jax.random.key(0), blocks=depth, hidden=16), dtype)
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 1)).astype(dtype)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss(options):
        def fn(p):
            logits = revnet_logits(p, x, **options).astype(jnp.float32)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])

        return jax.grad(fn)

    variants = {
        "backprop": {"reversible": False},
        "checkpoint": {"reversible": False, "checkpoint": True},
        "reversible": {},
        "across_stages": {"across_stages": True},
    }
    methods = {name: loss(options) for name, options in variants.items()}
    return methods, params, _not_offered("revnet", "pooling and a linear classifier")


def transformer_problem(depth: int, dtype: Any, batch: int = 8, length: int = 64) -> Problem:
    """Reversible byte-level transformer, width 64, 4 heads."""
    from flax import nnx

    from revjax.models.transformer import ReversibleTransformer, next_token_loss

    model = ReversibleTransformer(256, 64, depth, 4, length, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, 256)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = _cast_floats(params, dtype)
    k = anchor_interval_for(depth)
    variants = {
        "backprop": {"method": "backprop"},
        "checkpoint": {"method": "checkpoint"},
        "reversible": {"method": "reversible"},
    }
    if k > 1:
        variants[f"anchored (k={k})"] = {"method": "reversible", "checkpoint_every": k}

    def grad_for(options):
        def fn(p):
            model = nnx.merge(graphdef, p, rest)
            for name, value in options.items():
                setattr(model.stack, name, value)
            return next_token_loss(model, tokens).astype(jnp.float32)

        return jax.grad(fn)

    methods = {name: grad_for(options) for name, options in variants.items()}
    unavailable = _anchors_unavailable(depth) | _not_offered(
        "transformer", "layer norm and the unembedding"
    )
    return methods, params, unavailable


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mlp": mlp_problem,
    "revnet": revnet_problem,
    "transformer": transformer_problem,
}


def compare(
    model: str,
    depth: int,
    dtype: str = "float32",
    *,
    repeats: int = 10,
    methods: list[str] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per method: ``method`` (its label, e.g. ``"anchored (k=2)"``), ``name`` (the
    short name ``methods`` and ``--methods`` take, e.g. ``"anchored"``), ``grad_error``,
    ``temp_mib``, ``ms``, ``note`` (see the module doc; a method that does not apply has
    ``None`` numbers and a note).

    Raises:
      ValueError: unknown model, dtype or method, a method requested by name that does not
        apply at this size, or ``depth < 1``.
    """
    if model not in PROBLEMS:
        raise ValueError(f"compare: unknown model {model!r}; choose from {sorted(PROBLEMS)}")
    if dtype not in DTYPES:
        raise ValueError(f"compare: unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    depth = positive_int(depth, "depth", "compare")
    grads, params, unavailable = PROBLEMS[model](depth, DTYPES[dtype])
    names = list(grads)
    skipped = list(unavailable)
    if methods is not None:
        if isinstance(methods, str) or not methods:
            raise ValueError(f"compare: methods must be a non-empty list of names, got {methods!r}")
        available = {name.split(" ")[0]: name for name in names} | {n: n for n in names}
        for m in methods:
            if m in unavailable:
                raise ValueError(f"compare: {m} for {model} at L = {depth}: {unavailable[m]}")
        unknown = [m for m in methods if m not in available]
        if unknown:
            offered = sorted({name.split(" ")[0] for name in names})
            not_offered = (
                f" (not run here: {', '.join(unavailable)}; name one for the reason)"
                if unavailable
                else ""
            )
            raise ValueError(
                f"compare: unknown methods {unknown} for {model}; choose from "
                f"{offered}{not_offered}"
            )
        names = list(dict.fromkeys(["backprop", *(available[m] for m in methods)]))
        skipped = []
    repeats = positive_int(repeats, "repeats", "compare")
    if dtype == "float32":
        reference_grad, reference_params = grads["backprop"], params
    else:
        f32_grads, reference_params, _ = PROBLEMS[model](depth, jnp.float32)
        reference_grad = f32_grads["backprop"]
    reference = jax.jit(reference_grad)(reference_params)
    steps = names
    if progress:
        try:
            from tqdm import tqdm

            steps = tqdm(names, desc=f"compare {model} L={depth}", unit="method")
        except ImportError:  # pragma: no cover - tqdm is in the bench extra
            pass
    rows = []
    with warnings.catch_warnings():
        # --dtype bfloat16 differentiates through bfloat16 streams on purpose: the rows measure
        # what that costs, so the library's warning about it would only be noise here.
        warnings.simplefilter("ignore", LowPrecisionStreamWarning)
        for name in steps:
            fn = jax.jit(grads[name])
            g = jax.block_until_ready(fn(params))
            rows.append(
                {
                    "method": name,
                    "name": name.split(" ")[0],
                    "grad_error": float(relative_error(_cast_floats(g, jnp.float32), reference)),
                    "temp_mib": compiled_memory(fn, params).temp_mib,
                    "ms": median_ms(fn, params, repeats=repeats, warmup=1),
                    "note": "",
                }
            )
    for name in skipped:
        rows.append(
            {"method": name, "name": name.split(" ")[0], "grad_error": None, "temp_mib": None,
             "ms": None, "note": unavailable[name]}
        )  # fmt: skip
    return rows


def _cell(value: Any, fmt: str) -> str:
    """``value`` formatted, or ``-`` for a method that was not run."""
    return "-" if value is None else format(value, fmt)


def render(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a rich table when rich is installed (the bench extra), else Markdown;
    methods that were not run are listed under the table with the reason."""
    by_note: dict[str, list[str]] = {}  # one line per reason, naming every method it covers
    for row in rows:
        if row["note"]:
            by_note.setdefault(row["note"], []).append(row["method"])
    notes = "".join(f"\n{', '.join(methods)}: {note}" for note, methods in by_note.items())
    cells = [[_cell(row[key], fmt) for key, _, fmt in COLUMNS] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench extra
        text_rows = [dict(zip([key for key, _, _ in COLUMNS], c, strict=True)) for c in cells]
        plain = [(key, header, "s") for key, header, _ in COLUMNS]
        return f"{title}\n\n{format_table(text_rows, plain)}\n{notes}"
    table = Table(title=title)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header == "method" else "right")
    for c in cells:
        table.add_row(*c)
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text() + notes.lstrip("\n")


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr,
    ``error: <command>: <argparse's message> (see <prog> --help)``, exit status 2 (argparse
    prints the whole usage, then the error); ``--help`` is argparse's own."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("python -m revjax ")
        self.exit(2, f"error: {command}: {' '.join(message.split())} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m revjax compare [options]``; returns the exit status (1 when the device runs
    out of memory, 2 for a bad value that :func:`compare` refuses).

    Raises:
      SystemExit: 0 after ``--help``; 2 for an option argparse refuses (unknown option or
        choice, a value that is not an int, ``--methods`` with no names), after printing one
        line to stderr.
    """
    parser = OneLineArgumentParser(
        prog="python -m revjax compare",
        description=__doc__.splitlines()[0].replace("``", ""),
    )
    parser.add_argument(
        "--model", choices=sorted(PROBLEMS), default="mlp", help="network (default: mlp)"
    )
    parser.add_argument("--depth", type=int, default=16, help="layers / blocks L (default: 16)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32",
        help="params, inputs and compute; errors are against float32 backprop (default: float32)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed steps per method (default: 10)"
    )
    parser.add_argument(
        "--methods", nargs="+", metavar="METHOD",
        help="subset of methods, backprop always runs; default: all that apply. "
        "All models: backprop, checkpoint, reversible; mlp and transformer: anchored; mlp: "
        + ", ".join(FORWARD_METHODS) + "; revnet: across_stages",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = compare(
            args.model, args.depth, args.dtype, repeats=args.repeats, methods=args.methods,
            progress=not args.json,
        )  # fmt: skip
    except ValueError as err:
        if not str(err).startswith("compare:"):
            raise  # not a usage error: show the traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as err:
        # XLA:GPU says RESOURCE_EXHAUSTED; XLA:CPU an INTERNAL error "Out of memory allocating"
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        first_line = str(err).splitlines()[0]
        print(
            f"error: compare: {args.model} at L = {args.depth} ran out of {jax.default_backend()} "
            f"memory ({first_line}); try a smaller --depth",
            file=sys.stderr,
        )
        return 1
    if args.json:
        # Strict JSON: a diverged method's NaN/inf becomes null, not the invalid token NaN.
        finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
        rows = [{k: finite(v) for k, v in row.items()} for row in rows]
        record = {"model": args.model, "depth": args.depth, "dtype": args.dtype,
                  "backend": jax.default_backend(), "env": environment(),
                  "rows": rows}  # fmt: skip
        print(json.dumps(record, allow_nan=False))
    else:
        title = f"{args.model}, L = {args.depth}, {args.dtype}, {jax.default_backend()}"
        print(render(rows, title))
    return 0
