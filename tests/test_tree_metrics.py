"""_tree_metrics (public through revjax.diagnostics): relative error of pytrees at the
float32 extremes, bit equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revjax import diagnostics
from revjax._tree_metrics import bitwise_equal, relative_error


def test_diagnostics_re_exports_the_same_functions():
    assert diagnostics.relative_error is relative_error
    assert diagnostics.bitwise_equal is bitwise_equal


def test_relative_error_is_joint_norm_over_leaves():
    ref = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    approx = {"a": jnp.array([3.0, 1.0]), "b": jnp.array([4.0])}
    assert float(relative_error(approx, ref)) == pytest.approx(1.0 / 5.0)
    assert float(relative_error(ref, ref)) == 0.0


def test_relative_error_refuses_different_shapes():
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3, 1\) in approx but \(3,\)"):
        relative_error({"w": jnp.ones((3, 1))}, {"w": jnp.ones(3)})


def test_relative_error_of_huge_values_does_not_overflow():
    """Squares of 1e30 overflow float32; the error is still 1/5 (and NaN stays NaN)."""
    ref = {"a": jnp.array([3e30, 0.0]), "b": jnp.array([4e30])}
    approx = {"a": jnp.array([3e30, 1e30]), "b": jnp.array([4e30])}
    assert float(relative_error(approx, ref)) == pytest.approx(1.0 / 5.0, rel=1e-6)
    assert np.isnan(float(relative_error(jnp.array([jnp.nan, 1.0]), jnp.ones(2))))
    # A non-finite reference is never reported as agreement.
    assert np.isnan(float(relative_error(jnp.ones(1), jnp.array([jnp.nan]))))
    assert np.isnan(float(relative_error(jnp.array([jnp.inf]), jnp.ones(1))))


def test_relative_error_zero_reference():
    assert float(relative_error(jnp.zeros(3), jnp.zeros(3))) == 0.0
    assert float(relative_error(jnp.ones(3), jnp.zeros(3))) == float("inf")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_relative_error_at_the_float32_extremes(jit):
    """Near the float32 limits a scale with a subnormal reciprocal (flushed to zero by XLA on
    CPU), a difference that overflows, or squares that underflow all once gave 0 or inf here.
    Powers of two are exact, so the expected values hold to float32 rounding."""
    err = jax.jit(relative_error) if jit else relative_error
    assert float(err(jnp.array([5e37]), jnp.array([1e38]))) == pytest.approx(0.5, rel=1e-6)
    assert float(err(jnp.array([-3e38]), jnp.array([3e38]))) == pytest.approx(2.0, rel=1e-6)
    assert float(err(jnp.array([1e20]), jnp.array([1.0]))) == pytest.approx(1e20, rel=1e-6)
    assert float(err(jnp.array([1.5e-30]), jnp.array([1e-30]))) == pytest.approx(0.5, rel=1e-5)
    assert float(err(jnp.array([1e-30]), jnp.zeros(1))) == float("inf")


def test_relative_error_edge_inputs():
    assert float(relative_error((), ())) == 0.0  # no leaves: nothing differs
    with pytest.raises(TypeError, match="complex leaves"):
        relative_error(jnp.array([1.0 + 1.0j]), jnp.array([1.0 + 0.0j]))


def test_bitwise_equal_compares_bits():
    x = {"a": jnp.array([1.0, -0.0, jnp.nan]), "b": jnp.arange(3)}
    assert bool(bitwise_equal(x, x))
    assert bool(jax.jit(bitwise_equal)(x, x))
    assert not bool(bitwise_equal({**x, "a": jnp.array([1.0, 0.0, jnp.nan])}, x))  # -0 vs +0
    assert not bool(bitwise_equal({**x, "b": jnp.arange(3.0)}, x))  # dtype differs
    assert not bool(bitwise_equal({**x, "b": jnp.array([0, 1, 3])}, x))
    assert not bool(bitwise_equal((x["a"],), x))  # structure differs
    z = jnp.array([1.0 + 0.0j])
    assert bool(bitwise_equal(z, z))
    assert not bool(bitwise_equal(z, jnp.array([complex(1.0, -0.0)])))  # imaginary -0 vs +0


def test_bitwise_equal_keeps_numpy_float64_leaves_as_given():
    """Found by a probe: without x64, ``jnp.asarray`` turned NumPy float64 into float32 first,
    so two different float64 arrays compared equal, and a float64 equalled a float32."""
    a = np.array([0.1, -0.0, np.nan])
    b = np.nextafter(a, 1.0)  # differs from a in the last bit of each entry
    assert not bool(bitwise_equal(a, b))
    assert bool(bitwise_equal(a, a.copy()))
    assert not bool(bitwise_equal(a, np.array([0.1, 0.0, np.nan])))  # -0 vs +0 on the host
    assert not bool(bitwise_equal(jnp.array([0.1], jnp.float32), np.array([0.1])))
    assert bool(bitwise_equal(np.float32(0.5), jnp.float32(0.5)))  # same dtype, mixed kinds
    h = np.array([1.0, -0.0], jnp.bfloat16)  # NumPy's issubdtype does not know bfloat16
    assert not bool(bitwise_equal(h, np.array([1.0, 0.0], jnp.bfloat16)))


def test_relative_error_rejects_different_structures():
    with pytest.raises(ValueError, match="structure"):
        relative_error({"a": jnp.ones(2)}, (jnp.ones(2),))


def test_relative_error_keeps_float64():
    """float64 leaves (x64 on) are compared in float64: a 1e-9 difference was 0 in float32,
    and values around 1e200 (beyond float32) were NaN."""
    with jax.enable_x64(True):
        one = jnp.ones(3, jnp.float64)
        error = relative_error(one + 1e-9, one)
        assert error.dtype == jnp.float64
        assert float(error) == pytest.approx(1e-9, rel=1e-6)
        assert float(relative_error(1e200 * (one + 1e-3), 1e200 * one)) == pytest.approx(1e-3)
        assert float(relative_error(1e-200 * (one + 1e-3), 1e-200 * one)) == pytest.approx(1e-3)
        # Mixed float32/float64 trees are compared in float64 too.
        assert float(relative_error((one + 1e-9, jnp.ones(2)), (one, jnp.ones(2)))) > 0


def test_relative_error_counts_float0_leaves_as_zeros():
    """Gradients w.r.t. integer inputs (``allow_int``) are float0 arrays; they failed."""
    grads = jax.grad(lambda p: p[0] * 2.0, allow_int=True)((jnp.float32(1.0), jnp.int32(3)))
    assert grads[1].dtype == jax.dtypes.float0
    assert float(relative_error(grads, grads)) == 0.0
    shifted = (grads[0] + 1.0, grads[1])
    assert float(relative_error(shifted, grads)) == pytest.approx(0.5)


@pytest.mark.parametrize("jit", [False, True])
def test_bitwise_equal_compares_keys_by_implementation_and_data(jit):
    """An NNX model's state holds PRNG keys (``nnx.Rngs``, ``Dropout``): comparing two states
    raised ``TypeError: Cannot interpret 'key<fry>' as a data type``."""
    check = jax.jit(bitwise_equal) if jit else bitwise_equal
    state = {"w": jnp.ones(3), "key": jax.random.key(0)}
    assert bool(check(state, {"w": jnp.ones(3), "key": jax.random.key(0)}))
    assert not bool(check(state, {"w": jnp.ones(3), "key": jax.random.key(1)}))
    other_impl = jax.random.key(0, impl="rbg")  # same seed, another implementation
    assert not bool(bitwise_equal(jax.random.key(0), other_impl))
    raw = jax.random.key_data(jax.random.key(0))  # the same bits, but not a key
    assert not bool(bitwise_equal(jax.random.key(0), raw))


def test_bitwise_equal_of_float0_leaves_under_jit():
    """``float0`` gradients (of integer inputs, ``allow_int``) have no bits; under ``jit`` the
    comparison raised ``TypeError: Called equal with a float0 array``."""
    grads = jax.grad(lambda p: p["w"].sum(), allow_int=True)({"w": jnp.ones(3), "i": jnp.arange(3)})
    assert grads["i"].dtype == jax.dtypes.float0
    assert bool(bitwise_equal(grads, grads))
    assert bool(jax.jit(bitwise_equal)(grads, grads))
    other = {"w": jnp.full(3, 2.0), "i": grads["i"]}
    assert not bool(jax.jit(bitwise_equal)(grads, other))


def test_relative_error_refuses_key_leaves_by_name():
    """A key has no error to measure: ``relative_error`` named no leaf (``Cannot determine dtype
    of key<fry>``); now it names the leaf and says what to compare instead."""
    state = {"w": jnp.ones(3), "rngs": {"key": jax.random.key(0)}}
    with pytest.raises(TypeError, match=r"leaf \['rngs'\]\['key'\] is a PRNG key array"):
        relative_error(state, state)


@pytest.mark.parametrize(
    "approx, reference, expected",
    [
        ([1e-300], [2e-300], 0.5),  # was 0.0: both rounded to float32's 0
        ([1e300], [2e300], 0.5),  # was NaN: both rounded to inf
        ([1.0 + 1e-12], [1.0], (1.0 + 1e-12) - 1.0),  # was 0.0: below float32's ulp
        ([1.7e308], [-1.7e308], 2.0),  # a - r overflows float64: rescaled
    ],
)
def test_relative_error_of_numpy_float64_without_x64_is_taken_in_float64(
    approx, reference, expected
):
    """NumPy float64 leaves were cast to float32 (JAX without x64): finite inputs gave a
    misleading 0 or a NaN. They are compared on the host in float64."""
    assert not jax.config.jax_enable_x64
    error = relative_error(np.array(approx), np.array(reference))
    assert isinstance(error, np.float64)
    np.testing.assert_allclose(error, expected, rtol=1e-9)


def test_relative_error_of_integers_above_float32_digits():
    """int32 2^24 + 1 and 2^24 are one float32 apart from nothing: 0 instead of 6.0e-8."""
    error = relative_error(jnp.array([2**24 + 1]), jnp.array([2**24]))
    np.testing.assert_allclose(error, 2.0**-24, rtol=1e-12)
    both_zero = relative_error(np.zeros(3, np.int64), np.zeros(3, np.int64))
    assert float(both_zero) == 0.0
    assert float(relative_error(np.zeros(2), np.full(2, 1e-300))) == 1.0
    assert np.isnan(relative_error(np.array([np.inf]), np.array([1.0])))
    under_jit = jax.jit(relative_error)(jnp.array([3]), jnp.array([4]))  # tracers: device path
    assert isinstance(under_jit, jax.Array) and float(under_jit) == pytest.approx(0.25)


def test_bitwise_equal_compares_python_numbers_exactly():
    """A Python float was rounded to float32 first (1.0 and 1.0 + 1e-12 were "equal") and a
    Python int above 2^31 raised OverflowError."""
    assert not bool(bitwise_equal(1.0, 1.0 + 1e-12))
    assert not bool(bitwise_equal(2**40, 2**40 + 1)) and bool(bitwise_equal(2**40, 2**40))
    assert not bool(bitwise_equal(0.0, -0.0)) and not bool(bitwise_equal(1.0, 1))
    assert bool(bitwise_equal({"lr": 0.1, "steps": 3}, {"lr": 0.1, "steps": 3}))
