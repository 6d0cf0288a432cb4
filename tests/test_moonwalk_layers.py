"""moonwalk.layers: vijp inverts vjp per layer type, the coupling formula, bfloat16, bad input."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revjax as rj
from revjax import moonwalk as mw
from revjax.diagnostics import relative_error
from revjax.models.mlp import init_mlp_stack, mlp, mlp_coupling


def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def like(seed, tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([normal(seed + i, a.shape) for i, a in enumerate(leaves)])


def affine_branch(p, h):
    return jnp.tanh(h @ p["s"]), h @ p["t"]


# --- vijp per layer type ------------------------------------------------------------------------


def layer_cases():
    """(name, layer, params, x, square): square layers have a bijective Jacobian."""
    b, w = 5, 6
    pair = (normal(1, (b, w)), normal(2, (b, w)))
    mlp_params = jax.tree.map(lambda a: a[0], init_mlp_stack(jax.random.key(0), 1, w, 12))
    affine = {"s": normal(3, (w, w), 0.3), "t": normal(4, (w, w), 0.3)}
    stacked = init_mlp_stack(jax.random.key(5), 4, w, 12)
    return [
        ("additive", mw.from_coupling(mlp_coupling()), mlp_params, pair, True),
        (
            "affine",
            mw.from_coupling(rj.affine_coupling(affine_branch, affine_branch)),
            (affine, affine),
            pair,
            True,
        ),
        (
            "generic coupling (inverse-vjp fallback)",
            mw.from_coupling(rj.Coupling(mlp_coupling().forward, mlp_coupling().inverse)),
            mlp_params,
            pair,
            True,
        ),
        ("leaky_relu", mw.leaky_relu(0.2), None, normal(6, (b, w)), True),
        (
            "submersive_linear square",
            mw.submersive_linear(),
            mw.init_submersive_linear(jax.random.key(7), 8, 8),
            normal(8, (b, 8)),
            True,
        ),
        (
            "submersive_linear 12 -> 5",
            mw.submersive_linear(),
            mw.init_submersive_linear(jax.random.key(9), 12, 5),
            normal(10, (b, 12)),
            False,
        ),
        (
            "dense 7 -> 4",
            mw.dense(lambda p, x: jnp.tanh(x @ p)),
            normal(11, (7, 4), 0.5),
            normal(12, (b, 7)),
            False,
        ),
        ("stack of 4 couplings", mw.stack(mw.from_coupling(mlp_coupling())), stacked, pair, True),
        (
            "chain linear -> leaky",
            mw.chain(mw.submersive_linear(), mw.leaky_relu(0.1)),
            (mw.init_submersive_linear(jax.random.key(13), 8, 6), None),
            normal(14, (b, 8)),
            False,
        ),
    ]


CASES = {name: (layer, params, x, square) for name, layer, params, x, square in layer_cases()}


# 1e-5 (the bound): solves and subtractions of float32 cotangents, a few ulps each.
@pytest.mark.parametrize("name", list(CASES))
def test_vijp_inverts_vjp(name):
    layer, params, x, square = CASES[name]
    y, pullback = jax.vjp(lambda x_: layer.forward(params, x_), x)
    b = like(100, y)
    a = pullback(b)[0]
    # vijp(vjp(b)) == b for every b.
    assert float(relative_error(mw.vijp(layer, params, x, a), b)) <= 1e-5
    # vjp(vijp(a)) == a: for every a when J is square, else for a in its row space, which is
    # where backpropagated cotangents live (a = vjp(b') for a random b').
    a2 = like(200, x) if square else pullback(like(300, y))[0]
    assert float(relative_error(pullback(mw.vijp(layer, params, x, a2))[0], a2)) <= 1e-5
    # One step also returns y and the parameter cotangent, vjp_theta(b), that Moonwalk sums.
    y_step, b_step, p_bar = layer.step(params, x, a)
    chex.assert_trees_all_close(y_step, y, rtol=1e-6, atol=1e-6)
    assert float(relative_error(b_step, b)) <= 1e-5
    if jax.tree.leaves(params):
        p_bar_ref = jax.vjp(layer.forward, params, x)[1](b)[0]
        assert float(relative_error(p_bar, p_bar_ref)) <= 1e-5


def test_additive_coupling_vijp_is_the_derived_formula():
    """b2 = a2 - vjp_F(x2)(a1), b1 = a1 - vjp_G(y1)(b2); theta_F gets a1, theta_G gets b2."""
    layer, params, (x1, x2), _ = CASES["additive"]
    (pf, pg), (a1, a2) = params, (normal(20, x1.shape), normal(21, x2.shape))
    f_out, f_vjp = jax.vjp(mlp, pf, x2)
    y1 = x1 + f_out
    g_out, g_vjp = jax.vjp(mlp, pg, y1)
    pf_bar, from_f = f_vjp(a1)
    b2 = a2 - from_f
    pg_bar, from_g = g_vjp(b2)
    b1 = a1 - from_g
    y, (c1, c2), (qf, qg) = layer.step(params, (x1, x2), (a1, a2))
    np.testing.assert_allclose(y[1], x2 + g_out, rtol=1e-6, atol=1e-6)
    for got, want in ((c1, b1), (c2, b2), (qf, pf_bar), (qg, pg_bar)):
        assert float(relative_error(got, want)) <= 1e-6


# --- bad input ---------------------------------------------------------------------------------


def test_blocks_with_side_information_are_rejected():
    with pytest.raises(TypeError, match="needs side information"):
        mw.from_coupling(rj.layers.batch_norm(), name="bn")


def test_width_increasing_linear_is_rejected():
    with pytest.raises(ValueError, match=r"submersive_linear\('up'\): maps width 4 to 8"):
        mw.init_submersive_linear(jax.random.key(0), 4, 8, name="up")


# True was taken as slope 1; a string and an array failed inside math.isfinite.
@pytest.mark.parametrize("slope", [0.0, -0.5, float("nan"), True, "0.1", np.array([0.1, 0.2])])
def test_non_invertible_leaky_relu_is_rejected(slope):
    with pytest.raises(ValueError, match=r"leaky_relu\('act'\): slope must be finite and > 0"):
        mw.leaky_relu(slope, name="act")


def test_leaky_relu_slope_that_rounds_to_zero_in_the_input_dtype_is_refused():
    """slope 1e-8 is 0 in float16: the vijp divided by 0 and every Moonwalk gradient was
    non-finite while backprop's were finite. float32 holds it."""
    layer = mw.leaky_relu(1e-8, name="act")
    x = -jnp.ones((2, 3), jnp.float16)
    with pytest.raises(
        ValueError, match=r"leaky_relu\('act'\): slope=1e-08 rounds to 0 in float16"
    ):
        mw.vijp(layer, None, x, x)
    b = mw.vijp(layer, None, x.astype(jnp.float32), x.astype(jnp.float32))
    np.testing.assert_allclose(b, -1e8 * np.ones((2, 3)), rtol=1e-6)


def test_leaky_relu_vijp_and_pull_use_the_slope_the_stream_dtype_applies():
    """forward multiplies a bfloat16 x by the slope rounded to bfloat16 (0.3 -> 0.30078125),
    but a float32 cotangent was divided (step) or multiplied (pull) by the exact 0.3, and
    step rounded its float32 y_bar to bfloat16: both 2.6e-3 off on the negative side."""
    layer = mw.leaky_relu(0.3, name="act")
    x = jnp.array([[-1.0, 2.0, -3.0, 0.5]], jnp.bfloat16)
    applied = np.float32(jnp.bfloat16(0.3))  # 0.30078125, the slope forward really used
    a = jnp.array([[0.7, -1.3, 0.1, 2.2]], jnp.float32)
    b = mw.vijp(layer, None, x, a)
    assert b.dtype == jnp.float32  # not rounded to x's bfloat16
    np.testing.assert_allclose(b, a / np.where(x >= 0, 1, applied), rtol=1e-7)
    _, residual = layer.save_forward(None, x)
    _, x_bar = layer.pull(None, residual, None, a)
    np.testing.assert_allclose(x_bar, a * np.where(x >= 0, 1, applied), rtol=1e-7)
    # pull is the layer's own vjp: with a bfloat16 cotangent they agree bit for bit.
    a16 = a.astype(jnp.bfloat16)
    assert np.array_equal(layer.pull(None, residual, None, a16)[1],
                          jax.vjp(lambda x_: layer.forward(None, x_), x)[1](a16)[0])  # fmt: skip


def test_single_stream_layers_name_a_pytree_stream_and_bad_params():
    """A tuple stream failed with "'>=' not supported between tuple and int" or "'tuple' object
    has no attribute 'shape'"; params without a bias with a bare KeyError; a bias of shape (1,)
    was broadcast silently over k outputs."""
    pair = (jnp.ones((2, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"leaky_relu\('act'\): acts on one array, got tuple"):
        mw.leaky_relu(0.1, name="act").forward(None, pair)
    linear = mw.submersive_linear("down")
    params = mw.init_submersive_linear(jax.random.key(0), 4, 3)
    with pytest.raises(ValueError, match=r"submersive_linear\('down'\): acts on one array"):
        linear.forward(params, pair)
    no_bias = {k: v for k, v in params.items() if k != "bias"}
    with pytest.raises(ValueError, match=r"'down'\): expects params .*got \['lower', 'upper'\]"):
        linear.forward(no_bias, pair[0])
    for shape in [(1,), (2,)]:
        bad = params | {"bias": jnp.zeros(shape)}
        with pytest.raises(
            ValueError, match=re.escape(f"bias (k,); got upper (3, 3), lower (1, 3), bias {shape}")
        ):
            linear.forward(bad, pair[0])
    assert linear.forward(params, pair[0]).shape == (2, 3)


@pytest.mark.parametrize("tolerance", [-1.0, float("nan"), 1.0, "1e-6", None])
def test_dense_tolerance_is_checked(tolerance):
    """-1 accepted a rank-deficient layer (non-finite gradients, no error); NaN refused every
    layer with "ratio is 1 <= nan"."""
    with pytest.raises(ValueError, match=r"dense\('d'\): tolerance .* in \[0, 1\); got"):
        mw.dense(lambda p, h: h @ p, "d", tolerance=tolerance)


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_dense_sees_per_example_values_its_forward_closes_over(method):
    """dense took each row's Jacobian from forward on that row alone, so a (batch, n) array the
    forward closes over was broadcast from its first row: gradients off by 1.06 (relative),
    with no error. The Jacobians now come from vjps of forward on the whole batch."""
    mask = jnp.where(normal(7, (6, 5)) > 0, 1.5, 0.5)  # per example
    layer = mw.dense(lambda p, h: jnp.tanh(h * mask) @ p, name="masked")
    params, x = normal(8, (5, 4), 0.5), normal(9, (6, 5))
    loss = lambda y: jnp.sum(y**2 + y, axis=-1)
    _, reference = mw.value_and_grad(layer, loss, method="backprop")(params, x)
    _, grads = mw.value_and_grad(layer, loss, method=method)(params, x)
    # float32 SVD solves of 4 x 5 Jacobians: measured 1.0e-6 and 2.0e-6 (it was 1.24).
    assert float(relative_error(grads, reference)) <= 1e-4


def test_dense_rejects_width_increase_and_singular_jacobians():
    widen = mw.dense(lambda p, x: x @ p, name="widen")
    with pytest.raises(ValueError, match=r"dense\('widen'\): maps width 3 to 5"):
        mw.vijp(widen, normal(0, (3, 5)), normal(1, (2, 3)), normal(2, (2, 3)))
    w = normal(3, (4, 3)).at[:, 1].set(0.0)  # output 1 is constant: J has rank 2 < 3
    flat = mw.dense(lambda p, x: x @ p, name="flat")
    x, a = normal(4, (2, 4)), normal(5, (2, 4))
    with pytest.raises(ValueError, match=r"dense\('flat'\): the layer is not submersive"):
        jax.block_until_ready(mw.vijp(flat, w, x, a))
    # Under jit the callback's ValueError arrives wrapped, with the same message (documented).
    jitted = jax.jit(lambda w_, x_, a_: mw.vijp(flat, w_, x_, a_))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"dense\('flat'\): the layer is not"):
        jax.block_until_ready(jitted(w, x, a))
    # An all-zero Jacobian is singular (its ratio was 0/0 and reported as non-finite).
    zero = mw.dense(lambda p, x: 0 * x, name="zero")
    with pytest.raises(ValueError, match=r"dense\('zero'\): the layer is not submersive"):
        jax.block_until_ready(mw.vijp(zero, None, x, a))
    # A NaN input is reported as such, not as a singular Jacobian.
    tanh = mw.dense(lambda p, x: jnp.tanh(x @ p), name="tanh")
    with pytest.raises(ValueError, match=r"dense\('tanh'\): the Jacobian has non-finite entries"):
        jax.block_until_ready(mw.vijp(tanh, normal(6, (4, 3)), x.at[1, 0].set(jnp.nan), a))


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
@pytest.mark.parametrize(
    ("shape", "loss"),
    [((5, 2, 6), lambda y: jnp.sum(y, (1, 2))), ((5,), lambda y: y)],
    ids=["3-D", "1-D"],
)
def test_dense_names_an_input_that_is_not_batch_by_width(method, shape, loss):
    """A (5, 2, 6) input was reported as a singular Jacobian ('ratio is 0'), a (5,) one as
    JAX's internal 'svd must have rank at least 2'; the layer is fine, its input is not."""
    layer = mw.dense(lambda p, h: h * p, name="scale")
    message = r"dense\('scale'\): expects x of shape \(batch, n\).*" + re.escape(
        f"got x of shape {shape}"
    )
    with pytest.raises(ValueError, match=message):
        mw.value_and_grad(layer, loss, method=method)(2.0, jnp.ones(shape))
    # A (batch, n) input whose output is not (batch, k) is named too.
    split = mw.dense(lambda p, h: h.reshape(h.shape[0], 2, -1), name="split")
    with pytest.raises(ValueError, match=r"dense\('split'\): expects forward.*got \(3, 2, 2\)"):
        mw.vijp(split, None, normal(0, (3, 4)), normal(1, (3, 4)))


def test_dense_singular_message_prints_a_zero_ratio_as_0():
    """A singular value of -0.0 printed the ratio as '-0'."""
    from revjax.moonwalk.layers import _raise_if_singular

    with pytest.raises(ValueError, match=r"singular value ratio is 0 <= 1e-06") as info:
        # smallest ratio -0.0, first non-finite row 2 (the batch size: none), none non-finite,
        # no row mixed
        worst, first_nonfinite, nonfinite, unmixed = np.float32(-0.0), 2, 0, np.int32(-1)
        _raise_if_singular(worst, first_nonfinite, nonfinite, unmixed, name="d", tolerance=1e-6)
    assert "ratio is -0" not in str(info.value)


# --- dtypes, pytree types and composition ---------------------------------------------------


def test_dense_fallback_in_bfloat16():
    """XLA has no bfloat16 SVD: the dense vijp solves in float32 and returns bfloat16, and it
    inverts the layer's own bfloat16 vjp."""
    layer = mw.dense(lambda p, x: x @ p + 0.25 * jnp.tanh(x @ p), name="d")
    to16 = lambda t: t.astype(jnp.bfloat16)
    for seed in range(5):
        params, x = to16(normal(seed, (6, 4), 0.5)), to16(normal(seed + 10, (3, 6)))
        y, pullback = jax.vjp(layer.forward, params, x)
        b = to16(normal(seed + 20, y.shape))
        got = mw.vijp(layer, params, x, pullback(b)[1])
        assert got.dtype == jnp.bfloat16
        # The bfloat16 cotangent vjp(b) carries 2^-9 relative rounding, which the solve
        # amplifies by the Jacobian's condition number: measured 1.7e-3 to 1.2e-2 here.
        assert float(relative_error(got, b)) <= 3e-2, seed
