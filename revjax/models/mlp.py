"""MLP residual branches and a stacked reversible MLP, as pure functions.

The branch is ``mlp(p, h) = gelu(h @ w1 + b1) @ w2 + b2`` mapping ``(..., width)`` to
``(..., width)`` through a hidden layer of ``hidden`` units. ``mlp_coupling`` is the additive
coupling of two such branches, ``init_mlp_stack`` draws parameters for ``L`` of them stacked on a
leading layer axis, ready for :func:`revjax.reversible_scan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from revjax._validate import check_dropout_rate, positive_int, real_scalar
from revjax.coupling import Coupling, additive_coupling

MLPParams = dict[str, jax.Array]


def mlp(
    params: MLPParams, h: jax.Array, key: jax.Array | None = None, *, dropout: float = 0.0
) -> jax.Array:
    """``gelu(h @ w1 + b1) @ w2 + b2``; with a key, inverted dropout at rate ``dropout`` on the
    hidden units. Shapes: ``h (..., width)``, ``w1 (width, hidden)``, ``w2 (hidden, width)``.

    Raises:
      ValueError: ``dropout`` outside ``[0, 1)`` (rate 1 would divide by zero).
    """
    check_dropout_rate(dropout, "mlp")
    z = jax.nn.gelu(h @ params["w1"] + params["b1"])
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, z.shape)
        z = jnp.where(keep, z / (1.0 - dropout), 0.0).astype(z.dtype)
    return z @ params["w2"] + params["b2"]


def mlp_coupling(dropout: float = 0.0) -> Coupling:
    """Additive coupling with MLP branches f and g (optionally with dropout when given a key).

    Raises:
      ValueError: ``dropout`` outside ``[0, 1)``.
    """
    check_dropout_rate(dropout, "mlp_coupling")

    def branch(p, h, key=None):
        return mlp(p, h, key, dropout=dropout)

    return additive_coupling(branch, branch)


def init_mlp(
    key: jax.Array,
    num_layers: int,
    width: int,
    hidden: int,
    *,
    scale: float = 0.5,
    std: float | None = None,
    dtype: Any = jnp.float32,
) -> MLPParams:
    """Stacked MLP branch params; weights ~ N(0, scale^2 / fan_in), small random biases.

    ``std`` (optional) overrides the fan-in rule: both weight matrices ~ N(0, std^2). The
    numerics reference network of ``tests/test_precision.py`` uses ``std = 0.5 / sqrt(width)``
    for both, which makes the second matmul ``sqrt(hidden / width)`` times more expansive than
    the fan-in rule and the stack sensitive to reconstruction round-off.

    The default ``scale = 0.5`` keeps the residual stream's growth with depth mild. With unit
    gain (``scale = 1``) a 16-layer float32 stack of width 32 grew its stream to max |y| 333 and
    the gradient error of reversible_scan to 6.6e-5 (1.9e-7 at 0.5; see
    ``benchmarks/results/numerics_cpu.json``): reversible networks need bounded branches.

    Raises:
      ValueError: ``num_layers``, ``width`` or ``hidden`` is not a positive int; ``scale`` or
        ``std`` not a finite number >= 0 (NaN and inf gave non-finite weights); ``dtype`` not
        floating (int32 gave all-zero weights).
    """
    for name, value in (("num_layers", num_layers), ("width", width), ("hidden", hidden)):
        positive_int(value, name, "init_mlp")
    for name, value in (("scale", scale), ("std", 0.0 if std is None else std)):
        number = real_scalar(value)  # 0 allowed: zero branches start as the identity map
        if number is None or not (math.isfinite(number) and number >= 0):
            raise ValueError(f"init_mlp: {name} must be a finite number >= 0, got {value!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"init_mlp: dtype must be floating, got {jnp.dtype(dtype).name}")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    # Drawn in float32, then cast: jax.random.normal in bfloat16 has only 128 distinct values
    # (max |z| 2.9), a visibly different distribution (tests/test_mlp.py).
    normal = lambda k, shape, std_: (std_ * jax.random.normal(k, shape)).astype(dtype)
    w_std = lambda fan_in: (scale / fan_in**0.5) if std is None else std
    return {
        "w1": normal(k1, (num_layers, width, hidden), w_std(width)),
        "b1": normal(k2, (num_layers, hidden), 0.01),
        "w2": normal(k3, (num_layers, hidden, width), w_std(hidden)),
        "b2": normal(k4, (num_layers, width), 0.01),
    }


def init_mlp_stack(
    key: jax.Array,
    num_layers: int,
    width: int,
    hidden: int,
    *,
    scale: float = 0.5,
    std: float | None = None,
    dtype: Any = jnp.float32,
) -> tuple[MLPParams, MLPParams]:
    """``(params_f, params_g)`` for ``num_layers`` stacked :func:`mlp_coupling` layers, each half
    of the stream ``width`` wide."""
    kf, kg = jax.random.split(key)
    return (
        init_mlp(kf, num_layers, width, hidden, scale=scale, std=std, dtype=dtype),
        init_mlp(kg, num_layers, width, hidden, scale=scale, std=std, dtype=dtype),
    )


def residual_mlp_loss(
    activation: Any = jax.nn.gelu, *, checkpoint_policy: Any = None
) -> Callable[[Any, jax.Array], jax.Array]:
    """``loss(params, x) = sum(y^2)`` of a ``lax.scan`` stack of residual MLP blocks
    ``h + activation(h @ w1 + b1) @ w2 + b2`` (params as from :func:`init_mlp`), each block
    optionally wrapped in ``jax.checkpoint(policy=checkpoint_policy)`` (a
    ``jax.checkpoint_policies`` rule, not a precision Policy). A non-reversible baseline stack for
    comparing activations and checkpoint policies."""
    policy = checkpoint_policy

    def block(h, p):
        return h + activation(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    if policy is not None:
        block = jax.checkpoint(block, policy=policy, prevent_cse=False)

    def loss(params, x):
        y, _ = jax.lax.scan(lambda h, p: (block(h, p), None), x, params)
        return jnp.sum(y**2)

    return loss


__all__ = [
    "init_mlp",
    "init_mlp_stack",
    "mlp",
    "mlp_coupling",
    "residual_mlp_loss",
]
