"""Gradient error vs depth for each precision policy, and step time against plain bf16 backprop.

The network is the numerics reference of ``tests/test_precision.py``: additive GELU-MLP
couplings with bf16 parameters and compute, both weight matrices ~ N(0, (0.5/sqrt(width))^2).
For every depth and method the gradient of ``reversible_scan`` is compared with plain backprop
(``plain_scan``) of the *same* mixed-precision network:

* ``bf16 stream``: the naive policy, stream and compute in bfloat16;
* ``f32 stream``: bf16 compute, float32 stream (revjax's default for bf16 compute);
* ``f32 stream, k=16`` / ``k=8``: the same with anchors every k layers (only at depths that
  k divides and exceeds: at L = 12 neither row is measured);
* ``exact``: fixed-point float32 stream with the finest grid whose range holds the stream
  (``fraction_bits`` chosen from the float32-stream forward pass); "overflow" when even
  ``fraction_bits = 0`` (range 2^24) cannot.

Step time (GPU only: CPU timings are not comparable, DESIGN.md section 4) is the median of 10
jitted gradient steps, reported as a ratio to plain backprop of the bf16-stream network.

On the CPU two substitutions make the run faster (about 1.4x for the whole script in `make
bench`, this check included) without changing a bit of any gradient. XLA:CPU has no native
bfloat16 dynamic-update-slice: it rewrites each layer's write into a stacked bf16 array (a
scan's per-layer parameter gradients, plain backprop's stored bf16 activations) as a
conversion of the *whole* stack, so a gradient costs O(L) per layer.
So the CPU size keeps the bf16 weights' values in float32 arrays (the branches cast them to
bf16 as before; the gradient, a bf16 cotangent converted exactly, is the same number) and
uses per-layer ``jax.checkpoint`` as the reference (the same operations, recomputed: no
stacked bf16 activations). At L = 32 the script computes every method's gradient and its
reference both ways, for the literal network (bf16 arrays, plain backprop) and the
substituted one, and stops unless all are bitwise equal; the JSON records this
``equivalence`` check.

    python benchmarks/numerics_depth.py --size cpu    # batch 32, width 256, hidden 1024
    python benchmarks/numerics_depth.py --size gpu    # batch 8192, width 1024, hidden 4096
    python benchmarks/numerics_depth.py --size gpu --depths 128 256 --append  # a split run

The JSON is rewritten after every depth. ``--append`` adds this run's depths to the earlier
run's JSON in ``--out`` (an error if there is none); ``complete`` is true when every depth that
the runs set out to measure has its rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    ResultFile,
    add_force_argument,
    add_out_argument,
    environment,
    positive,
    refuse_accelerator_size_on_cpu,
)
from revjax import reversible_scan
from revjax.coupling import Coupling
from revjax.diagnostics import bitwise_equal, format_table, relative_error
from revjax.memory import memory_of
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.precision import Policy, exact_policy
from revjax.scan import plain_scan
from revjax.timing import median_ms

DEPTHS = [8, 16, 32, 64, 128, 256]
SIZES = {
    # CPU batch 32: bfloat16 matmuls are slow on a CPU, and `make bench` must stay under 10 min;
    # "param_dtype" and "reference": the CPU's bitwise-equivalent substitutions (module doc).
    "cpu": {"batch": 32, "width": 256, "hidden": 1024, "depths": DEPTHS,
            "param_dtype": "float32", "reference": "checkpoint"},
    "gpu": {"batch": 8192, "width": 1024, "hidden": 4096, "depths": DEPTHS,
            "param_dtype": "bfloat16", "reference": "backprop"},
}  # fmt: skip
LITERAL = {"param_dtype": "bfloat16", "reference": "backprop"}  # the network as specified
EQUIVALENCE_DEPTH = 32  # the substitutions are checked here: every method runs at L = 32
BF16_STREAM = Policy(compute_dtype=jnp.bfloat16, stream_dtype=jnp.bfloat16)
F32_STREAM = Policy(compute_dtype=jnp.bfloat16)
METHODS = {
    "bf16 stream": {"policy": BF16_STREAM},
    "f32 stream": {"policy": F32_STREAM},
    "f32 stream, k=16": {"policy": F32_STREAM, "checkpoint_every": 16},
    "f32 stream, k=8": {"policy": F32_STREAM, "checkpoint_every": 8},
    "exact": None,  # policy chosen per depth, see finest_exact_policy
}


def network(
    depth: int, batch: int, width: int, hidden: int, param_dtype: str = "bfloat16", **_: Any
) -> tuple[Coupling, Any, tuple]:
    """The reference stack: ``depth`` GELU-MLP couplings (bf16 weights ~ N(0, (0.5 /
    sqrt(width))^2), held in ``param_dtype`` arrays) and a float32 input ``(x1, x2)``, each
    half ``(batch, width)``. Other keys of a size (depths, reference) are ignored."""
    params = init_mlp_stack(
        jax.random.key(0), depth, width, hidden, std=0.5 / width**0.5, dtype=jnp.bfloat16
    )
    params = jax.tree.map(lambda a: a.astype(param_dtype), params)  # same values
    x = tuple(jax.random.normal(k, (batch, width)) for k in jax.random.split(jax.random.key(1)))
    return mlp_coupling(), params, x


def loss_of(scan: Callable, block: Coupling, **options: Any) -> Callable:
    """``jit(grad(loss))`` with ``loss = 0.5 |scan(block, params, x)|^2`` (float32 sum)."""

    def loss(params, x):
        y = scan(block, params, x, **options)
        return 0.5 * sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in y)

    return jax.jit(jax.grad(loss))


def compile_grad(
    scan: Callable, block: Coupling, params: Any, x: tuple, **options: Any
) -> tuple[Any, int]:
    """The gradient, compiled ahead of time (so measuring its footprint costs no second
    compile), and its compiled footprint: arguments + outputs + temps - aliased bytes."""
    compiled = loss_of(scan, block, **options).lower(params, x).compile()
    return compiled, memory_of(compiled).footprint_bytes


def memory_budget() -> int | None:
    """90% of JAX's device memory limit (the allocator's ``bytes_limit``), leaving room for the
    reference gradients held while the reversible step runs; None where unknown (CPU)."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    return None if limit is None else int(0.9 * limit)


def reference_step(
    block: Coupling,
    params: Any,
    x: tuple,
    policy: Policy,
    budget: int | None,
    kind: str = "backprop",
) -> tuple[Any, str]:
    """Plain backprop of the network under ``policy``; where its compiled footprint exceeds
    ``budget``, or with ``kind="checkpoint"``, the same network with ``jax.checkpoint`` per
    layer, which recomputes the same operations. Returns the compiled gradient and
    ``"backprop"`` or ``"checkpoint"``."""
    if kind not in ("backprop", "checkpoint"):
        raise ValueError(f"reference_step: kind must be 'backprop' or 'checkpoint', got {kind!r}")
    if kind == "backprop":
        step, footprint = compile_grad(plain_scan, block, params, x, policy=policy)
        if budget is None or footprint <= budget:
            return step, "backprop"
        del step
    step, _ = compile_grad(plain_scan, block, params, x, policy=policy, remat=True)
    return step, "checkpoint"


@jax.jit
def agreement(grads, reference) -> tuple[jax.Array, jax.Array]:
    """Relative error of ``grads`` against ``reference``, and whether they are bitwise equal."""
    return relative_error(grads, reference), bitwise_equal(grads, reference)


def failure(err: Exception) -> str | None:
    """``"overflow"`` (exact mode's range check, an OverflowError inside jit), ``"oom"`` (the
    device ran out of memory), or None for anything else (re-raised by the caller)."""
    text = f"{type(err).__name__}: {err}"
    if "OverflowError" in text:
        return "overflow"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    return None


def stream_peak(block, params, x) -> float:
    """Largest |value| of the float32-stream network's stream over its input and every layer's
    output (both halves): the range exact mode's grid must hold. A stream can peak mid-stack,
    so the output alone is not enough."""

    def layer(carry, p):
        x_, peak = carry
        one_layer = jax.tree.map(lambda a: a[None], p)
        y = plain_scan(block, one_layer, x_, policy=F32_STREAM)
        return (y, jnp.maximum(peak, max_abs(y))), None

    max_abs = lambda t: functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v)) for v in t])
    start = tuple(jnp.asarray(v, jnp.float32) for v in x)
    (_, peak), _ = jax.jit(lambda p: lax.scan(layer, (start, max_abs(start)), p))(params)
    return float(peak)


def finest_exact_policy(peak: float) -> Policy | None:
    """Exact mode with the most fraction bits whose range 2^(24 - F) exceeds twice ``peak``, the
    largest stream value of the float32-stream network (None if no F >= 0 does)."""
    if not math.isfinite(peak):
        return None
    bits = 24 - math.ceil(math.log2(2 * max(peak, 2.0**-24)))
    return exact_policy(min(bits, 23), compute_dtype=jnp.bfloat16) if bits >= 0 else None


def measure(depth: int, size: dict, timed: bool, budget: int | None = None) -> list[dict]:
    """One row per method at ``depth``; every row records the float32 stream's peak |x| and
    which reference it was compared with. Methods run grouped by policy and only one policy's
    reference gradients are alive at a time, so the GPU size fits in device memory."""
    block, params, x = network(depth, **size)
    reference_kind = size.get("reference", "backprop")
    rows, reference, base_ms = [], None, None
    peak = stream_peak(block, params, x)
    for name, options in METHODS.items():
        base = {"depth": depth, "method": name, "stream_peak": peak}
        if options is None:
            policy = finest_exact_policy(peak)
            if policy is None:
                rows.append({**base, "overflow": True})
                continue
            options = {"policy": policy}
        every = options.get("checkpoint_every")
        if every is not None and (every >= depth or depth % every):
            # k >= L stores no anchor (the plain f32 stream); anchors need k to divide L.
            continue
        policy = options["policy"]
        try:
            if reference is None or reference[0] != policy:
                reference = None  # free the previous policy's gradients first
                ref_step, kind = reference_step(block, params, x, policy, budget, reference_kind)
                reference = (policy, jax.block_until_ready(ref_step(params, x)), kind)
                if timed and policy == BF16_STREAM and kind == "backprop":
                    base_ms = median_ms(ref_step, params, x)  # plain bf16 backprop
            step, _ = compile_grad(reversible_scan, block, params, x, **options)
            grads = jax.block_until_ready(step(params, x))
        except Exception as err:
            kind_of_failure = failure(err)
            if kind_of_failure is None:
                raise
            oom = kind_of_failure == "oom"
            rows.append({**base, "overflow": not oom, **({"oom": True} if oom else {})})
            print(rows[-1], flush=True)
            continue
        error, bitwise = agreement(grads, reference[1])
        del grads
        ms = median_ms(step, params, x) if timed else None
        rows.append(
            {
                **base,
                "fraction_bits": policy.fraction_bits,
                "reference": reference[2],
                "grad_rel_err": float(error),
                "bitwise_equal": bool(bitwise),
                "step_ms": ms,
                "time_vs_bf16_backprop": None if ms is None or base_ms is None else ms / base_ms,
                "overflow": False,
            }
        )
        print(rows[-1], flush=True)
    return rows


def method_options(peak: float) -> dict[str, dict | None]:
    """Each method's ``reversible_scan`` options, exact mode's policy chosen for ``peak`` (None
    where its range cannot hold the stream)."""
    exact = finest_exact_policy(peak)
    return {
        name: options if options is not None else (exact and {"policy": exact})
        for name, options in METHODS.items()
    }


def equivalence(depth: int, size: dict) -> dict[str, bool]:
    """Whether ``size``'s substitutions (its ``param_dtype`` and ``reference``, see the module
    doc) change nothing: for every method at ``depth``, its gradient and its reference's are
    bitwise equal, after an exact cast to float32, to those of the literal network (bf16
    arrays, plain backprop). Returns ``{method: equal}`` (methods that do not run at ``depth``,
    an anchor interval >= depth or exact mode's overflow, are left out)."""
    size = {**LITERAL, **size}  # a size may make only one of the substitutions
    literal = network(depth, **{**size, **LITERAL})
    substituted = network(depth, **size)
    as_f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    references: dict[Policy, bool] = {}
    equal = {}
    for name, options in method_options(stream_peak(*literal)).items():
        if options is None or options.get("checkpoint_every", 0) >= depth:
            continue
        policy = options["policy"]
        grads = [
            as_f32(loss_of(reversible_scan, block, **options)(params, x))
            for block, params, x in (literal, substituted)
        ]
        if policy not in references:
            refs = [
                as_f32(reference_step(block, params, x, policy, None, kind)[0](params, x))
                for (block, params, x), kind in (
                    (literal, LITERAL["reference"]),
                    (substituted, size["reference"]),
                )
            ]
            references[policy] = bool(bitwise_equal(*refs))
        equal[name] = bool(bitwise_equal(*grads)) and references[policy]
    return equal


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in METHODS:
        pts = [
            (r["depth"], max(r["grad_rel_err"], 1e-9))
            for r in rows
            if r["method"] == name and "grad_rel_err" in r and math.isfinite(r["grad_rel_err"])
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("param gradient rel. error vs backprop")
    ax.set_title(title, fontsize=9)
    ax.text(
        0.01,
        0.01,
        "an error of 0 (bitwise equal to the reference) is plotted at 1e-9; "
        "missing points: overflow or NaN",
        transform=ax.transAxes,
        fontsize=7,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="cpu",
        help="cpu: batch 32, float32 arrays of the bf16 weights; gpu: batch 8192 (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--depths", type=positive(int), nargs="+", default=None, metavar="L",
        help=f"depths to measure, each >= 1 (default: {' '.join(map(str, DEPTHS))})",
    )  # fmt: skip
    add_out_argument(parser)
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the other depths' rows of the JSON already in --out (same size and device)",
    )
    add_force_argument(parser)
    args = parser.parse_args(argv)
    refuse_accelerator_size_on_cpu(parser, args.size, jax.default_backend(), args.force)
    size = dict(SIZES[args.size])
    if args.depths:
        size["depths"] = sorted(set(args.depths))  # each depth measured once
    timed = jax.default_backend() != "cpu"
    budget = memory_budget()
    env = environment()
    name = f"numerics_depth_{args.size}_{env['backend']}"
    earlier = None
    if args.append:
        earlier_path = Path(args.out or RESULTS) / f"{name}.json"
        if not earlier_path.exists():  # else this run would pass for the whole measurement
            raise SystemExit(
                f"numerics_depth: --append needs the earlier run's {earlier_path}, which does "
                f"not exist (run without --append first, with the same --size and --out)"
            )
        earlier = earlier_run(earlier_path, size, env)
    payload = {
        "benchmark": "numerics_depth",
        "env": env,
        "size": size,
        "memory_budget_bytes": budget,
        "network": "additive GELU-MLP couplings, bf16 params and compute, "
        "weights ~ N(0, (0.5/sqrt(width))^2)",
        "rows": [],
    }
    if earlier is not None:  # a depth's earlier rows stay until this run has measured it anew
        payload["rows"] = list(earlier["rows"])
        # The depths both runs set out to measure, measured or not: the earlier run may have
        # stopped before its last depths, and those stay missing until a run measures them.
        wanted = {*earlier["size"]["depths"], *size["depths"]}
        payload["size"] = size | {"depths": sorted(wanted)}
        payload["appended_to"] = earlier["env"]["date"]
    result = ResultFile(f"{name}.json", payload, args.out)
    substitutions = {k: size[k] for k, v in LITERAL.items() if size.get(k, v) != v}
    if substitutions:
        check = equivalence(EQUIVALENCE_DEPTH, size)
        payload["equivalence"] = {"depth": EQUIVALENCE_DEPTH, "bitwise_equal": check}
        if not all(check.values()):
            raise SystemExit(
                f"numerics_depth: with {substitutions} the gradients at L = {EQUIVALENCE_DEPTH} "
                f"differ from the literal network's ({check}); run a size without these "
                f"substitutions"
            )
    for depth in size["depths"]:  # written after every depth: a crash keeps what was measured
        rows = measure(depth, size, timed, budget)
        others = [r for r in payload["rows"] if r["depth"] != depth]  # replaced, not doubled
        payload["rows"] = sorted(others + rows, key=lambda r: r["depth"])
        result.save()
    path = result.finish(complete=is_complete(payload))
    rows = payload["rows"]
    plot(
        rows,
        path.with_suffix(".png"),
        f"{'' if payload['complete'] else 'PARTIAL RUN, '}{env['device']}, {env['date']}, "
        f"batch {size['batch']}, width {size['width']}, hidden {size['hidden']}",
    )
    print(table(rows))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def is_complete(payload: dict) -> bool:
    """Whether every depth in ``payload["size"]["depths"]`` (all that this run and the runs it
    was appended to set out to measure) has its rows: ``measure`` returns a depth's rows all at
    once, so a depth with any row is done."""
    return set(payload["size"]["depths"]) <= {r["depth"] for r in payload["rows"]}


def earlier_run(path: Path, size: dict, env: dict) -> dict:
    """The run recorded at ``path``, checked to be the same measurement as this one (sizes other
    than the depths, and the device), so that appending to it mixes nothing."""
    try:
        earlier = json.loads(path.read_text())
        # Everything the merge reads; a field missing here would surface as a traceback after
        # the measuring.
        earlier["size"]["depths"], earlier["size"].items(), earlier["env"]["device"]
        earlier["env"]["date"]
        for row in earlier["rows"]:
            row["depth"], row["overflow"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(
            f"numerics_depth: --append to {path}, which is not a numerics_depth result "
            f"({type(err).__name__}: {err}); run without --append to measure afresh"
        ) from None
    same_size = {k: v for k, v in earlier["size"].items() if k != "depths"} == {
        k: v for k, v in size.items() if k != "depths"
    }
    if not same_size or earlier["env"]["device"] != env["device"]:
        raise SystemExit(
            f"numerics_depth: --append to {path}, measured with {earlier['size']} on "
            f"{earlier['env']['device']}, but this run is {size} on {env['device']}"
        )
    return earlier


def _outcome(row: dict) -> str:
    """The error as text, or why there is none (exact mode's range, device memory)."""
    if row["overflow"]:
        return "overflow"
    if row.get("oom"):
        return "out of memory"
    return f"{row['grad_rel_err']:.1e}"


def table(rows: list[dict]) -> str:
    shown = [{**r, "grad_rel_err": _outcome(r)} for r in rows]
    return format_table(
        shown,
        [
            ("depth", "L", "d"),
            ("method", "method", ""),
            ("fraction_bits", "fraction bits", ""),
            ("grad_rel_err", "grad rel. error", ""),
            ("bitwise_equal", "bitwise", ""),
            ("time_vs_bf16_backprop", "time / bf16 backprop", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()
