"""A RevNet-style CNN: stages of additive couplings with conv branches, squeeze between stages.

Images ``(N, H, W, C)`` are squeezed (2x2 patches to channels, invertible) into ``4C`` channels,
split into two halves along channels, and run through ``blocks`` additive couplings per stage,

    y1 = x1 + F(x2),   y2 = x2 + G(y1),   F, G: conv3x3 -> ReLU -> conv3x3,

with another squeeze between stages. Everything up to the classifier head (global average pool
and a linear layer) is invertible, so with ``reversible=True`` each stage runs through
:func:`revjax.reversible_scan` and its activation memory does not grow with ``blocks``; with
``reversible=False`` the same network runs through :func:`revjax.scan.plain_scan` (the
non-reversible twin, plain backprop; ``checkpoint=True`` adds per-coupling ``jax.checkpoint``).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from revjax._validate import positive_int, real_scalar
from revjax.coupling import Coupling, additive_coupling
from revjax.layers import batch_pool, squeeze
from revjax.precision import implicit_narrow_stream, warn_implicit_narrow_stream
from revjax.scan import inverse_scan, plain_scan, reverse_sweep, reversible_scan

PyTree = Any
_SQUEEZE = squeeze()
_DOWNSAMPLE = {"squeeze": _SQUEEZE, "batch_pool": batch_pool()}


def conv3x3(w: jax.Array, h: jax.Array) -> jax.Array:
    """Same-padded 3x3 convolution, ``h (N, H, W, C_in)``, ``w (3, 3, C_in, C_out)``."""
    return lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_branch(params: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """``conv3x3(relu(conv3x3(h) + b1)) + b2``: a residual branch from C to C channels.

    Params ``{"w1": (3, 3, C, hidden), "b1": (hidden,), "w2": (3, 3, hidden, C), "b2": (C,)}``
    for ``h (N, H, W, C)``, checked (static shapes), so a ``w2`` with fewer output channels is
    refused instead of broadcast by ``b2``.
    """
    _check_branch_params(params, h)
    z = jax.nn.relu(conv3x3(params["w1"], h) + params["b1"])
    return conv3x3(params["w2"], z) + params["b2"]


def _check_branch_params(params: Any, h: jax.Array) -> None:
    names = ("w1", "b1", "w2", "b2")
    if not isinstance(params, Mapping) or not set(names) <= set(params):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"revnet conv_branch: params must be a dict with keys {names}, got {got}")
    w1 = jnp.shape(params["w1"])
    hidden = w1[-1] if len(w1) == 4 else None
    channels = jnp.shape(h)[-1] if jnp.ndim(h) == 4 else None
    expected = {
        "w1": (3, 3, channels, hidden),
        "b1": (hidden,),
        "w2": (3, 3, hidden, channels),
        "b2": (channels,),
    }
    for name in names:
        if channels is None or hidden is None or jnp.shape(params[name]) != expected[name]:
            raise ValueError(
                f"revnet conv_branch: params[{name!r}] has shape {jnp.shape(params[name])}, "
                f"expected {expected[name]} for a half of shape {jnp.shape(h)} (N, H, W, C) "
                f"and w1 of shape {w1} (3, 3, C, hidden)"
            )


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
    downsample: str = "squeeze",
) -> dict[str, Any]:
    """Params: per stage ``(params_F, params_G)`` stacked over ``blocks``, and the head.

    With ``downsample="squeeze"`` stage ``s`` has ``in_channels * 4^(s+1)`` channels (two halves
    of half that each); with ``"batch_pool"`` every stage has ``4 in_channels`` (the first stage
    squeezes, later ones pool 2x2 phases into the batch). Pass the same ``downsample`` to
    :func:`revnet_logits`. ``stages=0`` is allowed (no trunk: pooling and the head only).

    Raises:
      ValueError: ``stages`` not a non-negative int; ``in_channels``, ``blocks``, ``hidden`` or
        ``num_classes`` not a positive int; ``scale`` not a finite real number; an unknown
        ``downsample``.
    """
    _check_downsample(downsample)
    number = real_scalar(scale)
    if number is None or not math.isfinite(number):
        raise ValueError(f"init_revnet: scale must be a finite real number, got {scale!r}")
    no_trunk = isinstance(stages, numbers.Integral) and not isinstance(stages, bool)
    if not (no_trunk and stages == 0):  # 0.0 and False were taken as 0, or failed later
        stages = positive_int(stages, "stages (or 0 for no trunk)", "init_revnet")
    stages = int(stages)
    for name, value in [
        ("in_channels", in_channels),
        ("blocks", blocks),
        ("hidden", hidden),
        ("num_classes", num_classes),
    ]:
        positive_int(value, name, "init_revnet")
    keys = jax.random.split(key, stages + 1)
    stage_params, channels = [], in_channels
    for s in range(stages):
        if s == 0 or downsample == "squeeze":
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


def _check_downsample(downsample: str) -> None:
    if downsample not in _DOWNSAMPLE:
        raise ValueError(
            f"revnet: downsample must be one of {sorted(_DOWNSAMPLE)}, got {downsample!r}"
        )


def _check_input(
    params: dict[str, Any], x: jax.Array, downsample: str, where: str, name: str = "x"
) -> None:
    """Refuses, naming the stage and the expected and actual values, an input the trunk cannot
    take: not ``(N, H, W, C)``, H or W not divisible by ``2^stages``, channels or dtype other
    than the parameters', or parameters built for the other ``downsample``."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"{where}: x must be (N, H, W, C) images, got shape {jnp.shape(x)}")
    stages = params["stages"]
    _, height, width, channels = x.shape
    factor = 2 ** len(stages)
    if height % factor or width % factor:
        raise ValueError(
            f"{where}: H={height} and W={width} must be divisible by 2^stages = {factor} "
            f"({len(stages)} stages, each halving H and W)"
        )
    for s, (params_f, _) in enumerate(stages):
        if s == 0 or downsample == "squeeze":
            channels *= 4
        half = params_f["w1"].shape[-2]  # (blocks, 3, 3, C / 2, hidden)
        if 2 * half != channels:
            if s == 0:
                raise ValueError(
                    f"{where}: x has {x.shape[-1]} channels but the parameters were built for "
                    f"in_channels={half // 2} (stage 0 couples {2 * half} squeezed channels)"
                )
            other = "batch_pool" if downsample == "squeeze" else "squeeze"
            raise ValueError(
                f"{where}: stage {s} parameters couple {2 * half} channels but "
                f'downsample="{downsample}" gives {channels}; were they built with '
                f'downsample="{other}"? Pass the same downsample to init_revnet and here'
            )
    if not stages and channels != params["head"]["w"].shape[0]:  # no trunk: x meets the head
        raise ValueError(
            f"{where}: x has {channels} channels but the parameters were built for "
            f"in_channels={params['head']['w'].shape[0]} (no stages: the head reads x directly)"
        )
    dtype = params["head"]["w"].dtype
    if jax.dtypes.canonicalize_dtype(x.dtype) != dtype:  # NumPy float64 is float32 without x64
        raise TypeError(
            f"{where}: {name} is {x.dtype} but the parameters are {dtype}; cast one to the "
            f"other (e.g. {name}.astype({dtype.name}))"
        )


def _downsampler(stage: int, downsample: str) -> Coupling:
    return _SQUEEZE if stage == 0 else _DOWNSAMPLE[downsample]


def _split(x):
    return tuple(jnp.split(x, 2, axis=-1))


def _trunk_forward(
    downsample: str, params: dict[str, Any], x: jax.Array, scan=plain_scan
) -> jax.Array:
    """Downsample, then ``scan`` the stage's couplings over the channel halves, per stage."""
    block = revnet_block()
    for s, stage in enumerate(params["stages"]):
        x = _downsampler(s, downsample).forward(None, x)
        x = jnp.concatenate(scan(block, stage, _split(x)), axis=-1)
    return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reversible_trunk(downsample: str, params: dict[str, Any], x: jax.Array) -> jax.Array:
    return _trunk_forward(downsample, params, x)


def _reversible_trunk_fwd(downsample, params, x):
    # Traced only when differentiating, as reversible_scan's own warning: the backward pass
    # reconstructs every stage's stream in x's dtype (no policy can name another here).
    narrow = implicit_narrow_stream(x, None)
    if narrow is not None:
        warn_implicit_narrow_stream(narrow, "revnet_features(across_stages=True)")
    z = _trunk_forward(downsample, params, x)
    return z, (params, z)  # only the trunk's output is stored


def _reversible_trunk_bwd(downsample, residuals, z_bar):
    params, z = residuals
    block, stage_bars = revnet_block(), []
    for s in reversed(range(len(params["stages"]))):
        x, x_bar, p_bar = reverse_sweep(block, params["stages"][s], _split(z), _split(z_bar))
        stage_bars.insert(0, p_bar)
        down = _downsampler(s, downsample)
        # Squeeze and batch pooling permute elements: their transpose is their inverse.
        z = down.inverse(None, jnp.concatenate(x, axis=-1))
        z_bar = down.inverse(None, jnp.concatenate(x_bar, axis=-1))
    params_bar = {
        **jax.tree.map(jnp.zeros_like, params),
        "stages": type(params["stages"])(stage_bars),
    }
    return params_bar, z_bar


_reversible_trunk.defvjp(_reversible_trunk_fwd, _reversible_trunk_bwd)


def revnet_features(
    params: dict[str, Any],
    x: jax.Array,
    *,
    reversible: bool = True,
    downsample: str = "squeeze",
    across_stages: bool = False,
    checkpoint: bool = False,
) -> jax.Array:
    """The invertible trunk: ``(N, H, W, C) -> (N, H / 2^S, W / 2^S, C 4^S)`` (squeeze), or
    ``(4^(S-1) N, H / 2^S, W / 2^S, 4 C)`` (batch pooling: example ``k N + n`` is a 2x2 phase
    of example ``n``).

    ``across_stages=True`` (with ``reversible=True``) runs the whole trunk under one
    ``custom_vjp`` that stores only its output and reconstructs through every stage and
    downsampling in the backward pass (:func:`revjax.scan.reverse_sweep`), the fully invertible
    variant; by default each stage's ``reversible_scan`` stores its own output.
    ``checkpoint=True`` (with ``reversible=False``) wraps each coupling of the plain twin in
    ``jax.checkpoint`` (per-layer rematerialisation, the usual memory baseline).

    Raises:
      ValueError: x not ``(N, H, W, C)``, H or W not divisible by ``2^stages``, C other than the
        parameters' ``in_channels``, parameters built for another ``downsample``, an unknown
        ``downsample``, or ``across_stages`` / ``checkpoint`` with the wrong ``reversible``.
      TypeError: x's dtype differs from the parameters'.
    """
    _check_downsample(downsample)
    if checkpoint and reversible:
        raise ValueError(
            "revnet_features: checkpoint=True applies to the plain twin; pass reversible=False"
        )
    if across_stages and not reversible:
        raise ValueError("revnet_features: across_stages=True needs reversible=True")
    _check_input(params, x, downsample, "revnet_features")
    if across_stages:
        return _reversible_trunk(downsample, params, x)
    if reversible:
        return _trunk_forward(downsample, params, x, reversible_scan)
    scan = functools.partial(plain_scan, remat=checkpoint)
    return _trunk_forward(downsample, params, x, scan)


def revnet_features_inverse(
    params: dict[str, Any], z: jax.Array, *, downsample: str = "squeeze"
) -> jax.Array:
    """The trunk's inverse: the image ``x`` with ``revnet_features(params, x) == z``.

    Raises:
      ValueError: z not 4-D, its channels other than the trunk's output channels, its batch
        not a multiple of the batch-pooling phases, parameters built for another
        ``downsample`` (checked as :func:`revnet_features` checks its input), an unknown
        ``downsample``.
      TypeError: z's dtype differs from the parameters'.
    """
    _check_downsample(downsample)
    where = "revnet_features_inverse"
    if jnp.ndim(z) != 4:
        raise ValueError(f"{where}: z must be (N, h, w, C) features, got shape {jnp.shape(z)}")
    stages = params["stages"]
    if stages:
        in_channels = stages[0][0]["w1"].shape[-2] // 2  # stage 0 couples 4 C channels
        out_channels = 2 * stages[-1][0]["w1"].shape[-2]
        phases = 4 ** (len(stages) - 1) if downsample == "batch_pool" else 1
    else:
        in_channels = out_channels = params["head"]["w"].shape[0]
        phases = 1
    scale = 2 ** len(stages)
    image = jax.ShapeDtypeStruct(
        (z.shape[0] // phases, z.shape[1] * scale, z.shape[2] * scale, in_channels), z.dtype
    )
    _check_input(params, image, downsample, where, name="z")
    if z.shape[-1] != out_channels or z.shape[0] % phases:
        raise ValueError(
            f"{where}: z has shape {z.shape}, but the trunk's output has {out_channels} "
            f"channels and a batch that is a multiple of {phases} ({len(stages)} stages, "
            f'downsample="{downsample}")'
        )
    block = revnet_block()
    for s in reversed(range(len(params["stages"]))):
        z1, z2 = inverse_scan(block, params["stages"][s], tuple(jnp.split(z, 2, axis=-1)))
        z = _downsampler(s, downsample).inverse(None, jnp.concatenate([z1, z2], axis=-1))
    return z


def revnet_logits(
    params: dict[str, Any],
    x: jax.Array,
    *,
    reversible: bool = True,
    downsample: str = "squeeze",
    across_stages: bool = False,
    checkpoint: bool = False,
) -> jax.Array:
    """Class logits: global average pool of :func:`revnet_features` (over space and, with
    batch pooling, over each example's phases), then a linear head."""
    features = revnet_features(
        params,
        x,
        reversible=reversible,
        downsample=downsample,
        across_stages=across_stages,
        checkpoint=checkpoint,
    )
    # (phases, N, h, w, C); phases spelled out, as -1 cannot be inferred for an empty batch.
    phases = features.shape[0] // max(x.shape[0], 1)
    features = features.reshape(phases, x.shape[0], *features.shape[1:])
    pooled = jnp.mean(features, axis=(0, 2, 3))
    return pooled @ params["head"]["w"] + params["head"]["b"]


__all__ = [
    "conv3x3",
    "conv_branch",
    "init_revnet",
    "revnet_block",
    "revnet_features",
    "revnet_features_inverse",
    "revnet_logits",
]
