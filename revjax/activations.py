r"""Inverted activations: GELU and SiLU that save their output plus one bit, not their input.

After Novikov & Oseledets, "Inverted Activations: Reducing Memory Footprint in Neural Network
Training" (arXiv 2407.15545). The following layer stores the activation's output ``y`` anyway (a
matmul needs its input), so if the backward pass can recover ``f'(x)`` from ``y`` the input ``x``
need not be stored. GELU and SiLU are not injective: each decreases on ``(-inf, x_min)`` and
increases on ``(x_min, inf)``; one bit per element, ``x >= x_min`` (packed 8 per byte along the
last axis, so each device of a mesh packs its own piece), says which branch ``x`` came from,
and then ``x`` is the unique solution of ``f(x) = y`` on that branch.

**Recovering x (our method).** Newton's method on ``f(x) = y`` fails near ``x_min`` where
``f' -> 0``. We solve instead in the variable

    S(x) = sign(x - x_min) sqrt(f(x) - f_min),      target  t = sign * sqrt(y - f_min),

which is smooth and strictly increasing through ``x_min`` with ``S'(x_min) = sqrt(f''(x_min)/2)``
(``S^2 = f - f_min`` gives ``S' = f' / (2 S)``). Start at the linearisation
``x_0 = x_min + t / S'(x_min)`` (and ``x_0 >= y`` on the right branch, where ``f(x) ~ x`` for large
``x``), then 6 Newton steps on ``S``. Deep in the left tail (``y > -1e-2``) ``S`` flattens
(``S -> -sqrt(-f_min)``), so there we start from the function's asymptotics and step Newton on
``log(-f(x)) = log(-y)``, whose slope ``f'/f`` grows like ``|x|``. All of it runs in float32
whatever the activation's dtype.

**Error.** ``y`` is known to float32 round-off ``dy``; ``f'`` as a function of ``y`` has slope
``f''/f'``, so the recovered derivative is exact up to ``|f''/f'| dy`` away from the minimum and
up to ``sqrt(2 f'' dy)`` (about 1e-4) at it. Measured on a dense grid over ``[-20, 20]``
(``tests/test_activations.py``, recorded by ``benchmarks/bench_activations.py``):
``|f'(x_rec) - f'(x)| <= 1.6e-6`` for ``|x - x_min| > 0.1`` and ``<= 1.1e-4`` on the grid, for
all three functions (at every float32 within 1e-3 of the minimum, which the grid mostly
steps over: ``<= 2.1e-4``, the same test file); from bfloat16 outputs, ``<= 7.8e-3`` for
``|x - x_min| > 0.1``; from float16 outputs (3 more mantissa bits), ``<= 1.2e-3`` there and
``<= 7.0e-3`` everywhere. In the far left tail, where ``y`` underflows to 0,
``|f'(x)| < 1e-30`` and the recovered derivative is 0; where ``y`` is tiny but not 0 (tanh GELU
near x = -10, SiLU near x = -50) it is floored at ``-1e-20`` (an absolute error below 1e-20),
so that a second derivative can divide by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_TANH_K = math.sqrt(2.0 / math.pi)  # GELU tanh approximation: 0.5 x (1 + tanh(k (x + a x^3)))
_TANH_A = 0.044715


class _TwoBranch(NamedTuple):
    """A smooth function decreasing on (-inf, x_min) and increasing on (x_min, inf)."""

    name: str
    f: Callable[[jax.Array], jax.Array]
    df: Callable[[jax.Array], jax.Array]
    tail_guess: Callable[[jax.Array], jax.Array]  # x with f(x) ~ y < 0 deep in the left tail
    x_min: float
    f_min: float
    slope: float  # S'(x_min) = sqrt(f''(x_min) / 2)


def _minimum(f, df, start: float) -> tuple[float, float, float]:
    """``(x_min, f(x_min), sqrt(f''(x_min)/2))`` by Newton on ``f' = 0`` in float64 numpy."""
    d2 = lambda x, h=1e-5: (df(x + h) - df(x - h)) / (2 * h)
    x = start
    for _ in range(50):
        x -= df(x) / d2(x)
    return x, f(x), math.sqrt(d2(x) / 2)


def _spec(name, f, df, np_f, np_df, tail_guess, start) -> _TwoBranch:
    x_min, f_min, slope = _minimum(np_f, np_df, start)
    return _TwoBranch(name, f, df, tail_guess, x_min, f_min, slope)


def _np_ndtr(x):
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _np_pdf(x):
    return math.exp(-0.5 * x * x) / _SQRT_2PI


def _np_tanh_gelu(x):
    return 0.5 * x * (1 + math.tanh(_TANH_K * (x + _TANH_A * x**3)))


def _np_tanh_gelu_df(x):
    u = _TANH_K * (x + _TANH_A * x**3)
    t = math.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _TANH_K * (1 + 3 * _TANH_A * x * x)


def _tanh_gelu(x):
    # 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation in the left tail, where 1 + tanh(u)
    # rounds to 0 in float32 for u < -9 and Newton would stall on a flat zero.
    return x * jax.nn.sigmoid(2 * _TANH_K * (x + _TANH_A * x**3))


def _tanh_gelu_df(x):
    s = jax.nn.sigmoid(2 * _TANH_K * (x + _TANH_A * x**3))
    return s + 2 * x * s * (1 - s) * _TANH_K * (1 + 3 * _TANH_A * x * x)


def _log_neg(y):
    return jnp.log(jnp.maximum(-y, jnp.finfo(jnp.float32).tiny))


_ERF_GELU = _spec(
    "gelu (erf)",
    lambda x: x * ndtr(x),
    lambda x: ndtr(x) + x * jnp.exp(-0.5 * x * x) / _SQRT_2PI,
    lambda x: x * _np_ndtr(x),
    lambda x: _np_ndtr(x) + x * _np_pdf(x),
    # y ~ -pdf(x) for x -> -inf
    lambda y: -jnp.sqrt(jnp.maximum(-2.0 * (_log_neg(y) + math.log(_SQRT_2PI)), 0.0)),
    -0.75,
)
_TANH_GELU = _spec(
    "gelu (tanh)",
    _tanh_gelu,
    _tanh_gelu_df,
    _np_tanh_gelu,
    _np_tanh_gelu_df,
    # y ~ x exp(2 k (x + a x^3)) ~ -exp(2 k a x^3) for x -> -inf
    lambda y: -jnp.cbrt(jnp.maximum(-_log_neg(y), 0.0) / (2 * _TANH_K * _TANH_A)),
    -0.75,
)
_SILU = _spec(
    "silu",
    lambda x: x * jax.nn.sigmoid(x),
    lambda x: jax.nn.sigmoid(x) * (1 + x * (1 - jax.nn.sigmoid(x))),
    lambda x: x / (1 + math.exp(-x)),
    lambda x: (1 / (1 + math.exp(-x))) * (1 + x * (1 - 1 / (1 + math.exp(-x)))),
    # y ~ x e^x for x -> -inf: x ~ log(-y) - log(-log(-y))
    lambda y: _log_neg(y) - jnp.log(jnp.maximum(-_log_neg(y), 1.0)),
    -1.25,
)

_NEWTON_STEPS = 6
_TAIL = -1e-2  # below this |y| on the left branch, Newton runs on log(-f)


def _recover_input(spec: _TwoBranch, y: jax.Array, right: jax.Array) -> jax.Array:
    """The ``x`` with ``f(x) = y`` on the branch ``right`` (``x >= x_min``), in float32."""
    y = y.astype(jnp.float32)
    sign = jnp.where(right, 1.0, -1.0)
    t = sign * jnp.sqrt(jnp.maximum(y - spec.f_min, 0.0))
    x = spec.x_min + t / spec.slope
    x = jnp.where(right, jnp.maximum(x, y), x)
    tail = jnp.logical_not(right) & (y > _TAIL)
    x = jnp.where(tail, jnp.minimum(spec.tail_guess(y), x), x)
    log_target = _log_neg(y)
    for _ in range(_NEWTON_STEPS):
        fx, dfx = spec.f(x), spec.df(x)
        s = jnp.where(x >= spec.x_min, 1.0, -1.0) * jnp.sqrt(jnp.maximum(fx - spec.f_min, 0.0))
        near = jnp.abs(s) <= 1e-3  # S' = f'/(2S) is 0/0 at the minimum: use its limit
        s_slope = jnp.where(near, spec.slope, dfx / (2.0 * jnp.where(near, 1.0, s)))
        log_step = (_log_neg(fx) - log_target) * fx / jnp.where(dfx == 0, 1.0, dfx)
        x = x - jnp.where(tail, log_step, (s - t) / s_slope)
    return x


def _split_into_ragged_bytes(mask: jax.Array) -> bool:
    """Whether ``mask``'s last axis is sharded over Explicit mesh axes into pieces that are
    not whole bytes (a length per device not a multiple of 8): packing it would need a reshape
    that JAX refuses across shards. (On an Auto mesh the compiler moves data instead.)"""
    if mask.ndim == 0:
        return False
    sharding = jax.typeof(mask).sharding
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) < mask.ndim or spec[mask.ndim - 1] is None:
        return False
    names = spec[mask.ndim - 1]
    names = (names,) if isinstance(names, str) else names
    devices = math.prod(sharding.mesh.shape[name] for name in names)
    return (mask.shape[-1] // devices) % 8 != 0


def _pack(mask: jax.Array) -> jax.Array:
    """The boolean ``mask`` packed 8 per byte along its last axis (``uint8 (..., ceil(n/8))``),
    so each device packs its own shard: no flattening, which a mesh would have to gather.
    Where the last axis's shards are not whole bytes (:func:`_split_into_ragged_bytes`), the
    mask is kept unpacked, one byte per element."""
    if _split_into_ragged_bytes(mask) or mask.size == 0:  # jnp.unpackbits fails on (0, C)
        return mask
    return jnp.packbits(jnp.atleast_1d(mask), axis=-1)


def _unpack(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The boolean mask of ``shape`` that :func:`_pack` stored as ``bits``."""
    if bits.dtype == jnp.bool_:
        return bits
    count = shape[-1] if shape else 1
    return jnp.unpackbits(bits, axis=-1, count=count).reshape(shape).astype(bool)


_DERIVATIVE_FLOOR = 1e-20


def _branch_derivative(spec: _TwoBranch, x: jax.Array, y: jax.Array, right: jax.Array) -> jax.Array:
    """``f'(x)`` for a recovered ``x``, given the sign its branch fixes and ``|f'| >= 1e-20``.

    Next to the minimum ``f'`` rounds to exactly 0 at a few float32 points; a second-order
    derivative multiplies by ``f'`` and divides by it again (see :func:`_differentiable_recovery`),
    so a zero there would silently drop ``f''``. On the left branch where ``y`` underflowed to 0
    (``|f'(x)| < 1e-30``) the derivative is 0."""
    dfx = spec.df(x)
    floored = jnp.where(
        right, jnp.maximum(dfx, _DERIVATIVE_FLOOR), jnp.minimum(dfx, -_DERIVATIVE_FLOOR)
    )
    # The floor must not hide f'' from a second-order grad: add a zero that carries df's tangent.
    dfx = jax.lax.stop_gradient(floored) + (dfx - jax.lax.stop_gradient(dfx))
    return jnp.where(jnp.logical_not(right) & (y == 0), 0.0, dfx)


def _differentiable_recovery(
    spec: _TwoBranch, second_order: bool = True
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """:func:`_recover_input` with the implicit-function derivative ``dx/dy = 1 / f'(x)``.

    Differentiating the Newton iterations themselves (what a second-order ``jax.grad`` would
    otherwise do) is wrong: their ``log``/``sqrt``/``maximum`` guards give NaN in the left tail
    and the iterates' derivative is not ``1/f'``. The divisor is :func:`_branch_derivative`, the
    same value the first-order backward uses, so ``(dx/dy) (dy/dx) = 1`` exactly and the second
    derivative is ``f''(x_rec)``; where that value is 0 (underflowed left tail) the tangent is 0.
    A third derivative raises ``NotImplementedError``, and so does a second one when
    ``second_order`` is False (float16 activations: the cotangent of the saved output, about
    ``f''/f'``, overflows float16's range of 65504 next to the minimum)."""

    @jax.custom_jvp
    def recover(y, right):
        return _recover_input(spec, y, right)

    @recover.defjvp
    def recover_jvp(primals, tangents):
        if not second_order:
            raise NotImplementedError(
                f"revjax.activations ({spec.name}): second derivatives of a float16 activation "
                "are not supported (the saved output's cotangent, about f''/f', overflows "
                "float16 next to the minimum); use bfloat16 or float32, or jax.nn"
            )
        y, right = primals
        x = recover(y, right)
        return x, tangents[0] * _reciprocal_no_higher_order(_branch_derivative(spec, x, y, right))

    return recover


@jax.custom_jvp
def _reciprocal_no_higher_order(dfx: jax.Array) -> jax.Array:
    """``1 / f'`` (0 where ``f' = 0``) that refuses to be differentiated: that happens only
    for third and higher derivatives of an inverted activation, where ``f''/f'^3`` overflows
    float32 in the tails and would come out as NaN."""
    nonzero = dfx != 0
    return jnp.where(nonzero, 1.0 / jnp.where(nonzero, dfx, 1.0), 0.0)


@_reciprocal_no_higher_order.defjvp
def _reciprocal_jvp(primals, tangents):
    raise NotImplementedError(
        "revjax.activations: gelu/silu support first and second derivatives (jax.grad, grad "
        "of grad, jax.jacrev of jax.grad); a third or higher derivative was requested. Use "
        "jax.nn.gelu / jax.nn.silu for that."
    )


def _inverted(spec: _TwoBranch) -> Callable[[jax.Array], jax.Array]:
    recover_any, recover_first_order = (
        _differentiable_recovery(spec),
        _differentiable_recovery(spec, second_order=False),
    )

    @jax.custom_vjp
    def activation(x):
        return spec.f(x.astype(jnp.float32)).astype(x.dtype)

    def fwd(x):
        y = activation(x)
        return y, (y, _pack(x.astype(jnp.float32) >= spec.x_min))  # x_min not rounded to x.dtype

    def bwd(residuals, g):
        y, bits = residuals
        right = _unpack(bits, y.shape)
        y32 = y.astype(jnp.float32)
        recover = recover_first_order if y.dtype == jnp.float16 else recover_any
        dfx = _branch_derivative(spec, recover(y32, right), y32, right)
        return ((g.astype(jnp.float32) * dfx).astype(g.dtype),)

    activation.defvjp(fwd, bwd)
    return activation


_GELU_TANH, _GELU_ERF, _SILU_FN = (_inverted(s) for s in (_TANH_GELU, _ERF_GELU, _SILU))


def _check_float(x: jax.Array, name: str) -> jax.Array:
    """``x`` as an array of a supported dtype: float32, bfloat16 or float16."""
    python_float = isinstance(x, float)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"revjax.activations.{name}: expected a floating array, got {x.dtype}")
    if jnp.finfo(x.dtype).bits > 32:
        hint = (
            f" (a Python float is float64 with jax_enable_x64 on: pass jnp.float32({x.item()!r}))"
            if python_float
            else ""
        )
        raise TypeError(
            f"revjax.activations.{name}: computes and recovers in float32, so a {x.dtype} input "
            f"would silently lose precision{hint}; use jax.nn.{name} for {x.dtype}"
        )
    if jnp.finfo(x.dtype).bits < 16:
        # From 2-3 mantissa bits the recovered input is off by far more than the documented
        # bounds, and its second derivative near the minimum was NaN.
        raise TypeError(
            f"revjax.activations.{name}: a {x.dtype} output is too coarse to recover the input "
            f"from; use float32, bfloat16 or float16, or jax.nn.{name} for {x.dtype}"
        )
    return x


def _reverse_mode_only(activation: Callable[[jax.Array], jax.Array], x: jax.Array, name: str):
    """``activation(x)``, with a way out added to JAX's bare TypeError when forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) meets the custom_vjp. Caught where the
    activation is traced, so a JVP applied to an already traced jaxpr still gets JAX's text
    alone."""
    try:
        return activation(x)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(
            f"{err}\n\nrevjax.activations.{name} is a jax.custom_vjp (it saves its output and "
            "one bit instead of its input), so it has reverse-mode derivatives only: for a "
            "second derivative use reverse over reverse, jax.jacrev(jax.grad(f)), instead of "
            f"jax.hessian (forward over reverse); for forward mode use jax.nn.{name}."
        ) from err


def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """``jax.nn.gelu`` (same ``approximate`` default) whose backward pass stores ``gelu(x)`` and
    one bit per element instead of ``x``. Any shape; float32, bfloat16 or float16 (computes in
    float32; float64 raises ``TypeError``).

    Reverse mode only (a ``jax.custom_vjp``): ``jax.jvp``/``jax.jacfwd``/``jax.hessian`` raise
    ``TypeError`` (JAX's message, plus the way out), so Moonwalk's forward-mode methods
    (``"moonwalk"``, ``"forward"``, ``"projected_forward"``) need ``jax.nn.gelu``
    (``"mixed_moonwalk"`` takes this one, its ``dense`` Jacobians too). First and second
    derivatives (``grad``, ``grad`` of ``grad``, ``jax.jacrev(jax.grad(...))``); a third raises
    ``NotImplementedError``, as does a second for float16 (it overflows float16's range).

    Raises:
      TypeError: a non-floating or float64 ``x``; forward-mode differentiation."""
    x = _check_float(x, "gelu")
    return _reverse_mode_only(_GELU_TANH if approximate else _GELU_ERF, x, "gelu")


def silu(x: jax.Array) -> jax.Array:
    """``jax.nn.silu`` whose backward pass stores ``silu(x)`` and one bit per element. Same
    dtypes, derivative orders and errors as :func:`gelu`."""
    return _reverse_mode_only(_SILU_FN, _check_float(x, "silu"), "silu")


def derivative_error(fn: str, x: jax.Array) -> jax.Array:
    """``|f'(recovered x) - f'(x)|`` elementwise for ``fn`` in {"gelu_tanh", "gelu_erf", "silu"},
    with ``y = f(x)`` rounded to ``x``'s dtype and ``f'(x)`` the float32 derivative at ``x``.

    Raises:
      ValueError: an unknown ``fn``.
    """
    specs = {"gelu_tanh": _TANH_GELU, "gelu_erf": _ERF_GELU, "silu": _SILU}
    if fn not in specs:
        raise ValueError(f"derivative_error: fn must be one of {sorted(specs)}, got {fn!r}")
    spec = specs[fn]
    x32 = x.astype(jnp.float32)
    y = spec.f(x32).astype(x.dtype)
    right = x32 >= spec.x_min
    y32 = y.astype(jnp.float32)
    dfx = _branch_derivative(spec, _recover_input(spec, y32, right), y32, right)
    return jnp.abs(dfx - spec.df(x32))


MINIMA = {
    "gelu_tanh": _TANH_GELU.x_min,
    "gelu_erf": _ERF_GELU.x_min,
    "silu": _SILU.x_min,
}

__all__ = ["MINIMA", "derivative_error", "gelu", "silu"]
