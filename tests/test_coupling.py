"""Couplings: invertibility (property-tested), fused backward == autodiff, log-det, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reconstruction_checks import check_reconstruction_across_depth

import revjax as rj
from revjax.coupling import reconstruct_and_vjp
from revjax.diagnostics import relative_error
from revjax.models.mlp import init_mlp_stack, mlp


def dense(p, h, key=None):
    """A small non-invertible branch: tanh(h @ w + b) @ v, mapping width_in -> width_out."""
    z = jnp.tanh(h @ p["w"] + p["b"])
    if key is not None:  # dropout-like noise, to check keys are threaded consistently
        z = z * jax.random.bernoulli(key, 0.8, z.shape) / 0.8
    return z @ p["v"]


def init_dense(rng, width_in, width_out, hidden=16):
    # numpy draws: hypothesis varies shapes, and a jax.random call per new shape compiles.
    return {
        "w": jnp.asarray(rng.normal(size=(width_in, hidden)) / width_in**0.5, jnp.float32),
        "b": jnp.asarray(0.1 * rng.normal(size=(hidden,)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(hidden, width_out)) / hidden**0.5, jnp.float32),
    }


def affine_branch(p, h, key=None):
    return dense(p["s"], h, key), dense(p["t"], h)


def init_affine(rng, width_in, width_out):
    return {"s": init_dense(rng, width_in, width_out), "t": init_dense(rng, width_in, width_out)}


def make_case(kind, seed, batch, w1, w2):
    """(block, params, x) for one coupling kind, with halves of widths w1 and w2."""
    rng = np.random.default_rng(seed)
    k = [rng] * 4
    x = (
        jnp.asarray(rng.normal(size=(batch, w1)), jnp.float32),
        jnp.asarray(2.0 * rng.normal(size=(batch, w2)), jnp.float32),
    )
    if kind == "additive":
        return (
            rj.additive_coupling(dense, dense),
            (init_dense(k[2], w2, w1), init_dense(k[3], w1, w2)),
            x,
        )
    if kind == "affine":
        block = rj.affine_coupling(affine_branch, affine_branch)
        return block, (init_affine(k[2], w2, w1), init_affine(k[3], w1, w2)), x
    if kind == "sequence":  # additive, swap, affine: the swap needs equal widths
        x = (x[0], x[1][:, :w1] if w2 >= w1 else jnp.pad(x[1], ((0, 0), (0, w1 - w2))))
        block = rj.sequence(
            rj.additive_coupling(dense, dense),
            rj.swap(),
            rj.affine_coupling(affine_branch, affine_branch),
        )
        params = (
            (init_dense(k[2], w1, w1), init_dense(k[3], w1, w1)),
            None,
            (init_affine(k[2], w1, w1), init_affine(k[3], w1, w1)),
        )
        return block, params, x
    if kind == "swap":  # the halves of a swap must match (a scan carry cannot change type)
        return rj.swap(), None, (x[0], 2.0 * x[0] + 1.0)
    raise ValueError(kind)


KINDS = ["additive", "affine", "sequence", "swap"]


# Tolerance 1e-6 (float32 unit round-off 6e-8): a single block's inverse re-adds the same branch
# outputs, so the error is a few ulps of the stream, amplified at most by the affine scales.
@pytest.mark.parametrize("kind", KINDS)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 9),
    w1=st.integers(1, 12),
    w2=st.integers(1, 12),
    use_key=st.booleans(),
)
def test_inverse_of_forward_is_identity(kind, seed, batch, w1, w2, use_key):
    block, params, x = make_case(kind, seed, batch, w1, w2)
    key = jax.random.key(seed + 1) if use_key else None
    call = lambda fn, *a: fn(*a) if key is None else fn(*a, key)

    @jax.jit  # one compilation per drawn shape instead of one per primitive
    def roundtrip(params, x):
        y = call(block.forward, params, x)
        return y, call(block.inverse, params, y)

    y, x_rec = roundtrip(params, x)
    chex.assert_trees_all_equal_shapes_and_dtypes(y, x)
    assert float(relative_error(x_rec, x)) <= 1e-6


def autodiff_case(kind, seed, use_key):
    """A block at random inputs with its autodiff vjp at a random output cotangent:
    ``(block, params, x, call, y, y_bar, (params_bar, x_bar))``."""
    block, params, x = make_case(kind, seed, 5, 6, 6)
    key = jax.random.key(seed + 7) if use_key else None
    call = lambda fn, *a: fn(*a) if key is None else fn(*a, key)
    y, pullback = jax.vjp(lambda p, x_: call(block.forward, p, x_), params, x)
    rng = np.random.default_rng(seed + 3)
    y_bar = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), y)
    return block, params, x, call, y, y_bar, pullback(y_bar)


@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**31 - 1), use_key=st.booleans())
def test_fused_backward_equals_autodiff(kind, seed, use_key):
    block, params, x, call, y, y_bar, (p_bar_ref, x_bar_ref) = autodiff_case(kind, seed, use_key)
    x_rec, x_bar, p_bar = call(reconstruct_and_vjp(block), params, y, y_bar)
    assert float(relative_error(x_rec, x)) <= 1e-6
    # 1e-5: cotangents pass through the reconstructed (not the stored) activations.
    assert float(relative_error(x_bar, x_bar_ref)) <= 1e-5
    if jax.tree.leaves(params):
        assert float(relative_error(p_bar, p_bar_ref)) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@given(seed=st.integers(0, 2**31 - 1), use_key=st.booleans())
def test_vijp_step_inverts_the_vjp(kind, seed, use_key):
    """vijp_step(x, x_bar) returns y_bar with vjp(y_bar) == x_bar, and the parameter cotangent
    of that y_bar: the Moonwalk step derived in coupling.py, checked against autodiff."""
    block, params, x, call, y, y_bar_true, (p_bar_true, x_bar) = autodiff_case(kind, seed, use_key)
    y_step, y_bar, p_bar = call(block.vijp_step, params, x, x_bar)
    assert float(relative_error(y_step, y)) <= 1e-6
    # 1e-5: the solve subtracts pulled-back terms, a few float32 ulps of the cotangents (the
    # affine coupling multiplies by e^{+-s}, |s| <= 2).
    assert float(relative_error(y_bar, y_bar_true)) <= 1e-5
    if jax.tree.leaves(params):
        assert float(relative_error(p_bar, p_bar_true)) <= 1e-5


def test_pytree_halves():
    """Halves may be pytrees; f maps the x2 pytree to a pytree shaped like x1."""
    k = jax.random.split(jax.random.key(0), 3)
    x = (
        {"a": jax.random.normal(k[0], (4, 3)), "b": jax.random.normal(k[1], (4, 2))},
        jax.random.normal(k[2], (4, 5)),
    )
    f = lambda p, h: {"a": jnp.tanh(h @ p["a"]), "b": jnp.sin(h @ p["b"])}
    g = lambda p, y1: jnp.tanh(y1["a"] @ p[0] + y1["b"] @ p[1])
    params = (
        {"a": jnp.ones((5, 3)) * 0.3, "b": jnp.ones((5, 2)) * -0.2},
        (jnp.ones((3, 5)) * 0.1, jnp.ones((2, 5)) * 0.4),
    )
    block = rj.additive_coupling(f, g)
    y = block.forward(params, x)
    chex.assert_trees_all_equal_shapes_and_dtypes(y, x)
    assert float(relative_error(block.inverse(params, y), x)) <= 1e-6


def test_affine_log_det_matches_jacobian():
    block, params, x = make_case("affine", 3, 2, 3, 4)  # N = 2: the log-det sums the batch
    flat = lambda x_: jnp.concatenate([x_[0].ravel(), x_[1].ravel()])
    unflat = lambda v: (v[:6].reshape(2, 3), v[6:].reshape(2, 4))
    jac = jax.jacfwd(lambda v: flat(block.forward(params, unflat(v))))(flat(x))
    _, logabsdet = jnp.linalg.slogdet(jac)
    assert jnp.allclose(block.log_det(params, x), logabsdet, rtol=1e-5, atol=1e-5)


def test_additive_log_det_is_zero_and_sequences_add():
    """Additive couplings preserve volume: log_det 0, matching the Jacobian; a sequence of
    additive and affine couplings (a NICE / Real NVP flow) keeps a log_det, the sum."""
    block, params, x = make_case("additive", 3, 1, 3, 4)
    flat = lambda x_: jnp.concatenate([x_[0][0], x_[1][0]])
    unflat = lambda v: (v[None, :3], v[None, 3:])
    jac = jax.jacfwd(lambda v: flat(block.forward(params, unflat(v))))(flat(x))
    assert float(block.log_det(params, x)) == 0.0
    assert abs(float(jnp.linalg.slogdet(jac)[1])) <= 1e-5
    aff = rj.affine_coupling(affine_branch, affine_branch)
    _, p, x = make_case("affine", 2, 1, 3, 3)
    two = rj.sequence(aff, rj.swap(), aff)
    expected = aff.log_det(p, x) + aff.log_det(p, rj.swap().forward(None, aff.forward(p, x)))
    assert jnp.allclose(two.log_det((p, None, p), x), expected, rtol=1e-6)
    additive = rj.additive_coupling(dense, dense)
    mixed = rj.sequence(aff, additive)
    _, dense_params, _ = make_case("additive", 2, 1, 3, 3)
    assert jnp.allclose(mixed.log_det((p, dense_params), x), aff.log_det(p, x), rtol=1e-6)


def test_affine_scale_is_bounded():
    """A huge raw log-scale is squashed into (-m, m): the output stays finite and invertible."""
    big = lambda p, h: (jnp.full_like(h, 1e4), jnp.zeros_like(h))
    block = rj.affine_coupling(big, big, max_log_scale=2.0)
    x = (jnp.ones((2, 3)), jnp.ones((2, 3)))
    y = block.forward((None, None), x)
    assert jnp.all(jnp.isfinite(y[0])) and float(jnp.max(y[0])) <= jnp.exp(2.0) + 1e-5
    assert float(relative_error(block.inverse((None, None), y), x)) <= 1e-6


def test_branch_with_wrong_shape_is_rejected():
    block = rj.additive_coupling(lambda p, h: h[:, :2], lambda p, h: h)
    with pytest.raises(
        ValueError, match=r"f must return an array shaped like x1.*\(4, 3\).*\(4, 2\)"
    ):
        block.forward((None, None), (jnp.ones((4, 3)), jnp.ones((4, 3))))


def test_halves_that_disagree_are_not_blamed_on_the_branch_alone():
    """x1 (2, 3) and x2 (5, 4) were reported only as 'f must return an array shaped like x1'
    although f was right; a note now names what f was called on and the halves."""
    block = rj.additive_coupling(lambda p, h: jnp.tanh(h @ p), lambda p, h: jnp.tanh(h @ p))
    params = (jnp.ones((4, 3)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="f must return an array shaped like x1") as info:
        block.forward(params, (jnp.ones((2, 3)), jnp.ones((5, 4))))
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "f was called on x2 of shape (5, 4)" in note and "x1 of shape (2, 3)" in note
    assert "the stream's two halves disagree" in note


def test_python_scalar_branch_outputs_on_scalar_halves():
    """A branch returning 0.0 for a scalar half passed the shape check and then failed with
    AttributeError: 'float' object has no attribute 'astype'."""
    x = (jnp.ones(()), jnp.ones(()))
    additive = rj.additive_coupling(lambda p, h: 0.0, lambda p, h: h * p)
    y = additive.forward((None, jnp.float32(2.0)), x)
    assert [float(a) for a in y] == [1.0, 3.0]
    affine = rj.affine_coupling(lambda p, h: (0.0, 0.0), lambda p, h: (0.0, h * p))
    y = affine.forward((None, jnp.float32(2.0)), x)
    assert [float(a) for a in y] == [1.0, 3.0]
    assert [float(a) for a in affine.inverse((None, jnp.float32(2.0)), y)] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("dtype", "bound", "refused"),
    [(jnp.float32, 100.0, True), (jnp.float16, 12.0, True), (jnp.float16, 11.0, False)],
)
def test_affine_bound_whose_scale_overflows_the_stream_is_refused(dtype, bound, refused):
    """max_log_scale=100 in float32 (or 12 in float16) was accepted: e^m overflows, so a large
    raw log-scale gave y = inf and a NaN inverse while log_det stayed finite. The bound must
    be below log(finfo.max): 88.72 for float32, 11.09 for float16."""
    big = lambda p, h: (jnp.full_like(h, 1e4), jnp.zeros_like(h))
    block = rj.affine_coupling(big, big, max_log_scale=bound)
    x = (jnp.full((2, 3), 0.5, dtype), jnp.full((2, 3), 0.5, dtype))
    if refused:
        with pytest.raises(
            ValueError, match=f"max_log_scale={bound} lets the scale e\\^s overflow"
        ):
            block.forward((None, None), x)
        return
    y = block.forward((None, None), x)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in y)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in block.inverse((None, None), y))


def test_broadcastable_branch_output_is_rejected():
    block = rj.additive_coupling(lambda p, h: h[0], lambda p, h: h)
    with pytest.raises(ValueError, match="f must return"):
        block.forward((None, None), (jnp.ones((4, 3)), jnp.ones((4, 3))))


def test_affine_branch_must_return_pair():
    """The message names the branch and what it returned (an array's shape, a tuple's length)."""
    x = (jnp.ones((2, 3)), jnp.ones((2, 3)))
    block = rj.affine_coupling(lambda p, h: h, lambda p, h: (h, h))
    with pytest.raises(ValueError, match=r"branch f must return a pair \(raw_log_scale, shift\)"):
        block.forward((None, None), x)
    with pytest.raises(ValueError, match=r"got array of shape \(2, 3\)"):
        jax.jit(block.forward)((None, None), x)  # a tracer is still called an array
    block = rj.affine_coupling(lambda p, h: (h, h), lambda p, h: (h, h, h))
    with pytest.raises(ValueError, match=r"branch g .* got a tuple of 3"):
        block.forward((None, None), x)


def test_stream_must_be_a_pair():
    block = rj.additive_coupling(dense, dense)
    with pytest.raises(TypeError, match=r"tuple of two halves \(x1, x2\); got array \(2, 4\)"):
        block.forward((None, None), jnp.ones((2, 4)))
    # Under jit the array is a tracer: still called an array, not DynamicJaxprTracer.
    with pytest.raises(TypeError, match=r"tuple of two halves \(x1, x2\); got array \(2, 4\)"):
        jax.jit(lambda x: block.forward((None, None), x))(jnp.ones((2, 4)))
    # A list pair would come back as a tuple and break a scan's carry later: refused up front.
    with pytest.raises(TypeError, match=r"got list .*; pass tuple\(x\)"):
        block.forward((None, None), [jnp.ones((2, 4)), jnp.ones((2, 4))])
    # One branch's params instead of the pair: named, not a KeyError from inside f.
    with pytest.raises(TypeError, match=r"params must be a pair \(params_f, params_g\)"):
        block.forward({"w": jnp.ones((4, 4))}, (jnp.ones((2, 4)), jnp.ones((2, 4))))


def test_sequence_errors():
    with pytest.raises(ValueError, match="at least one"):
        rj.sequence()
    with pytest.raises(TypeError, match="block 1"):
        rj.sequence(rj.swap(), lambda p, x: x)
    with pytest.raises(ValueError, match="tuple of 2"):
        rj.sequence(rj.swap(), rj.swap()).forward((None,), (jnp.ones(2), jnp.ones(2)))


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan"), float("inf")])
def test_affine_rejects_nonpositive_or_infinite_bound(bound):
    """inf was accepted and made every output NaN (inf * tanh(raw / inf)); found by review."""
    with pytest.raises(ValueError, match="max_log_scale must be finite and > 0"):
        rj.affine_coupling(affine_branch, affine_branch, max_log_scale=bound)


def test_bf16_branch_keeps_float32_stream():
    """Branch outputs are cast to the half's dtype: a bf16 branch adds into a float32 stream."""
    bf16_branch = lambda p, h: jnp.tanh(h.astype(jnp.bfloat16))
    block = rj.additive_coupling(bf16_branch, bf16_branch)
    # 1 + 2^-20 has no bf16 value: a sum taken in bf16 (then cast back) would lose the 2^-20.
    x = (jnp.full((2, 3), 1 + 2**-20, jnp.float32), jnp.ones((2, 3), jnp.float32))
    y = block.forward((None, None), x)
    chex.assert_trees_all_equal_dtypes(y, x)
    branch = jnp.tanh(jnp.ones((2, 3), jnp.bfloat16)).astype(jnp.float32)
    np.testing.assert_array_equal(y[0], x[0] + branch)


def test_branches_that_are_not_pure_functions_are_refused_at_construction():
    """Used to fail at the first scan: 'int' object is not callable, an unhashable tracer
    inside nnx.Linear, or linen's CallCompactUnboundModuleError."""
    from flax import linen, nnx

    f = lambda p, h: h * p
    with pytest.raises(TypeError, match=r"additive_coupling: branch f must be a function.*int 3"):
        rj.additive_coupling(3, f)
    with pytest.raises(TypeError, match=r"affine_coupling: branch g must be a function"):
        rj.affine_coupling(f, None)
    module = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"branch f is an nnx.Module \(Linear\).*nnx.reversible"):
        rj.additive_coupling(module, f)
    with pytest.raises(TypeError, match=r"branch g is a linen Module \(Dense\).*linen_coupling"):
        rj.additive_coupling(f, linen.Dense(4))
    # Flax's function wrappers are not modules: nnx.jit(f) is a valid pure branch.
    block = rj.additive_coupling(nnx.jit(f), f)
    x = (jnp.ones((2, 3)), jnp.ones((2, 3)))
    np.testing.assert_allclose(block.forward((2.0, 2.0), x)[1], 7.0)


def test_complex_branch_output_into_a_real_stream_is_refused():
    """It was cast into the real stream, silently dropping the imaginary part."""
    block = rj.additive_coupling(lambda p, h: h * (1 + 1j) * p, lambda p, h: h * p)
    x = (jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"f returned complex64 for the real float32 half x1"):
        block.forward((1.0, 1.0), x)


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_coupling_stack_reconstruction_float32_and_bfloat16_across_depth(kind):
    """DESIGN's numerics rule for the two Feistel couplings (tests/reconstruction_checks.py):
    MLP branches, halves 32 wide, the affine log-scale 0.5 tanh of the branch output."""

    def make(depth):
        params = init_mlp_stack(jax.random.key(0), depth, 32, 64)
        x = tuple(jax.random.normal(k, (64, 32)) for k in jax.random.split(jax.random.key(1)))
        if kind == "additive":
            return rj.additive_coupling(mlp, mlp), params, x
        branch = lambda p, h: (0.5 * jnp.tanh(mlp(p, h)), mlp(p, h))
        return rj.affine_coupling(branch, branch), params, x

    check_reconstruction_across_depth(make)
