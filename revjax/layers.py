"""Layer-wise invertible layers as :class:`revjax.Coupling` pairs.

After Hascoet, Febvre, Ariki & Takiguchi, "Reversible designs for extreme memory cost reduction
of CNN training", and i-RevNet (Jacobsen, Smeulders & Oyallon 2018). Each layer is a
``Coupling(forward, inverse, log_det=...)`` acting on one array ``x`` with channels last
(``(..., C)``; images ``(N, H, W, C)``), usable in :func:`revjax.sequence`, and, when it keeps
the shape, in :func:`revjax.reversible_scan` with params stacked over layers (a scan needs at
least one parameterised layer to count the layers: put parameter-free ones in a ``sequence``
with one). Exact mode (:mod:`revjax.precision`) accepts only the permutations here. ``log_det`` is
``log|det dy/dx|`` summed over the whole array, as everywhere in revjax, computed and summed in
the wider of float32 and the dtype of what it is computed from (float64 with x64 params;
float32, not bfloat16, for bfloat16 ones).

Reconstruction error: a layer-wise inverse multiplies round-off by the inverse's gain, e.g. the
leaky ReLU's ``1/slope`` on negative inputs; chains of such layers lose precision much faster
than additive couplings, whose inverse only subtracts (see ``reconstruction_report``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from revjax._validate import check_representable_in, positive_float, positive_int, real_scalar
from revjax.coupling import Coupling
from revjax.precision import Policy
from revjax.scan import reversible_scan

PyTree = Any


def _no_branches(layer: Coupling, kind: str):
    """``map_branches`` of a layer without residual branches: nothing to wrap, but the wrapper
    is shown the layer's ``kind`` ("layerwise" or "permutation") so a policy can refuse it
    (exact mode accepts permutations only: a scale or nonlinearity leaves the grid)."""

    def map_branches(wrap):
        wrap(None, kind)
        return layer

    return map_branches


def _zero_log_det(params, x, key=None):
    return jnp.zeros((), jnp.float32)


def _log_det_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype a layer's log-det is computed and summed in: the arrays' common dtype
    promoted to at least float32 (a bfloat16 sum over many pixels loses digits; a float64
    network keeps float64)."""
    return jnp.result_type(jnp.float32, *arrays)


def _one_array(x: Any, name: str) -> None:
    """Layer-wise layers act on the stream as one channels-last array; a pytree stream (the
    ``(x1, x2)`` halves) failed deep inside JAX (a tracer conversion, ``'tuple' has no
    attribute 'dtype'``) without naming the layer."""
    if not isinstance(x, jax.Array | np.ndarray):
        raise TypeError(
            f"layers.{name}: acts on one channels-last array, got {type(x).__name__} "
            f"{jax.tree.structure(x)}; put it where the stream is one array, or on one half "
            "inside a coupling's branch (layers.layerwise_branch)"
        )


def _in_stream_dtype(fn: Callable, name: str) -> Callable:
    """``fn(params, x, ...)`` checked to get one array and returned in ``x``'s dtype: a layer
    transforms the stream itself, so it keeps the stream's dtype as a coupling's combine does
    (float32 params on a bfloat16 stream promoted the output to float32, and the scans refused
    the stack); it computes in the dtype ``x`` and the params promote to."""

    def in_stream_dtype(params, x, *args, **kwargs):
        _one_array(x, name)
        return fn(params, x, *args, **kwargs).astype(x.dtype)

    return in_stream_dtype


def _checked(fn: Callable, name: str) -> Callable:
    """``fn(params, x, ...)`` checked to get one array (``log_det``, ``aux``)."""

    def checked(params, x, *args, **kwargs):
        _one_array(x, name)
        return fn(params, x, *args, **kwargs)

    return checked


def _layer(forward, inverse, log_det, name: str, kind: str = "layerwise", aux=None) -> Coupling:
    layer = Coupling(
        _in_stream_dtype(forward, name),
        _in_stream_dtype(inverse, name),
        log_det=_checked(log_det, name),
        aux=None if aux is None else _checked(aux, name),
    )
    return layer._replace(map_branches=_no_branches(layer, kind))


def _check_permutation(permutation: Any, where: str) -> np.ndarray:
    perm = np.asarray(permutation)
    integral = perm.dtype.kind in "iu" or perm.size == 0
    if perm.ndim != 1 or not integral or sorted(perm.tolist()) != list(range(perm.size)):
        raise ValueError(f"{where}: {permutation!r} is not a permutation of 0..C-1")
    return perm


def leaky_relu(slope: float = 0.1) -> Coupling:
    """``y = x`` for ``x >= 0``, ``slope x`` otherwise; params ``None``.

    The branch is chosen by the sign bit, so ``-0.0`` is negative: a tiny negative ``x`` whose
    ``slope x`` underflows to ``-0.0`` is reconstructed as ``-0.0``, on the same branch (by
    ``x >= 0`` the vjp at the reconstruction took slope 1 where backprop took ``slope``).
    The inverse divides negative outputs by ``slope``, so it amplifies their round-off by
    ``1/slope`` (10x at the default): keep the slope moderate in deep layer-wise chains.

    Raises:
      ValueError: ``slope`` not a finite real number > 0 (``slope = 0`` is not invertible),
        or, when called, one that rounds to 0 or overflows to inf in the input's dtype
        (``1e-8`` or ``1e5`` in float16).
    """
    slope = positive_float(slope, "slope", "layers.leaky_relu")

    def check_representable(x):
        check_representable_in(
            slope,
            x.dtype,
            "slope",
            "layers.leaky_relu",
            "negative inputs could not be recovered from the outputs; use a slope nearer 1",
        )

    def forward(params, x, key=None):
        check_representable(x)
        return jnp.where(jnp.signbit(x), slope * x, x)

    def inverse(params, y, key=None):
        check_representable(y)
        return jnp.where(jnp.signbit(y), y / slope, y)

    def log_det(params, x, key=None):
        negatives = jnp.sum(jnp.signbit(x), dtype=jnp.int32)  # each contributes log(slope)
        return negatives.astype(_log_det_dtype(x)) * math.log(slope)

    return _layer(forward, inverse, log_det, "leaky_relu")


def _channels(x: jax.Array, expected: int, where: str) -> None:
    if x.shape[-1] != expected:
        raise ValueError(f"{where}: expected {expected} channels (last axis), got shape {x.shape}")


def _check_params(where: str, params: Any, x: jax.Array, layout: dict[str, int]) -> None:
    """Check that ``params`` holds every name of ``layout``, the first of shape ``(C,)`` and
    each ``params[name]`` of shape ``(C,) * layout[name]``, and that ``x`` has ``C`` channels
    (last axis). Shapes are static, so this also runs under ``jit`` and in a scan's body.
    Without it a ``(1,)``-shaped vector broadcast silently over the channels (and ``log_det``
    counted it once), and params not sliced per layer failed deep inside JAX."""
    names = list(layout)
    if not isinstance(params, Mapping) or not set(names) <= set(params):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{where}: params must be a dict with keys {names}, got {got}")
    if jnp.ndim(x) < 1:
        raise ValueError(f"{where}: expects an input with a channel axis (last), got a scalar")
    channels = x.shape[-1]
    reference = jnp.shape(params[names[0]])
    if len(reference) == 1:
        _channels(x, reference[0], where)
    for name in names:
        shape, expected = jnp.shape(params[name]), (channels,) * layout[name]
        if shape != expected:
            hint = (
                "; a layer takes one layer's params, reversible_scan takes them stacked over "
                "layers (a leading axis of length L) and slices them"
                if len(shape) != len(expected)
                else ""
            )
            raise ValueError(
                f"{where}: params[{name!r}] has shape {shape}, expected {expected} for an input "
                f"of shape {x.shape} ({channels} channels){hint}"
            )


def _pixels(x: jax.Array) -> int:
    return math.prod(x.shape[:-1])


def actnorm() -> Coupling:
    """Per-channel affine ``y = x exp(log_scale) + bias`` (Glow's actnorm).

    Params ``{"log_scale": (C,), "bias": (C,)}``, data-initialised by :func:`init_actnorm` so the
    first batch comes out with zero mean and unit variance per channel.
    ``log_det = (number of pixels) * sum(log_scale)``.
    """

    layout = {"bias": 1, "log_scale": 1}

    def forward(params, x, key=None):
        _check_params("actnorm", params, x, layout)
        return x * jnp.exp(params["log_scale"]) + params["bias"]

    def inverse(params, y, key=None):
        _check_params("actnorm", params, y, layout)
        return (y - params["bias"]) * jnp.exp(-params["log_scale"])

    def log_det(params, x, key=None):
        _check_params("actnorm", params, x, layout)
        log_scale = params["log_scale"]
        return _pixels(x) * jnp.sum(log_scale.astype(_log_det_dtype(log_scale)))

    return _layer(forward, inverse, log_det, "actnorm")


def init_actnorm(x: jax.Array, eps: float = 1e-6) -> dict[str, jax.Array]:
    """Actnorm params making ``x`` zero-mean, unit-variance per channel (last axis): ``log_scale
    = -log(std + eps)``, so ``eps`` (finite, > 0) keeps a constant channel's scale finite."""
    eps = positive_float(eps, "eps", "layers.init_actnorm")
    axes = tuple(range(x.ndim - 1))
    mean, std = jnp.mean(x, axis=axes), jnp.std(x, axis=axes)
    log_scale = -jnp.log(std + eps)
    return {"log_scale": log_scale, "bias": -mean * jnp.exp(log_scale)}


def _batch_moments(x: jax.Array) -> dict[str, jax.Array]:
    """Per-channel (last axis) batch ``mean`` and biased ``var``, each ``(C,)``."""
    axes = tuple(range(x.ndim - 1))
    return {"mean": jnp.mean(x, axis=axes), "var": jnp.var(x, axis=axes)}


def _bn_scale(gamma: jax.Array, scale_eps: float) -> jax.Array:
    # |gamma| + eps: bounded away from zero, so the inverse never divides by ~0 (Hascoet et al.).
    return jnp.abs(gamma) + scale_eps


def batch_norm(eps: float = 1e-5, scale_eps: float = 1e-2) -> Coupling:
    """Invertible batch norm (training mode): ``y = (x - mean) / std * (|gamma| + scale_eps)
    + beta`` with the batch's per-channel ``mean`` and ``std = sqrt(var + eps)``.

    Params ``{"gamma": (C,), "beta": (C,)}``. The output's batch statistics no longer reveal
    the input's, so the block has side information, ``aux = {"mean", "var"}`` per channel
    (``std`` is recomputed from ``var``, bit for bit as in the forward pass), which
    :func:`revjax.reversible_scan` stores (``2 C`` numbers per layer) and hands to the
    inverse. ``forward`` recomputes them from ``x``, so gradients flow through the batch
    statistics exactly as in ordinary batch norm. Running statistics are not state of this
    layer: get the batch statistics with ``reversible_scan(..., return_aux=True)`` and update
    them once per training step with :func:`update_running_stats`; reconstruction never
    touches them. For inference use :func:`batch_norm_inference`.

    ``log_det = (number of pixels) * sum(log(|gamma| + scale_eps) - log(std))``, the
    log-determinant with the batch statistics held fixed (as a function of the whole batch,
    statistics included, the map is not invertible: every output batch has the same moments).
    """
    eps = positive_float(eps, "eps", "layers.batch_norm")
    scale_eps = positive_float(scale_eps, "scale_eps", "layers.batch_norm")

    layout = {"gamma": 1, "beta": 1}

    def forward(params, x, key=None):
        _check_params("batch_norm", params, x, layout)
        moments = _batch_moments(x)
        scale = _bn_scale(params["gamma"], scale_eps)
        return (x - moments["mean"]) / std(moments) * scale + params["beta"]

    def inverse(params, y, key=None, *, aux):
        _check_params("batch_norm", params, y, layout)
        _check_params("batch_norm (aux: the batch statistics)", aux, y, {"mean": 1, "var": 1})
        scale = _bn_scale(params["gamma"], scale_eps)
        return (y - params["beta"]) / scale * std(aux) + aux["mean"]

    def std(moments):
        return jnp.sqrt(moments["var"] + eps)

    def side(params, x, key=None):
        # Differentiable on purpose: the reconstruction is a function of these statistics,
        # and second derivatives (grad of grad, Hessians) must see that they depend on x.
        # Scans return them under stop_gradient.
        return _batch_moments(x)

    def log_det(params, x, key=None):
        _check_params("batch_norm", params, x, layout)
        # The scale and std the forward pass applies, logged and summed in the wider dtype.
        scale, deviation = _bn_scale(params["gamma"], scale_eps), std(_batch_moments(x))
        wide = _log_det_dtype(scale, deviation)
        per_pixel = jnp.log(scale.astype(wide)) - jnp.log(deviation.astype(wide))
        return _pixels(x) * jnp.sum(per_pixel)

    return _layer(forward, inverse, log_det, "batch_norm", aux=side)


def update_running_stats(
    running: dict[str, jax.Array], batch: dict[str, jax.Array], momentum: float = 0.9
) -> dict[str, jax.Array]:
    """``momentum * running + (1 - momentum) * batch`` for ``mean`` and ``var`` (``batch`` as
    returned in ``aux`` by :func:`batch_norm`: the biased batch variance, without ``eps``;
    leaves may be stacked over layers). Call it once per training step.

    Raises:
      ValueError: ``momentum`` (a concrete number) outside ``[0, 1]``, a dict without
        ``mean`` and ``var``, or running and batch statistics of different shapes.
    """
    number = real_scalar(momentum)
    if isinstance(momentum, bool | str) or (number is not None and not 0.0 <= number <= 1.0):
        raise ValueError(f"update_running_stats: momentum must lie in [0, 1], got {momentum!r}")
    for name, stats in (("running", running), ("batch", batch)):
        if not isinstance(stats, Mapping) or not {"mean", "var"} <= set(stats):
            got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
            raise ValueError(
                f"update_running_stats: {name} must be a dict with 'mean' and 'var', got {got}"
            )
    for key in ("mean", "var"):  # else (C,) running stats broadcast over (L, C) stacked ones
        if jnp.shape(running[key]) != jnp.shape(batch[key]):
            raise ValueError(
                f"update_running_stats: running[{key!r}] has shape {jnp.shape(running[key])} "
                f"but batch[{key!r}] {jnp.shape(batch[key])}; stack the running statistics "
                "like the batch's (one row per layer from reversible_scan's aux)"
            )
    return {key: momentum * running[key] + (1 - momentum) * batch[key] for key in ("mean", "var")}


def batch_norm_inference(eps: float = 1e-5, scale_eps: float = 1e-2) -> Coupling:
    """Batch norm with fixed statistics: params ``{"gamma", "beta", "mean", "var"}``; an
    ordinary per-channel affine map, inverted exactly without side information.

    ``var`` must be >= 0 (a variance; it is not checked, as it may be traced): with ``eps > 0``
    the map is then invertible.

    Raises:
      ValueError: ``eps`` or ``scale_eps`` not finite and > 0.
    """
    eps = positive_float(eps, "eps", "layers.batch_norm_inference")
    scale_eps = positive_float(scale_eps, "scale_eps", "layers.batch_norm_inference")

    def affine(params):
        scale = _bn_scale(params["gamma"], scale_eps) / jnp.sqrt(params["var"] + eps)
        return scale, params["beta"] - params["mean"] * scale

    layout = {"gamma": 1, "beta": 1, "mean": 1, "var": 1}

    def forward(params, x, key=None):
        _check_params("batch_norm_inference", params, x, layout)
        scale, shift = affine(params)
        return x * scale + shift

    def inverse(params, y, key=None):
        _check_params("batch_norm_inference", params, y, layout)
        scale, shift = affine(params)
        return (y - shift) / scale

    def log_det(params, x, key=None):
        _check_params("batch_norm_inference", params, x, layout)
        scale = affine(params)[0]
        return _pixels(x) * jnp.sum(jnp.log(scale.astype(_log_det_dtype(scale))))

    return _layer(forward, inverse, log_det, "batch_norm_inference")


def permute(permutation: Any) -> Coupling:
    """A fixed channel permutation ``y[..., i] = x[..., permutation[i]]``; params ``None``."""
    perm = _check_permutation(permutation, "layers.permute")
    inv = np.argsort(perm)

    def forward(params, x, key=None):
        _channels(x, perm.size, "permute")
        return x[..., perm]

    def inverse(params, y, key=None):
        _channels(y, perm.size, "permute")
        return y[..., inv]

    return _layer(forward, inverse, _zero_log_det, "permute", kind="permutation")


def conv1x1(permutation: Any = None) -> Coupling:
    """Invertible 1x1 convolution ``y = x W`` over channels, LU-parameterised (Glow):

        W = P L (U + diag(exp(log_scale))),   L unit lower, U strictly upper triangular,

    with ``P`` a fixed permutation (default identity). Params ``{"lower": (C, C), "upper":
    (C, C), "log_scale": (C,)}`` (only the strict triangles of ``lower``/``upper`` are used), so
    ``W`` is invertible for every finite parameter value (``exp(log_scale)`` must neither
    underflow to 0 nor overflow: ``|log_scale|`` well below 87 in float32), the inverse is two
    triangular solves and ``log_det = (number of pixels) * sum(log_scale)``.
    """
    perm = None if permutation is None else _check_permutation(permutation, "layers.conv1x1")

    def factors(params):
        c = params["log_scale"].shape[-1]
        lower = jnp.tril(params["lower"], -1) + jnp.eye(c, dtype=params["lower"].dtype)
        upper = jnp.triu(params["upper"], 1) + jnp.diag(jnp.exp(params["log_scale"]))
        return lower, upper

    def check_permutation_fits(params):
        c = params["log_scale"].shape[-1]
        if perm is not None and perm.size != c:
            raise ValueError(
                f"conv1x1: permutation has {perm.size} entries but the params have {c} "
                "channels (log_scale's length)"
            )

    def weight(params):
        check_permutation_fits(params)
        lower, upper = factors(params)
        w = lower @ upper
        return w if perm is None else w[perm]  # rows permuted: (P W)[i] = W[perm[i]]

    layout = {"log_scale": 1, "lower": 2, "upper": 2}

    def forward(params, x, key=None):
        _check_params("conv1x1", params, x, layout)
        return x @ weight(params)

    def inverse(params, y, key=None):
        _check_params("conv1x1", params, y, layout)
        check_permutation_fits(params)
        lower, upper = factors(params)
        rows = y.reshape(-1, y.shape[-1]).T  # x P L U = y  <=>  U^T L^T P^T x^T = y^T
        z = solve_triangular(upper.T, rows, lower=True)
        z = solve_triangular(lower.T, z, lower=False, unit_diagonal=True)
        x = z.T if perm is None else z.T[:, perm]  # x P = x_perm  =>  x = x_perm[:, perm]
        return x.reshape(y.shape)

    def log_det(params, x, key=None):
        _check_params("conv1x1", params, x, layout)
        log_scale = params["log_scale"]
        return _pixels(x) * jnp.sum(log_scale.astype(_log_det_dtype(log_scale)))

    return _layer(forward, inverse, log_det, "conv1x1")


def init_conv1x1(key: jax.Array, channels: int, scale: float = 0.1) -> dict[str, jax.Array]:
    """Params of :func:`conv1x1` near the identity (off-diagonals ~ N(0, scale^2), log_scale 0)."""
    channels = positive_int(channels, "channels", "layers.init_conv1x1")
    k1, k2 = jax.random.split(key)
    return {
        "lower": scale * jax.random.normal(k1, (channels, channels)),
        "upper": scale * jax.random.normal(k2, (channels, channels)),
        "log_scale": jnp.zeros((channels,)),
    }


def _check_even(x: jax.Array, where: str) -> None:
    if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"{where}: expects (N, H, W, C) with even H and W, got shape {x.shape}")


def _split_2x2(x):
    n, h, w, c = x.shape
    # (n, h/2, 2, w/2, 2, c) -> the four 2x2 phases (dh, dw) in a new axis
    blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // 2, w // 2, 4, c)


def _merge_2x2(phases):
    n, h2, w2, _, c = phases.shape
    blocks = phases.reshape(n, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, 2 * h2, 2 * w2, c)


def squeeze() -> Coupling:
    """i-RevNet squeeze: ``(N, H, W, C) -> (N, H/2, W/2, 4C)``, each 2x2 patch to channels."""

    def forward(params, x, key=None):
        _check_even(x, "squeeze")
        phases = _split_2x2(x)
        # Sizes spelled out, not -1: reshape cannot infer -1 for an empty batch (0 / 0).
        n, h2, w2, four, c = phases.shape
        return phases.reshape(n, h2, w2, four * c)

    def inverse(params, y, key=None):
        if y.ndim != 4 or y.shape[-1] % 4:
            raise ValueError(f"squeeze.inverse: expects (N, H, W, 4C), got shape {y.shape}")
        return _merge_2x2(y.reshape(*y.shape[:3], 4, y.shape[-1] // 4))

    return _layer(forward, inverse, _zero_log_det, "squeeze", kind="permutation")


def batch_pool() -> Coupling:
    """Batch pooling (Hascoet et al.): ``(N, H, W, C) -> (4N, H/2, W/2, C)``, each 2x2 phase of
    the image becomes its own example, so channels (and the following weights) do not grow 4x.
    Output example ``k N + n`` is phase ``k = 2 dh + dw`` of example ``n``."""

    def forward(params, x, key=None):
        _check_even(x, "batch_pool")
        phases = _split_2x2(x)  # (n, h/2, w/2, 4, c)
        n, h2, w2, four, c = phases.shape  # not -1: ambiguous when another axis is 0
        return jnp.moveaxis(phases, 3, 0).reshape(four * n, h2, w2, c)

    def inverse(params, y, key=None):
        if y.ndim != 4 or y.shape[0] % 4:
            raise ValueError(f"batch_pool.inverse: expects (4N, H, W, C), got shape {y.shape}")
        phases = jnp.moveaxis(y.reshape(4, y.shape[0] // 4, *y.shape[1:]), 0, 3)
        return _merge_2x2(phases)

    return _layer(forward, inverse, _zero_log_det, "batch_pool", kind="permutation")


def layerwise_branch(block: Coupling, *, policy: Policy | None = None) -> Callable[..., jax.Array]:
    """A residual branch ``f(params, h)`` that runs a stack of layer-wise invertible layers
    (``block``, params stacked over its layers) through :func:`revjax.reversible_scan`.

    Inside :func:`revjax.additive_coupling` this is the *hybrid* block of Hascoet et al.: the
    coupling reconstructs its input at block level, and the branch's own vjp reconstructs its
    hidden activations layer by layer instead of storing them while the block is recomputed,
    so the backward pass of one block holds a single hidden layer at a time. The price is the
    layer-wise inverses' faster round-off growth (see the module docstring).

    ``policy``: the inner scan's :class:`revjax.precision.Policy`. An outer policy's compute
    dtype reaches the branch's input, not this scan: under a bfloat16 compute policy the inner
    stream is bfloat16 unless this policy names another (``Policy(compute_dtype=jnp.bfloat16)``
    keeps it in float32), and a gradient through it warns until one is named.

    Raises:
      TypeError: ``block`` not a :class:`revjax.Coupling` or ``policy`` not a ``Policy`` (or
        None), when the branch is built rather than at its first call.
    """
    if not isinstance(block, Coupling):
        raise TypeError(
            f"layerwise_branch: block must be a revjax.Coupling, got {type(block).__name__}"
        )
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"layerwise_branch: policy must be a Policy or None, got {policy!r}")

    def branch(params, h, key=None):
        return reversible_scan(block, params, h, key=key, policy=policy)

    return branch


__all__ = [
    "actnorm",
    "batch_norm",
    "batch_norm_inference",
    "batch_pool",
    "conv1x1",
    "init_actnorm",
    "init_conv1x1",
    "layerwise_branch",
    "leaky_relu",
    "permute",
    "squeeze",
    "update_running_stats",
]
