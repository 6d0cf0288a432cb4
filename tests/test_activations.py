"""activations: inverted GELU/SiLU equal jax.nn's, recover f'(x) from (y, bit), save memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from revjax import activations as act
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp, residual_mlp_loss

FUNCTIONS = {
    "gelu_tanh": (act.gelu, jax.nn.gelu),
    "gelu_erf": (
        lambda x: act.gelu(x, approximate=False),
        lambda x: jax.nn.gelu(x, approximate=False),
    ),
    "silu": (act.silu, jax.nn.silu),
}
GRID = jnp.linspace(-20.0, 20.0, 400_001, dtype=jnp.float32)


def far_from_minimum(fn, x):
    return np.abs(np.asarray(x, np.float32) - act.MINIMA[fn]) > 0.1


@pytest.mark.parametrize("fn", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 5)])
def test_values_shapes_and_dtypes_match_jax_nn(fn, dtype, shape):
    ours, reference = FUNCTIONS[fn]
    x = (3.0 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)
    y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    # Our forward computes in float32 with a cancellation-free formula: equal to jax.nn's to
    # a few ulps of the dtype (float32: 1e-6 absolute for |y| <= 10).
    tolerance = {jnp.float32: 1e-6, jnp.bfloat16: 6e-2, jnp.float16: 1e-2}[dtype]
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(reference(x), np.float32), atol=tolerance
    )
    # The tolerance above is jax.nn's own low-precision error (it computes in bf16/f16), too
    # loose to see ours doing the same: ours is the float32 value rounded once, to 1 ulp.
    rounded = np.asarray(reference(x.astype(jnp.float32)).astype(dtype), np.float32)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(y, np.float32), rounded, rtol=eps, atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(ours(v).astype(jnp.float32)))(x)
    assert g.shape == x.shape and g.dtype == x.dtype


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_float32_derivative_recovery_on_a_dense_grid(fn):
    """The issue's bounds: 1e-5 for |x - x_min| > 0.1, 1e-3 everywhere; measured at most 1.6e-6
    and 1.1e-4 on this grid (step 1e-4 over [-20, 20])."""
    error = np.asarray(act.derivative_error(fn, GRID))
    far = far_from_minimum(fn, GRID)
    assert error[far].max() <= 1e-5
    assert error.max() <= 1e-3


def every_float32_near_the_minimum(fn: str, radius: float = 1e-3) -> jax.Array:
    """Every float32 within ``radius`` of ``fn``'s minimum, ascending (all negative: the bit
    patterns of their magnitudes are consecutive integers)."""
    ends = np.abs(np.float32([act.MINIMA[fn] - radius, act.MINIMA[fn] + radius]))
    low, high = sorted(ends.view(np.uint32))
    bits = np.arange(int(low), int(high) + 1, dtype=np.int64)[::-1].astype(np.uint32)
    return jnp.asarray(-bits.view(np.float32))


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_derivatives_at_every_float32_next_to_the_minimum(fn):
    """The dense grid (step 1e-4) steps over most float32s next to the minimum, where the
    recovery is least accurate: at the points between, the first derivative's error reached
    2.1e-4 (the grid saw 1.1e-4) and the second's 4.2e-4 (the grid: 1.8e-4), measured here
    (every float32 within 1e-3 of each minimum, 17-34 thousand points). Bounds: the issue's
    1e-3, revjax's 3e-4 for the first derivative; the grid test's 5e-4 for the second."""
    ours, reference = FUNCTIONS[fn]
    x = every_float32_near_the_minimum(fn)
    assert x.size > 10_000 and bool(jnp.all(jnp.diff(x) > 0))  # consecutive, none skipped
    assert float(x[0]) < act.MINIMA[fn] < float(x[-1])
    assert np.asarray(act.derivative_error(fn, x)).max() <= 3e-4
    second = np.abs(np.asarray(second_derivative(ours, x) - second_derivative(reference, x)))
    assert bool(np.all(np.isfinite(second))) and second.max() <= 5e-4


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_bfloat16_derivative_recovery_on_a_dense_grid(fn):
    """The issue's bound, 1e-2 for |x - x_min| > 0.1 against the float32 derivative at the bf16
    input (the paper tested at 2e-2); measured at most 7.8e-3."""
    x = GRID.astype(jnp.bfloat16)
    error = np.asarray(act.derivative_error(fn, x))
    assert error[far_from_minimum(fn, x)].max() <= 1e-2


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_float16_derivative_recovery_on_a_dense_grid(fn):
    """The issue states no float16 bound; revjax's: 2e-3 for |x - x_min| > 0.1 and 1e-2
    everywhere, against the float32 derivative at the float16 input. The error follows the
    saved output's round-off (module doc), and float16 keeps 3 more mantissa bits than bf16, so
    it is about 8x smaller: measured at most 1.2e-3 away from the minimum and 7.0e-3 at it."""
    x = GRID.astype(jnp.float16)
    error = np.asarray(act.derivative_error(fn, x))
    assert error[far_from_minimum(fn, x)].max() <= 2e-3
    assert error.max() <= 1e-2


@pytest.mark.parametrize("fn", list(FUNCTIONS))
@given(
    x=hnp.arrays(
        np.float32,
        64,
        # Every element drawn (no repeated fill value), many near the minima (GELU -0.75,
        # SiLU -1.28), where the recovery is hardest.
        elements=st.floats(-20, 20, width=32) | st.floats(-1.5, -0.5, width=32),
        fill=st.nothing(),
    )
)
def test_derivative_recovery_property(fn, x):
    error = np.asarray(act.derivative_error(fn, jnp.asarray(x)))
    far = far_from_minimum(fn, x)
    assert error[far].max(initial=0.0) <= 1e-5
    assert error.max() <= 1e-3


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_custom_vjp_gradient_is_the_recovered_derivative(fn):
    """The public function's gradient: g * f'(recovered x), within the same bounds of the true
    derivative (jax.grad of jax.nn's function, evaluated at float32 inputs)."""
    ours, reference = FUNCTIONS[fn]
    x = GRID[::10]
    g = jax.random.normal(jax.random.key(1), x.shape)
    grad = jax.grad(lambda v: jnp.sum(ours(v) * g))(x)
    true = jax.vmap(jax.grad(reference))(x) * g
    far = far_from_minimum(fn, x)
    # jax.nn's own float32 derivative carries round-off of a few 1e-6 (tanh form), so 2e-5.
    scaled = np.abs(grad - true) / np.maximum(np.abs(np.asarray(g)), 1.0)
    assert np.max(scaled[far]) <= 2e-5
    # Everywhere, the minimum included: the 1e-3, against this independent derivative.
    assert np.max(scaled) <= 1e-3


@pytest.mark.parametrize("fn", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradient_is_the_float32_derivative_within_the_bounds(fn, dtype):
    """The shipped bf16/f16 gradient (custom_vjp, bit packing, casts), not only the recovery
    that ``derivative_error`` measures, against jax.nn's float32 derivative at the input, with
    the bounds of the dense-grid tests above (the gradient is also rounded to the input's
    dtype, within them): bf16 1e-2 away from the minimum; f16 2e-3 away, 1e-2 everywhere."""
    ours, reference = FUNCTIONS[fn]
    x = GRID.astype(dtype)
    grad = jax.grad(lambda v: jnp.sum(ours(v).astype(jnp.float32)))(x)
    assert grad.dtype == dtype
    true = jax.vmap(jax.grad(reference))(x.astype(jnp.float32))
    error = np.abs(np.asarray(grad, np.float32) - np.asarray(true))
    far = far_from_minimum(fn, x)
    assert error[far].max() <= (1e-2 if dtype == jnp.bfloat16 else 2e-3)
    if dtype == jnp.float16:
        assert error.max() <= 1e-2


@pytest.mark.parametrize("fn", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_next_to_the_minimum_keep_their_branch(fn, dtype):
    """The branch bit compares the input with the float32 minimum: compared in bfloat16, x_min
    rounded onto the input's grid and the bf16 neighbour just left of the true minimum was
    put on the right branch (gradient +1e-2 where the true derivative is -6e-4)."""
    ours, reference = FUNCTIONS[fn]
    x_min = jnp.asarray(act.MINIMA[fn], dtype)
    ulp = jnp.finfo(dtype).eps * abs(act.MINIMA[fn])
    x = (x_min + jnp.arange(-4, 5, dtype=jnp.float32) * ulp).astype(dtype)
    grad = jax.vmap(jax.grad(lambda v: ours(v).astype(jnp.float32)))(x)
    true = jax.vmap(jax.grad(reference))(x.astype(jnp.float32))
    # The magnitude is as good as the low-precision output allows; the sign is the bit's.
    assert np.all(np.sign(np.asarray(grad)) * np.sign(np.asarray(true)) >= 0), (x, grad, true)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="expected a floating array, got int32"):
        act.gelu(jnp.arange(3))


def test_float64_is_refused_not_silently_rounded():
    """The activation and the recovery run in float32; a float64 input was rounded silently."""
    assert act.gelu(np.ones(3)).dtype == jnp.float32  # NumPy float64 is float32 without x64
    with jax.enable_x64(True):
        x = jnp.ones(3, jnp.float64)
        with pytest.raises(TypeError, match="float64 input would silently lose precision"):
            act.silu(x)
        # A Python float is float64 here too; the message says how to pass float32.
        with pytest.raises(TypeError, match=r"a Python float is float64 .* jnp.float32\(0.5\)"):
            act.gelu(0.5)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_is_refused(dtype):
    """float8 passed the dtype check: its 2-3 mantissa bits recover the input far outside the
    documented bounds, and the second derivative near GELU's minimum came back NaN."""
    for fn in (act.gelu, act.silu):
        with pytest.raises(TypeError, match=f"a {jnp.dtype(dtype).name} output is too coarse"):
            fn(jnp.ones(3, dtype))


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_reverse_mode_only_as_documented(fn):
    """A custom_vjp has no forward-mode rule: README and docstrings say so, and this pins it
    (if JAX ever adds one, the docs must change)."""
    ours, _ = FUNCTIONS[fn]
    x = jnp.linspace(-3.0, 3.0, 7)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(ours, (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_hessian_error_keeps_jax_text_and_names_the_way_out(fn):
    """jax.hessian (forward over reverse) gave JAX's bare 'can't apply forward-mode autodiff
    (jvp) to a custom_vjp function'; now the same TypeError also says what works."""
    ours, reference = FUNCTIONS[fn]
    name = fn.split("_")[0]
    f = lambda v: jnp.sum(ours(v))
    x = jnp.linspace(-2.0, 2.0, 3)
    with pytest.raises(TypeError) as info:
        jax.hessian(f)(x)
    message = str(info.value)
    assert "can't apply forward-mode autodiff (jvp) to a custom_vjp function" in message
    assert f"revjax.activations.{name} is a jax.custom_vjp" in message
    assert "jax.jacrev(jax.grad(f))" in message and f"jax.nn.{name}" in message
    # The way out it names works and is otherwise unchanged: jacrev of grad is the Hessian.
    expected = jax.hessian(lambda v: jnp.sum(reference(v)))(x)
    np.testing.assert_allclose(jax.jacrev(jax.grad(f))(x), expected, atol=1e-5)


def second_derivative(f, x):
    return jax.vmap(jax.grad(jax.grad(f)))(x)


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_second_derivative_on_a_dense_grid(fn):
    """grad of grad goes through the recovery by the implicit-function rule dx/dy = 1/f'(x).
    Differentiating the Newton steps instead gave NaN for x < -7.2 (tanh GELU) / -9.5 (erf GELU),
    an error of 5e-3 next to GELU's minimum and 0 instead of f'' at the few float32 points next
    to SiLU's minimum where f' rounds to 0 (error 0.22). Measured with the fix: <= 2.5e-5 away
    from the minimum (tanh GELU's f'' is computed in a different form than jax.nn's) and
    <= 1.8e-4 at it, where x itself is only known to sqrt(float32 eps) (module docstring)."""
    ours, reference = FUNCTIONS[fn]
    got, want = second_derivative(ours, GRID), second_derivative(reference, GRID)
    assert bool(jnp.all(jnp.isfinite(got)))
    err = np.abs(np.asarray(got) - np.asarray(want))
    assert err[far_from_minimum(fn, GRID)].max() <= 5e-5
    assert err.max() <= 5e-4


def test_hessian_of_a_small_network_matches_jax_nn():
    x = jax.random.normal(jax.random.key(0), (32, 8))
    w = jax.random.normal(jax.random.key(1), (8, 8))
    hessian = lambda act_fn: jax.jacrev(jax.grad(lambda w: jnp.sum(act_fn(x @ w) ** 2)))(w)
    ours, reference = hessian(act.gelu), hessian(jax.nn.gelu)
    # Measured 5.5e-6: the recovered x near the minimum (see above); 2e-5 leaves a 3.6x margin.
    assert float(jnp.linalg.norm(ours - reference) / jnp.linalg.norm(reference)) <= 2e-5


@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_third_derivative_is_refused(fn):
    """f''/f'^3 overflows float32 in the tails, so a third derivative would be NaN there."""
    ours, _ = FUNCTIONS[fn]
    with pytest.raises(NotImplementedError, match="first and second derivatives"):
        jax.grad(jax.grad(jax.grad(ours)))(0.5)
    # float16: the saved output's cotangent f''/f' exceeds 65504 next to the minimum (it was
    # inf at about 30 points of a 1e-3 grid on [-6, 6]), so a second derivative is refused.
    with pytest.raises(NotImplementedError, match="second derivatives of a float16 activation"):
        jax.grad(jax.grad(ours))(jnp.float16(act.MINIMA[fn]))
    assert jnp.isfinite(jax.grad(ours)(jnp.float16(0.5)))  # first order is unaffected


def residual_mlp_gradient(activation, depth=16, width=256, hidden=1024, batch=512):
    params = jax.eval_shape(lambda: init_mlp(jax.random.key(0), depth, width, hidden))
    x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
    return compiled_memory(jax.grad(residual_mlp_loss(activation)), params, x).temp_bytes


def test_inverted_gelu_saves_memory_in_a_residual_mlp_stack():
    """16 residual MLP blocks, width 256, hidden 1024, batch 512: measured 52.5 MiB with the
    inverted GELU vs 207 MiB with jax.nn.gelu (0.25; the issue's bound is 0.3). dots_saveable
    checkpointing reaches 49 MiB by recomputing GELU instead (benchmarked, not asserted)."""
    inverted = residual_mlp_gradient(act.gelu)
    plain = residual_mlp_gradient(jax.nn.gelu)
    assert inverted <= 0.3 * plain, (inverted, plain)


def test_derivative_error_refuses_an_unknown_function_by_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"one of \['gelu_erf', 'gelu_tanh', 'silu'\], got 'relu'"):
        act.derivative_error("relu", GRID)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0,), (3, 0)])
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_empty_arrays_get_an_empty_gradient(name, shape):
    """An empty batch of 8 features, (0, 8), failed in the backward pass (jnp.unpackbits
    divided by zero reshaping the mask); jax.nn returns an empty gradient, as now does revjax."""
    fn = getattr(act, name)
    x = jnp.zeros(shape)
    g = jax.grad(lambda v: fn(v).sum())(x)
    assert g.shape == shape and g.dtype == x.dtype
