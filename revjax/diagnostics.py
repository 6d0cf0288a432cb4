"""Numerical diagnostics: how far a reconstructed quantity is from the one it stands for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from revjax._tree_metrics import bitwise_equal, metric_leaves, relative_error, relative_norm
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
    stream leaves jointly, in float32 (float64 for a float64 stream); the
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
        lambda rec, exact: relative_norm(*metric_leaves("reconstruction_report", rec, exact))
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
    leaves = jax.tree.leaves(y)
    dtype = jnp.result_type(jnp.float32, *leaves)  # float64 for a float64 stream
    return 0.5 * sum(jnp.sum(jnp.square(jnp.asarray(v, dtype))) for v in leaves)


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
      loss: ``loss(y) -> scalar``; default ``0.5 * sum(y^2)`` over all leaves, in float32
        (float64 for a float64 stream).
      key: optional PRNG key passed to every scan (dropout masks), the reference included, so
        all methods see the same masks.

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
