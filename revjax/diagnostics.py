"""Numerical diagnostics: how far a reconstructed quantity is from the one it stands for."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def relative_error(approx: PyTree, reference: PyTree) -> jax.Array:
    """``||approx - reference|| / ||reference||`` over all leaves jointly, in float32.

    The norm is the Euclidean norm of every leaf flattened and concatenated; both pytrees must
    have the same structure and shapes. Returns ``inf`` when the reference is zero and the
    approximation is not (and 0 when both are zero).
    """
    a, r = jax.tree.leaves(approx), jax.tree.leaves(reference)
    if jax.tree.structure(approx) != jax.tree.structure(reference):
        raise ValueError(
            "relative_error: pytrees differ in structure: "
            f"{jax.tree.structure(approx)} vs {jax.tree.structure(reference)}"
        )
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    diff = sum(jnp.sum(jnp.square(f32(x) - f32(y))) for x, y in zip(a, r, strict=True))
    norm = sum(jnp.sum(jnp.square(f32(y))) for y in r)
    return jnp.where(
        norm > 0, jnp.sqrt(diff / jnp.where(norm > 0, norm, 1.0)), jnp.where(diff > 0, jnp.inf, 0.0)
    )


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
