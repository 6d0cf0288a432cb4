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


def relative_error(approx: PyTree, reference: PyTree) -> jax.Array:
    """``||approx - reference|| / ||reference||`` over all leaves jointly, in float32.

    The norm is the Euclidean norm of every leaf flattened and concatenated; both pytrees must
    have the same structure and shapes. Both are divided by the largest magnitude in
    ``reference`` before squaring, so huge gradients (|g| > 1e19, whose squares overflow
    float32) still give a finite answer. Returns ``inf`` when the reference is zero and the
    approximation is not, 0 when both are zero, and NaN when either holds a NaN or inf (never a
    misleading 0).
    """
    a, r = jax.tree.leaves(approx), jax.tree.leaves(reference)
    if jax.tree.structure(approx) != jax.tree.structure(reference):
        raise ValueError(
            "relative_error: pytrees differ in structure: "
            f"{jax.tree.structure(approx)} vs {jax.tree.structure(reference)}"
        )
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(approx)]
    for path, x, y in zip(paths, a, r, strict=True):
        if jnp.shape(x) != jnp.shape(y):  # broadcasting would give a meaningless number
            raise ValueError(
                f"relative_error: leaf {path or '(root)'} has shape {jnp.shape(x)} in approx "
                f"but {jnp.shape(y)} in reference"
            )
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    scale = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(f32(y)), initial=0.0) for y in r])
    scale = jnp.where(scale > 0, scale, 1.0)
    diff = sum(jnp.sum(jnp.square((f32(x) - f32(y)) / scale)) for x, y in zip(a, r, strict=True))
    norm = sum(jnp.sum(jnp.square(f32(y) / scale)) for y in r)
    finite = functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(f32(v))) for v in [*a, *r]], jnp.bool_(True)
    )
    error = jnp.where(
        norm > 0, jnp.sqrt(diff / jnp.where(norm > 0, norm, 1.0)), jnp.where(diff > 0, jnp.inf, 0.0)
    )
    return jnp.where(finite, error, jnp.nan)


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


def _signal_and_noise(exact: PyTree, approx: PyTree) -> tuple[jax.Array, jax.Array]:
    """``(||exact||^2, ||approx - exact||^2)`` over all leaves, with the difference taken in
    float32 (a bfloat16 difference would itself round)."""
    f32 = lambda t: [jnp.asarray(v, jnp.float32) for v in jax.tree.leaves(t)]
    exact, approx = f32(exact), f32(approx)
    signal = sum(jnp.sum(jnp.square(e)) for e in exact)
    noise = sum(jnp.sum(jnp.square(a - e)) for a, e in zip(approx, exact, strict=True))
    return signal, noise


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
    reduction of CNN training"). Norms are over all stream leaves jointly, in float32; the
    stream and the block compute in the policy's dtypes (or whatever dtypes the caller gives
    them), so a bfloat16 stream shows its drift here. ``steps[l] = L - l`` counts the inverse
    steps behind ``x_rec_l`` since the last exact restart (the output, or an anchor).

    Returns:
      A dict of ``(L,)`` arrays: ``layer``, ``steps``, ``relative_error``, ``snr``, ``snr_db``.
    """
    block, x, depth, _ = prepare_stack(block, params, x, key, policy, "reconstruction_report")
    every = anchor_interval(depth, checkpoint_every)
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
    signal, noise = jax.vmap(_signal_and_noise)(inputs_exact, inputs_rec)
    snr = jnp.where(noise > 0, signal / jnp.where(noise > 0, noise, 1.0), jnp.inf)
    return {
        "layer": layers,
        "steps": every - layers % every,
        "relative_error": jnp.sqrt(noise / jnp.where(signal > 0, signal, 1.0)),
        "snr": snr,
        "snr_db": 10.0 * jnp.log10(snr),
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
                "exact": all(
                    bool(jnp.array_equal(a, b))
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True)
                ),
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
