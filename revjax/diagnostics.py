"""Numerical diagnostics: how far a reconstructed quantity is from the one it stands for."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from revjax.coupling import Coupling, call_with_key, with_aux
from revjax.precision import Policy
from revjax.scan import (
    anchor_interval,
    layer_key,
    plain_scan,
    prepare_stack,
    restart_at_anchor,
    reversible_scan,
)

PyTree = Any


def _float32_leaves(tree: PyTree, fn: str) -> list[jax.Array]:
    """The leaves of ``tree`` as float32 arrays; complex leaves are refused (their imaginary part
    would be dropped silently)."""
    leaves = jax.tree.leaves(tree)
    for leaf in leaves:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(f"{fn}: complex leaves are not supported (got {jnp.result_type(leaf)})")
    return [jnp.asarray(leaf, jnp.float32) for leaf in leaves]


def _power_of_two_scale(leaves: list[jax.Array]) -> jax.Array:
    """The int32 exponent ``e`` of the largest power of two ``2^e <= max |leaf|``, clipped to
    [-126, 126] so that ``2^e`` and ``2^-e`` are normal float32 numbers (XLA on CPU flushes a
    subnormal reciprocal to zero). Dividing by ``2^e`` is exact and leaves every entry below 4
    in magnitude."""
    peak = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(v), initial=0.0) for v in leaves], jnp.float32(0.0)
    )
    _, exponent = jnp.frexp(peak)
    return jnp.clip(exponent - 1, -126, 126)


def _scaled_norm(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(n, e)`` with ``||leaves|| = n * 2^e``: the Euclidean norm of all leaves jointly, taken
    after an exact power-of-two rescaling so that neither overflow (|v| > 1e19) nor underflow
    (|v| < 1e-19) of the squares distorts it."""
    exponent = _power_of_two_scale(leaves)
    scale = jnp.ldexp(jnp.float32(1.0), exponent)
    total = sum((jnp.sum(jnp.square(v / scale)) for v in leaves), jnp.float32(0.0))
    return jnp.sqrt(total), exponent


def _relative_norm(approx: list[jax.Array], reference: list[jax.Array]) -> jax.Array:
    """``||approx - reference|| / ||reference||`` of float32 leaf lists, robust to the extremes:
    inf when only the reference is zero, 0 when both are, NaN when any entry is NaN or inf."""
    # Both operands are divided by one common power of two 2^c first (exact), so that their
    # difference cannot overflow; then ||diff|| = d * 2^(d_exp + c), ||reference|| = r * 2^r_exp.
    common_exp = _power_of_two_scale([*approx, *reference])
    common = jnp.ldexp(jnp.float32(1.0), common_exp)
    diff = [a / common - r / common for a, r in zip(approx, reference, strict=True)]
    diff_norm, diff_exp = _scaled_norm(diff)
    ref_norm, ref_exp = _scaled_norm(reference)
    ratio = diff_norm / jnp.where(ref_norm > 0, ref_norm, 1.0)
    # ldexp applies the exponent difference once: inf only if the true ratio exceeds float32.
    error = jnp.ldexp(ratio, diff_exp + common_exp - ref_exp)
    error = jnp.where(ref_norm > 0, error, jnp.where(diff_norm > 0, jnp.inf, 0.0))
    finite = functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(v)) for v in [*approx, *reference]], jnp.bool_(True)
    )
    return jnp.where(finite, error, jnp.nan)


def relative_error(approx: PyTree, reference: PyTree) -> jax.Array:
    """``||approx - reference|| / ||reference||`` over all leaves jointly, in float32.

    The norm is the Euclidean norm of every leaf flattened and concatenated; both pytrees must
    have the same structure and shapes (real dtypes: complex leaves raise ``TypeError``). Every
    norm is taken after an exact power-of-two rescaling, so huge values (|g| > 1e19, whose
    squares overflow float32) and tiny ones (whose squares underflow) still give the right
    answer. Returns ``inf`` when the reference is zero and the approximation is not, 0 when both
    are zero (also for pytrees without leaves), and NaN when either holds a NaN or inf (never a
    misleading 0).
    """
    if jax.tree.structure(approx) != jax.tree.structure(reference):
        raise ValueError(
            "relative_error: pytrees differ in structure: "
            f"{jax.tree.structure(approx)} vs {jax.tree.structure(reference)}"
        )
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(approx)]
    leaves = zip(paths, jax.tree.leaves(approx), jax.tree.leaves(reference), strict=True)
    for path, x, y in leaves:
        if jnp.shape(x) != jnp.shape(y):  # broadcasting would give a meaningless number
            raise ValueError(
                f"relative_error: leaf {path or '(root)'} has shape {jnp.shape(x)} in approx "
                f"but {jnp.shape(y)} in reference"
            )
    return _relative_norm(
        _float32_leaves(approx, "relative_error"), _float32_leaves(reference, "relative_error")
    )


def bitwise_equal(a: PyTree, b: PyTree) -> jax.Array:
    """Whether two pytrees have the same structure, shapes, dtypes and bit patterns (a boolean
    scalar; usable under ``jit``).

    Stricter than ``array_equal``: ``+0.0`` and ``-0.0`` differ, and a NaN equals a NaN with the
    same payload. This is the check behind every "bitwise" claim of revjax.
    """
    if jax.tree.structure(a) != jax.tree.structure(b):
        return jnp.bool_(False)
    same = [jnp.bool_(True)]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = jnp.asarray(x), jnp.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return jnp.bool_(False)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):  # compare both parts' bits
            x, y = jnp.stack([x.real, x.imag]), jnp.stack([y.real, y.imag])
        if jnp.issubdtype(x.dtype, jnp.floating):
            bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
            x, y = lax.bitcast_convert_type(x, bits), lax.bitcast_convert_type(y, bits)
        same.append(jnp.array_equal(x, y))
    return functools.reduce(jnp.logical_and, same)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, header, format spec)`` triples.

    Missing or None values print as ``-``.
    """
    cell = lambda r, k, f: "-" if r.get(k) is None else format(r[k], f)
    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows),
    ]
    return "\n".join(lines)


def reconstruction_report(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    *,
    key: Any | None = None,
    checkpoint_every: int | None = None,
    policy: Policy | None = None,
) -> dict[str, jax.Array]:
    """Per-layer reconstruction quality of a reversible stack, as the backward pass sees it.

    Runs the stack forward storing every layer's exact input ``x_l`` (this diagnostic pays the
    memory that :func:`revjax.reversible_scan` avoids), then reconstructs from the output with
    ``block.inverse`` layer by layer, restarting from the exact stream at anchors when
    ``checkpoint_every`` is given, exactly as the backward pass does. For layer ``l``:

        relative_error[l] = ||x_rec_l - x_l|| / ||x_l||
        snr[l]            = ||x_l||^2 / ||x_rec_l - x_l||^2      (inf when exact)
        snr_db[l]         = 10 log10(snr[l])

    the signal-to-noise ratio of Hascoet et al. ("Reversible designs for extreme memory cost
    reduction of CNN training"), ``snr = 1 / relative_error^2``. The errors are computed as in
    :func:`relative_error` (no overflow for huge streams): a NaN or inf anywhere in a layer's
    exact or reconstructed stream gives NaN there (never a perfect-looking inf SNR), a zero
    input reconstructed as nonzero gives error inf and SNR 0 (-inf dB). Norms are over all
    stream leaves jointly, in float32; the
    stream and the block compute in the policy's dtypes (or whatever dtypes the caller gives
    them), so a bfloat16 stream shows its drift here. ``steps[l]`` counts the inverse steps behind
    ``x_rec_l`` since the last exact restart: ``L - l`` from the output without anchors; with
    ``checkpoint_every=k``, the distance to the next anchor above (e.g. ``[3, 2, 1, 3, 2, 1]``
    for ``L = 6, k = 3``).

    Returns:
      A dict of ``(L,)`` arrays: ``layer``, ``steps``, ``relative_error``, ``snr``, ``snr_db``.
    """
    block, x, depth, _ = prepare_stack(block, params, x, key, policy, "reconstruction_report")
    every = anchor_interval(depth, checkpoint_every, "reconstruction_report")
    layers = jnp.arange(depth)

    def forward(x_, inputs):
        p, layer = inputs
        k = layer_key(key, layer)
        side = None if block.aux is None else call_with_key(block.aux, p, x_, key=k)
        return call_with_key(block.forward, p, x_, key=k), (x_, side)

    y, (inputs_exact, aux) = lax.scan(forward, x, (params, layers))
    outputs_exact = jax.tree.map(
        lambda xs, last: jnp.concatenate([xs[1:], last[None]]), inputs_exact, y
    )

    def backward(y_, inputs):
        p, layer, exact_output, side = inputs
        y_ = restart_at_anchor(y_, exact_output, layer, every)
        inverse = with_aux(block.inverse, block, side)
        x_rec = call_with_key(inverse, p, y_, key=layer_key(key, layer))
        return x_rec, x_rec

    _, inputs_rec = lax.scan(backward, y, (params, layers, outputs_exact, aux), reverse=True)
    error = jax.vmap(
        lambda rec, exact: _relative_norm(
            _float32_leaves(rec, "reconstruction_report"),
            _float32_leaves(exact, "reconstruction_report"),
        )
    )(inputs_rec, inputs_exact)
    # snr = 1 / error^2 (inf when exact, 0 for a zero input reconstructed as nonzero, NaN when
    # the reconstruction is NaN or inf); snr_db from the error directly, so it cannot underflow.
    return {
        "layer": layers,
        "steps": every - layers % every,
        "relative_error": error,
        "snr": 1.0 / jnp.square(error),
        "snr_db": -20.0 * jnp.log10(error),
    }


def _half_sum_of_squares(y: PyTree) -> jax.Array:
    return 0.5 * sum(jnp.sum(jnp.square(jnp.asarray(v, jnp.float32))) for v in jax.tree.leaves(y))


def compare_gradients(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    methods: Mapping[str, Mapping[str, Any]],
    *,
    loss: Callable[[PyTree], jax.Array] | None = None,
    key: Any | None = None,
) -> list[dict[str, Any]]:
    """How far each reversible configuration's gradient is from plain backprop of its network.

    For every ``name -> options`` in ``methods`` (options are keyword arguments of
    :func:`revjax.reversible_scan`: ``policy``, ``checkpoint_every``), differentiates
    ``loss(reversible_scan(block, params, x, **options))`` and, as the reference, the same loss
    through :func:`revjax.scan.plain_scan` with the same policy: plain backprop of the *same*
    network, so the error is the reconstruction's alone, never hidden by a dtype difference.

    Args:
      loss: ``loss(y) -> scalar``; default ``0.5 * sum(y^2)`` over all leaves, in float32.

    Returns:
      One dict per method: ``method``, ``policy`` (its repr, or None), ``checkpoint_every``,
      ``param_grad_error`` and ``input_grad_error`` (relative norms, floats), and ``exact``
      (whether every gradient leaf is bitwise equal to the reference). Render with
      ``format_table(rows, COMPARISON_COLUMNS)``.
    """
    loss = _half_sum_of_squares if loss is None else loss
    references: dict[Policy | None, tuple[PyTree, PyTree]] = {}

    def gradient(scan, **options):
        objective = lambda p, x_: loss(scan(block, p, x_, key=key, **options))
        return jax.jit(jax.grad(objective, argnums=(0, 1)))(params, x)

    if not isinstance(methods, Mapping) or not all(
        isinstance(o, Mapping) for o in methods.values()
    ):
        raise TypeError(
            "compare_gradients: methods maps a name to reversible_scan options, e.g. "
            "{'float32 stream': {}, 'anchors 8': {'checkpoint_every': 8}}; got "
            f"{type(methods).__name__} {methods!r}"[:400]
        )
    rows = []
    for name, options in methods.items():
        unknown = set(options) - {"policy", "checkpoint_every"}
        if unknown:
            raise ValueError(
                f"compare_gradients: method {name!r} has unknown options {sorted(unknown)}; "
                "allowed: policy, checkpoint_every"
            )
        policy = options.get("policy")
        if policy not in references:
            references[policy] = gradient(plain_scan, policy=policy)
        grads = gradient(reversible_scan, **options)
        reference = references[policy]
        rows.append(
            {
                "method": name,
                "policy": None if policy is None else repr(policy),
                "checkpoint_every": options.get("checkpoint_every"),
                "param_grad_error": float(relative_error(grads[0], reference[0])),
                "input_grad_error": float(relative_error(grads[1], reference[1])),
                "exact": bool(bitwise_equal(grads, reference)),
            }
        )
    return rows


COMPARISON_COLUMNS = [
    ("method", "method", ""),
    ("checkpoint_every", "anchors every", ""),
    ("param_grad_error", "param grad rel. error", ".2e"),
    ("input_grad_error", "input grad rel. error", ".2e"),
    ("exact", "bitwise equal", ""),
]


__all__ = [
    "COMPARISON_COLUMNS",
    "bitwise_equal",
    "compare_gradients",
    "format_table",
    "reconstruction_report",
    "relative_error",
]
