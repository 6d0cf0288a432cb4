"""A RevNet-style CNN: stages of additive couplings with conv branches, squeeze between stages.

Images ``(N, H, W, C)`` are squeezed (2x2 patches to channels, invertible) into ``4C`` channels,
split into two halves along channels, and run through ``blocks`` additive couplings per stage,

    y1 = x1 + F(x2),   y2 = x2 + G(y1),   F, G: conv3x3 -> ReLU -> conv3x3,

with another squeeze between stages. Everything up to the classifier head (global average pool
and a linear layer) is invertible, so with ``reversible=True`` each stage runs through
:func:`revjax.reversible_scan` and its activation memory does not grow with ``blocks``; with
``reversible=False`` the same network runs through :func:`revjax.scan.plain_scan` (the
non-reversible twin, plain backprop).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from revjax.coupling import Coupling, additive_coupling
from revjax.layers import squeeze
from revjax.scan import inverse_scan, plain_scan, reversible_scan

PyTree = Any
_SQUEEZE = squeeze()


def conv3x3(w: jax.Array, h: jax.Array) -> jax.Array:
    """Same-padded 3x3 convolution, ``h (N, H, W, C_in)``, ``w (3, 3, C_in, C_out)``."""
    return lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_branch(params: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """``conv3x3(relu(conv3x3(h) + b1)) + b2``: a residual branch from C to C channels."""
    z = jax.nn.relu(conv3x3(params["w1"], h) + params["b1"])
    return conv3x3(params["w2"], z) + params["b2"]


def revnet_block() -> Coupling:
    """The additive coupling of two conv branches, on channel halves ``(x1, x2)``."""
    return additive_coupling(conv_branch, conv_branch)


def _init_branch(key, depth, channels, hidden, scale):
    k1, k2 = jax.random.split(key)
    return {
        "w1": scale
        * jax.random.normal(k1, (depth, 3, 3, channels, hidden))
        / (9 * channels) ** 0.5,
        "b1": jnp.zeros((depth, hidden)),
        "w2": scale * jax.random.normal(k2, (depth, 3, 3, hidden, channels)) / (9 * hidden) ** 0.5,
        "b2": jnp.zeros((depth, channels)),
    }


def init_revnet(
    key: jax.Array,
    *,
    in_channels: int = 1,
    stages: int = 2,
    blocks: int = 2,
    hidden: int = 32,
    num_classes: int = 10,
    scale: float = 0.5,
) -> dict[str, Any]:
    """Params: per stage ``(params_F, params_G)`` stacked over ``blocks``, and the head.

    Stage ``s`` has ``in_channels * 4^(s+1)`` channels (two halves of half that each).
    """
    keys = jax.random.split(key, stages + 1)
    stage_params, channels = [], in_channels
    for s in range(stages):
        channels *= 4
        kf, kg = jax.random.split(keys[s])
        half = channels // 2
        stage_params.append(
            (
                _init_branch(kf, blocks, half, hidden, scale),
                _init_branch(kg, blocks, half, hidden, scale),
            )
        )
    head = {
        "w": jax.random.normal(keys[-1], (channels, num_classes)) / channels**0.5,
        "b": jnp.zeros((num_classes,)),
    }
    return {"stages": stage_params, "head": head}


def revnet_features(params: dict[str, Any], x: jax.Array, *, reversible: bool = True) -> jax.Array:
    """The invertible trunk: ``(N, H, W, C) -> (N, H / 2^S, W / 2^S, C 4^S)``.

    Raises:
      ValueError: H or W not divisible by ``2^stages`` (from the squeeze).
    """
    scan = reversible_scan if reversible else plain_scan
    block = revnet_block()
    for stage in params["stages"]:
        x = _SQUEEZE.forward(None, x)
        x1, x2 = jnp.split(x, 2, axis=-1)
        x1, x2 = scan(block, stage, (x1, x2))
        x = jnp.concatenate([x1, x2], axis=-1)
    return x


def revnet_features_inverse(params: dict[str, Any], z: jax.Array) -> jax.Array:
    """The trunk's inverse: the image ``x`` with ``revnet_features(params, x) == z``."""
    block = revnet_block()
    for stage in reversed(params["stages"]):
        z1, z2 = inverse_scan(block, stage, tuple(jnp.split(z, 2, axis=-1)))
        z = _SQUEEZE.inverse(None, jnp.concatenate([z1, z2], axis=-1))
    return z


def revnet_logits(params: dict[str, Any], x: jax.Array, *, reversible: bool = True) -> jax.Array:
    """Class logits: global average pool of :func:`revnet_features`, then a linear head."""
    pooled = jnp.mean(revnet_features(params, x, reversible=reversible), axis=(1, 2))
    return pooled @ params["head"]["w"] + params["head"]["b"]
