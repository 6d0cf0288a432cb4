"""moonwalk.gradients: every method matches jax.grad; memory; coupled examples; bad input."""

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revjax as rj
from revjax import moonwalk as mw
from revjax.diagnostics import relative_error
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.moonwalk.gradients import first_coupled_example
from revjax.scan import plain_scan


def normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


# --- the six methods against jax.grad -------------------------------------------------------------


def revnet(depth=16, width=8, batch=6):
    params = init_mlp_stack(jax.random.key(0), depth, width, 16)
    x = tuple(normal(k, (batch, width)) for k in (1, 2))
    loss = lambda y: jnp.sum(jnp.tanh(y[0]) * y[1], axis=-1) + 0.5 * jnp.sum(y[1] ** 2, axis=-1)
    return mw.stack(mw.from_coupling(mlp_coupling())), params, x, loss, ()


def submersive_mlp(widths=(64, 64, 48, 32, 16), batch=7, seed=2):
    layers, params = [], []
    keys = jax.random.split(jax.random.key(seed), len(widths) - 1)
    for i, (n, k) in enumerate(itertools.pairwise(widths)):
        layers += [mw.submersive_linear(f"linear{i}"), mw.leaky_relu(0.1, f"leaky{i}")]
        params += [mw.init_submersive_linear(keys[i], n, k), None]
    x, target = normal(4, (batch, widths[0])), normal(5, (batch, widths[-1]))
    loss = lambda y, t: 0.5 * jnp.sum((y - t) ** 2, axis=-1)
    return layers, tuple(params), x, loss, (target,)


NETWORKS = {"revnet": revnet, "submersive_mlp": submersive_mlp}


def submersive_mlp_by_hand(params, x):
    """submersive_mlp's forward written out in jnp, independent of the Layer code."""
    for linear in params[::2]:
        k = linear["upper"].shape[0]
        w = jnp.concatenate([jnp.eye(k) + jnp.triu(linear["upper"], 1), linear["lower"]])
        x = x @ w + linear["bias"]
        x = jnp.where(x >= 0, x, 0.1 * x)
    return x


# Reference forwards: the submersive MLP by hand; the RevNet through plain_scan of the same
# coupling (its forward only: the vijp steps and Moonwalk sweeps under test are not used).
BY_HAND = {
    "revnet": lambda params, x: plain_scan(mlp_coupling(), params, x),
    "submersive_mlp": submersive_mlp_by_hand,
}


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("method", ["revbackprop", "moonwalk", "mixed_moonwalk", "forward"])
def test_methods_match_jax_grad(network, method):
    """Against jax.grad of a forward written independently of the Layers. RevNet 1e-5
    (measured 2e-7 to 3e-7); the submersive MLP 1e-4, the issue's float32 bound (measured
    2e-5: the sweep divides by each leaky ReLU's slope 0.1, amplifying round-off; see
    test_drift_witnesses_the_sweeps_round_off_amplification)."""
    layers, params, x, loss, args = NETWORKS[network]()
    mean_loss = lambda p: jnp.mean(loss(BY_HAND[network](p, x), *args))
    loss_ref, grads_ref = jax.value_and_grad(mean_loss)(params)
    _, backprop = mw.value_and_grad(layers, loss, method="backprop")(params, x, *args)
    assert float(relative_error(backprop, grads_ref)) <= 1e-6  # the same arithmetic
    fn = jax.jit(mw.value_and_grad(layers, loss, method=method))
    if network == "submersive_mlp" and method == "revbackprop":
        with pytest.raises(TypeError, match="layer 'linear0' is not a reversible coupling"):
            fn(params, x, *args)
        return
    value, grads = fn(params, x, *args)
    assert float(value) == pytest.approx(float(loss_ref), rel=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_equal(g.shape, r.shape), grads, grads_ref)
    bound = {"revnet": 1e-5, "submersive_mlp": 1e-4}[network]
    assert float(relative_error(grads, grads_ref)) <= bound


def test_projected_forward_gradient_is_unbiased():
    """Mean of (g . v) v over N Gaussian tangents: E = g and E||mean - g||^2 = (P + 1)||g||^2 / N,
    so the relative error is about sqrt((P + 1) / N) = 0.043 here (P = 38, N = 20000). We allow
    3x that; a single estimate is off by about sqrt(P + 1) = 6, so the test discriminates."""
    layers, params, x, loss, args = submersive_mlp(widths=(6, 4, 2), batch=5)
    _, g = mw.value_and_grad(layers, loss, method="backprop")(params, x, *args)
    num_params = sum(a.size for a in jax.tree.leaves(params))
    assert num_params == 38
    estimate = jax.jit(
        mw.value_and_grad(
            layers, loss, method="projected_forward", num_tangents=20000, chunk_size=2000
        )
    )
    _, g_est = estimate(params, x, *args, key=jax.random.key(0))
    expected = ((num_params + 1) / 20000) ** 0.5
    assert float(relative_error(g_est, g)) <= 3 * expected
    one = mw.value_and_grad(layers, loss, method="projected_forward", num_tangents=1)
    assert float(relative_error(one(params, x, *args, key=jax.random.key(1))[1], g)) > 1.0


# --- memory ------------------------------------------------------------------------------------


def test_revnet_forward_sweep_and_moonwalk_are_flat_in_depth():
    """Compiled temp of the forward sweep, pure and mixed Moonwalk: equal at L = 8 and L = 64
    (backprop grows 7x); measured 51 KB, 832 KB and 62 KB at both depths."""

    def temps(depth):
        net, params, x, loss, _ = revnet(depth=depth, width=32, batch=16)
        sweep = compiled_memory(net.step, params, x, x).temp_bytes
        methods = {
            m: compiled_memory(mw.value_and_grad(net, loss, method=m), params, x).temp_bytes
            for m in ("moonwalk", "mixed_moonwalk", "backprop")
        }
        return {"sweep": sweep, **methods}

    shallow, deep = temps(8), temps(64)
    for name in ("sweep", "moonwalk", "mixed_moonwalk"):
        assert deep[name] <= 1.05 * shallow[name], (name, shallow, deep)
    assert deep["backprop"] >= 4 * shallow["backprop"]


def test_mixed_moonwalk_memory_on_a_deep_submersive_mlp():
    """Depth 32, width 512, batch 256: mixed Moonwalk stores one bit per leaky ReLU element;
    measured 6.5 MiB vs 56.3 MiB for backprop (0.12; the issue's bound is 1/4). Slope 0.9: at
    this depth the gradient is accurate (at 0.1 it would not be; memory is the same)."""
    depth, width, batch = 32, 512, 256
    keys = jax.random.split(jax.random.key(0), depth)
    params = (jax.vmap(lambda k: mw.init_submersive_linear(k, width, width))(keys), None)
    net = mw.stack(mw.chain(mw.submersive_linear(), mw.leaky_relu(0.9)))
    x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    temp = {
        m: compiled_memory(mw.value_and_grad(net, loss, method=m), params, x).temp_bytes
        for m in ("backprop", "mixed_moonwalk")
    }
    assert temp["mixed_moonwalk"] <= temp["backprop"] / 4, temp


def deep_submersive(depth, slope, width=32, batch=16):
    keys = jax.random.split(jax.random.key(0), depth)
    params = (jax.vmap(lambda k: mw.init_submersive_linear(k, width, width))(keys), None)
    net = mw.stack(mw.chain(mw.submersive_linear(), mw.leaky_relu(slope)))
    return net, params, normal(1, (batch, width))


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_drift_witnesses_the_sweeps_round_off_amplification(method):
    """The vijp sweep divides by each leaky ReLU's slope, so round-off grows like
    (1/slope)^L: at slope 0.1 the float32 gradient is fine at L = 4 and garbage at L = 16
    (measured 1e-5 and 4e5), at slope 0.9 fine at both. ``drift`` (|h_L - dL/dy| / |dL/dy|,
    free from the sweep) flags exactly the bad case: measured 7e-4 and 1e9 at slope 0.1, 1e-5
    at slope 0.9, L = 16; on these stacks it upper-bounds the gradient error (not everywhere:
    see the next test)."""
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    for depth, slope, accurate in [(4, 0.1, True), (16, 0.1, False), (16, 0.9, True)]:
        net, params, x = deep_submersive(depth, slope)
        _, reference = mw.value_and_grad(net, loss, method="backprop")(params, x)
        fn = jax.jit(mw.value_and_grad(net, loss, method=method, with_drift=True))
        _, grads, drift = fn(params, x)
        error = float(relative_error(grads, reference))
        if accurate:
            assert error <= 1e-4 and float(drift) <= 1e-2, (depth, slope, error, drift)
        else:
            assert error >= 1.0 and float(drift) >= 1.0, (depth, slope, error, drift)
        assert float(drift) >= error, (depth, slope, error, drift)


def test_pure_moonwalk_refuses_losses_and_layers_that_couple_examples():
    """Pure Moonwalk's input gradient by JVPs assumes example b's loss depends on example b
    only. A loss subtracting the batch mean broke it silently (measured relative error 0.96
    before the check); now probe JVPs find the coupling and it raises, eagerly and under jit,
    naming mixed Moonwalk, which is right on the same loss."""
    layers, params, x, _, _ = submersive_mlp(widths=(6, 4, 3), batch=5)
    coupled = lambda y: jnp.sum((y - y.mean(0)) ** 2, axis=-1)
    _, reference = mw.value_and_grad(layers, coupled, method="backprop")(params, x)
    _, mixed = mw.value_and_grad(layers, coupled, method="mixed_moonwalk")(params, x)
    assert float(relative_error(mixed, reference)) <= 1e-5
    pure = mw.value_and_grad(layers, coupled, method="moonwalk")
    message = r"loss of example \d+ depends on the input of another example.*mixed_moonwalk"
    for fn in (pure, jax.jit(pure)):
        with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=message):
            jax.block_until_ready(fn(params, x))
    # A coupling inside a layer (a batch mean subtracted from the activations) and pairings of
    # examples 1, 2 or 4 apart in the loss are caught too.
    centred = mw.chain(mw.dense(lambda p, a: a - a.mean(0), name="centre"), *layers)
    independent = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=message):
        jax.block_until_ready(
            mw.value_and_grad(centred, independent, method="moonwalk")(((), *params), x)
        )
    for shift in (1, 2, 4):  # 2 and 4 pair examples of the same parity, missed by a parity check
        paired = lambda y, s=shift: jnp.sum(y * jnp.roll(y, s, axis=0), axis=-1)
        with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=message):
            jax.block_until_ready(mw.value_and_grad(layers, paired, method="moonwalk")(params, x))


def test_a_dense_layer_that_mixes_examples_is_refused_by_mixed_moonwalk_too():
    """dense() takes each row's Jacobian alone. A forward with a batch mean inside gave
    mixed_moonwalk (the method pure Moonwalk's coupling error recommends) a gradient 0.97 off
    backprop, silently; now the layer's own check raises, naming it, eagerly and under jit."""
    x = normal(0, (5, 6))
    weight = normal(1, (6, 4))
    half_centred = mw.dense(lambda p, h: (h - 0.5 * h.mean(0)) @ p, name="half_centre")
    loss = lambda y: jnp.sum(jnp.sin(y) + y**2, axis=-1)
    mixed = mw.value_and_grad([half_centred], loss, method="mixed_moonwalk")
    message = r"dense\('half_centre'\): forward mixes examples \(the input of row 0 reaches"
    for fn in (mixed, jax.jit(mixed)):
        with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match=message):
            jax.block_until_ready(fn((weight,), x))
    # The same map row by row is accepted and exact.
    rowwise = mw.dense(lambda p, h: h @ p, name="rowwise")
    _, reference = mw.value_and_grad([rowwise], loss, method="backprop")((weight,), x)
    _, grads = jax.jit(mw.value_and_grad([rowwise], loss, method="mixed_moonwalk"))((weight,), x)
    assert float(relative_error(grads, reference)) <= 1e-5


def test_pure_moonwalk_input_gradient_errors_name_the_problem():
    """An integer x failed in jax.jvp with a float0 message; a (batch, 1) loss was diagnosed as
    coupled examples; an empty layer list blamed chain()."""
    from revjax.moonwalk.gradients import input_cotangent_by_jvps

    layers, params, x, _, _ = submersive_mlp(widths=(6, 4, 3), batch=5)
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    as_int = jnp.round(x * 3).astype(jnp.int32)
    with pytest.raises(TypeError, match=r"takes JVPs along x, but x has leaves of dtype int32"):
        mw.value_and_grad(layers, loss, method="moonwalk")(params, as_int)
    # mixed Moonwalk, which the message names, handles the same integer input.
    _, mixed = mw.value_and_grad(layers, loss, method="mixed_moonwalk")(params, as_int)
    _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, as_int)
    assert float(relative_error(mixed, reference)) <= 1e-5
    net = mw.chain(*layers)
    forward = lambda x_: net.forward(params, x_)
    with pytest.raises(ValueError, match=r"per-example losses of shape \(batch,\) = \(5,\).*got"):
        input_cotangent_by_jvps(forward, lambda y: loss(y)[:, None], x)
    with pytest.raises(ValueError, match="value_and_grad: layers is empty"):
        mw.value_and_grad([], loss, method="moonwalk")


@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_coupling_check_passes_independent_examples_and_catches_every_pair(batch):
    """No false alarm: independent examples give exactly zero cross-example tangents, at any
    batch size (a batch of 1 has nothing to couple), also with a non-finite loss (NaN tangents
    are not taken for coupling). And one example's loss reading any other example is found."""
    layers, params, x, _, _ = submersive_mlp(widths=(6, 4, 3), batch=batch)
    net = mw.chain(*layers)
    forward = lambda x_: net.forward(params, x_)
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    assert int(first_coupled_example(forward, loss, x)) == -1
    assert int(first_coupled_example(forward, lambda y: loss(y) * jnp.nan, x)) == -1
    _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x)
    _, pure = jax.jit(mw.value_and_grad(layers, loss, method="moonwalk"))(params, x)
    assert float(relative_error(pure, reference)) <= 1e-5
    # Every ordered pair is caught, with the index of the example whose loss reads another's.
    for reader, read in itertools.permutations(range(batch), 2):
        leak = lambda y, r=reader, a=read: loss(y) + jnp.zeros(batch).at[r].set(jnp.sum(y[a]))
        assert int(first_coupled_example(forward, leak, x, chunk_size=1)) == reader


def test_pure_moonwalk_input_jvps_run_chunk_size_at_a_time():
    """The d input-coordinate JVPs ran all at once (memory d x batch x width per live
    activation); ``chunk_size`` now bounds them. Same gradient, less temp memory."""
    net, params, x = deep_submersive(4, 0.9, width=256, batch=32)
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    fns = {c: mw.value_and_grad(net, loss, method="moonwalk", chunk_size=c) for c in (8, 256)}
    temp = {c: compiled_memory(fn, params, x).temp_bytes for c, fn in fns.items()}
    assert temp[8] <= temp[256] / 4, temp
    grads = {c: jax.jit(fn)(params, x)[1] for c, fn in fns.items()}
    assert float(relative_error(grads[8], grads[256])) <= 1e-6


def test_with_drift_needs_a_moonwalk_method():
    net, _, _ = deep_submersive(2, 0.9)
    with pytest.raises(ValueError, match="with_drift=True needs a Moonwalk method"):
        mw.value_and_grad(net, lambda y: jnp.sum(y, -1), method="backprop", with_drift=True)


@pytest.mark.parametrize("method", sorted(set(mw.METHODS) - {"revbackprop"}))
def test_a_parameter_free_network_has_empty_gradients_for_every_method(method):
    """``forward`` raised IndexError and ``projected_forward`` ZeroDivisionError with no
    parameters to differentiate; every method returns the (empty) params structure."""
    net, x = [mw.leaky_relu(0.5)], normal(0, (3, 4))
    loss = lambda y: jnp.sum(y**3, -1)
    value, grads = mw.value_and_grad(net, loss, method=method)((None,), x, key=jax.random.key(0))
    np.testing.assert_allclose(value, jnp.mean(loss(jnp.where(x > 0, x, 0.5 * x))), rtol=1e-6)
    assert grads == (None,)


# --- bad input ---------------------------------------------------------------------------------


def test_value_and_grad_argument_errors():
    layers, params, x, loss, args = submersive_mlp(widths=(6, 4), batch=3)
    with pytest.raises(ValueError, match="unknown method 'adjoint'"):
        mw.value_and_grad(layers, loss, method="adjoint")
    with pytest.raises(ValueError, match="num_tangents must be a positive int, got 0"):
        mw.value_and_grad(layers, loss, method="projected_forward", num_tangents=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got True"):
        mw.value_and_grad(layers, loss, method="forward", chunk_size=True)  # was taken as 1
    with pytest.raises(ValueError, match="needs key="):
        mw.value_and_grad(layers, loss, method="projected_forward")(params, x, *args)
    scalar_loss = lambda y, t: jnp.sum((y - t) ** 2)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(3,\).*got shape \(\) \(a scalar"):
        mw.value_and_grad(layers, scalar_loss, method="moonwalk")(params, x, *args)
    # One example without its batch axis: its width (6) was taken for the batch, unexplained.
    per_example = lambda y, t: jnp.sum((y - t) ** 2, axis=-1)
    with pytest.raises(ValueError, match=r"= \(6,\), batch being x's leading axis.*leading batch"):
        mw.value_and_grad(layers, per_example, method="moonwalk")(params, x[0], args[0][0])
    with pytest.raises(ValueError, match="expects a tuple of 2 per-layer params"):
        mw.value_and_grad(layers, loss, method="backprop")(params[0], x, *args)
    # Not a Layer (an nnx module, a coupling): named, instead of an AttributeError.
    for where, call in [
        ("moonwalk.stack", lambda: mw.stack(rj.swap())),
        ("moonwalk.stack", lambda: mw.stack(rj.swap(), "named")),  # named: was an AttributeError
        ("value_and_grad", lambda: mw.value_and_grad(rj.swap(), loss, method="backprop")),
        ("moonwalk.vijp", lambda: mw.vijp(rj.swap(), None, x, x)),
        (r"chain\('chain'\) item 1", lambda: mw.chain(layers[0], rj.swap())),
    ]:
        with pytest.raises(TypeError, match=rf"{where}: expected a revjax.moonwalk Layer"):
            call()
    # Inside value_and_grad's list the item is named as the caller wrote it (it was
    # "chain('chain') item 1", a chain the caller never built).
    with pytest.raises(TypeError, match=r"value_and_grad: layers\[1\]: expected a revjax"):
        mw.value_and_grad([layers[0], rj.swap()], loss, method="backprop")
    # Any other iterable of layers is a chain, as before (a NamedTuple of layers included).
    Net = collections.namedtuple("Net", [f"layer{i}" for i in range(len(layers))])
    for sequence in (list(layers), tuple(layers), Net(*layers), (layer for layer in layers)):
        _, grads = mw.value_and_grad(sequence, loss, method="backprop")(params, x, *args)
        assert len(grads) == len(layers)


@pytest.mark.parametrize("method", ["moonwalk", "forward", "projected_forward"])
def test_forward_mode_methods_explain_a_custom_vjp_inside(method):
    """A branch with revjax.activations.gelu (a custom_vjp) cannot be JVP'd; JAX's bare
    'can't apply forward-mode autodiff' now carries a note naming the method and the way out,
    which works: mixed Moonwalk takes the same network."""
    f = lambda p, h: rj.activations.gelu(h @ p)
    layer = mw.stack(mw.from_coupling(rj.additive_coupling(f, f)))
    params = (0.1 * normal(0, (3, 4, 4)), 0.1 * normal(1, (3, 4, 4)))
    x = (normal(2, (2, 4)), normal(3, (2, 4)))
    loss = lambda y: jnp.sum(y[0] ** 2, -1) + jnp.sum(y[1] ** 2, -1)
    with pytest.raises(TypeError, match="forward-mode") as info:
        mw.value_and_grad(layer, loss, method=method)(params, x, key=jax.random.key(0))
    assert any(f"method={method!r}) differentiates" in n for n in info.value.__notes__)
    _, grads = mw.value_and_grad(layer, loss, method="mixed_moonwalk")(params, x)
    _, reference = mw.value_and_grad(layer, loss, method="backprop")(params, x)
    assert float(relative_error(grads, reference)) <= 1e-5


def test_mixed_moonwalk_takes_a_custom_vjp_inside_a_dense_layer():
    """``dense`` builds its Jacobian by reverse mode, so a width-reducing dense layer with
    revjax's inverted GELU (a custom_vjp, no JVP) runs under mixed Moonwalk (it raised the
    bare forward-mode TypeError when the Jacobian came from ``jax.jacfwd``)."""
    layers = [mw.dense(lambda p, h: rj.activations.gelu(h @ p), name="gelu_dense")]
    params = (jnp.eye(5, 3) + 0.1 * normal(0, (5, 3)),)
    x, target = normal(1, (4, 5)), normal(2, (4, 3))
    loss = lambda y, t: jnp.sum((y - t) ** 2, -1)
    value, grads = mw.value_and_grad(layers, loss, method="mixed_moonwalk")(params, x, target)
    ref_value, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x, target)
    assert np.isclose(float(value), float(ref_value))
    # float32 SVD solve of a 3x5 Jacobian; measured ~1e-7.
    assert float(relative_error(grads, reference)) <= 1e-5


def test_revbackprop_through_a_shape_changing_coupling_is_refused_by_name():
    squeeze = mw.from_coupling(rj.layers.squeeze(), name="squeeze0")
    x = normal(0, (2, 4, 4, 2))
    loss = lambda y: jnp.sum(y**2, (1, 2, 3))
    shapes = r"layer 'squeeze0' maps float32\[2, 4, 4, 2\] to float32\[2, 2, 2, 8\]"
    with pytest.raises(TypeError, match=shapes):
        mw.value_and_grad(squeeze, loss, method="revbackprop")(None, x)
    value, _ = mw.value_and_grad(squeeze, loss, method="mixed_moonwalk")(None, x)
    assert np.isclose(float(value), float(jnp.mean(loss(x))))


# --- dtypes, pytree types and composition ---------------------------------------------------


def test_bfloat16_network_with_a_float32_loss():
    """Low-precision networks usually compute their loss in float32. Every method must accept
    that and return gradients in the parameters' dtype."""
    layers, params, x, _, (target,) = submersive_mlp(widths=(8, 6, 4), batch=5)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x = x.astype(jnp.bfloat16)
    loss = lambda y, t: 0.5 * jnp.sum((y.astype(jnp.float32) - t) ** 2, axis=-1)
    _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x, target)
    for method in ("moonwalk", "mixed_moonwalk", "forward"):
        _, grads = jax.jit(mw.value_and_grad(layers, loss, method=method))(params, x, target)
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}, method
        # bfloat16 keeps 8 significant bits (relative rounding 2^-8 = 3.9e-3 per operation);
        # the triangular solves and the sweep add a few such roundings; measured 8.8e-3.
        assert float(relative_error(grads, reference)) <= 3e-2, method
    fn = mw.value_and_grad(layers, loss, method="projected_forward")
    _, grads = fn(params, x, target, key=jax.random.key(0))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_a_bfloat16_input_to_a_float32_network_keeps_float32_gradients(method):
    """The input cotangent h_0 was rounded to x's bfloat16 before the sweep, which put a
    bfloat16-sized error (1.4e-3) into every gradient of the float32 layers after it; forward
    mode and backprop have none. Kept in float32 it is at float32 round-off (measured 1.1e-7
    and 8.4e-8)."""
    key = jax.random.key
    layers = [mw.submersive_linear("l0"), mw.leaky_relu(0.5, "a0"), mw.submersive_linear("l1")]
    params = (mw.init_submersive_linear(key(0), 16, 12), None,
              mw.init_submersive_linear(key(1), 12, 8))  # fmt: skip
    x = jax.random.normal(key(2), (8, 16)).astype(jnp.bfloat16)
    loss = lambda y: jnp.sum(y**2 + y, axis=-1)
    _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x)
    _, grads = jax.jit(mw.value_and_grad(layers, loss, method=method))(params, x)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert float(relative_error(grads, reference)) <= 1e-6


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_float32_layers_after_a_bfloat16_leaky_relu_keep_float32_gradients(method):
    """A bfloat16 leaky ReLU computed its y_bar in float32, then rounded it to bfloat16 (and
    divided by the exact slope, not the bfloat16-rounded one forward applies): the float32
    layers after it got gradients 2.2e-3 (moonwalk) and 1.3e-3 (mixed) off, forward mode
    5.2e-8. Measured now 1.2e-7 and 6.4e-8."""
    key = jax.random.key
    layers = [mw.leaky_relu(0.3, "a0"), mw.submersive_linear("l0"), mw.leaky_relu(0.5, "a1"),
              mw.submersive_linear("l1")]  # fmt: skip
    params = (None, mw.init_submersive_linear(key(1), 6, 6, scale=0.5), None,
              mw.init_submersive_linear(key(3), 6, 4, scale=0.5))  # fmt: skip
    x = jax.random.normal(key(2), (8, 6)).astype(jnp.bfloat16)
    loss = lambda y: jnp.sum(y**2, axis=-1)
    _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x)
    _, grads = jax.jit(mw.value_and_grad(layers, loss, method=method))(params, x)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert float(relative_error(grads, reference)) <= 1e-6


def mixed_dtype_networks():
    """A bfloat16 layer then a float32 one, and the reverse (name: (layers, params, x))."""
    key = jax.random.key
    bf16 = jnp.bfloat16
    x = normal(0, (4, 6)).astype(bf16)
    actnorm = lambda seed: {"log_scale": normal(seed, (6,), 0.3), "bias": normal(seed + 1, (6,))}
    return {
        "bf16 linear -> f32 linear": (
            [mw.submersive_linear("l0"), mw.submersive_linear("l1")],
            (
                mw.init_submersive_linear(key(1), 6, 5, dtype=bf16),
                mw.init_submersive_linear(key(2), 5, 3),
            ),
            x,
        ),
        "bf16 linear -> f32 actnorm": (
            [mw.submersive_linear("l0"), mw.from_coupling(rj.layers.actnorm(), "act1")],
            (mw.init_submersive_linear(key(1), 6, 6, dtype=bf16), actnorm(3)),
            x,
        ),
        "bf16 actnorm -> f32 linear": (
            [mw.from_coupling(rj.layers.actnorm(), "act0"), mw.submersive_linear("l1")],
            (
                jax.tree.map(lambda a: a.astype(bf16), actnorm(3)),
                mw.init_submersive_linear(key(2), 6, 4),
            ),
            x,
        ),
    }


@pytest.mark.parametrize("network", list(mixed_dtype_networks()))
@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_layers_of_different_dtypes_match_jax_grad(network, method):
    """A cotangent crossing from a float32 layer into a bfloat16 one (or back) met a pullback
    of the other dtype: 'unexpected JAX type ... got float32[4,5], expected bfloat16[4,5]'.
    Each step and pull now casts the cotangent to its primal's dtype."""
    layers, params, x = mixed_dtype_networks()[network]
    loss = lambda y: jnp.sum(y.astype(jnp.float32) ** 2, -1)
    objective = lambda p: jnp.mean(loss(mw.chain(*layers).forward(p, x)))
    reference = jax.grad(objective)(params)
    value, grads = jax.jit(mw.value_and_grad(layers, loss, method=method))(params, x)
    assert np.isclose(float(value), float(objective(params)), rtol=1e-2)
    assert jax.tree.map(jnp.result_type, grads) == jax.tree.map(jnp.result_type, params)
    # bfloat16 rounding (2^-8 = 3.9e-3 relative per operation) in the first layer's input,
    # output and solve; measured 1.6e-3 to 4.4e-3 over 3 seeds of each network (jit and not
    # round differently, so even backprop under jit differs from this reference by ~2e-3).
    assert float(relative_error(grads, reference)) <= 3e-2


@pytest.mark.parametrize("method", mw.METHODS)
def test_integer_params_get_a_float0_gradient_from_every_method(method):
    """projected_forward drew random tangents for an integer leaf and returned 13 (int32) as
    its "gradient", forward returned int32 0, moonwalk float0 and backprop raised jax.grad's
    TypeError; now every method gives float0, as jax.grad(..., allow_int=True)."""
    branch = lambda p, h: jnp.tanh(h @ p["w"]) * p["n"] * p["on"]
    coupling = mw.from_coupling(rj.additive_coupling(branch, branch))
    half = lambda seed: {"w": normal(seed, (3, 3), 0.3), "n": jnp.int32(2), "on": jnp.bool_(1)}
    params, x = (half(0), half(1)), (normal(2, (4, 3)), normal(3, (4, 3)))
    loss = lambda y: jnp.sum(y[0] * y[1], -1)
    fn = jax.jit(mw.value_and_grad(coupling, loss, method=method, num_tangents=4))
    _, grads = fn(params, x, key=jax.random.key(0))
    _, reference = jax.value_and_grad(
        lambda p: jnp.mean(loss(coupling.forward(p, x))), allow_int=True
    )(params)
    assert jax.tree.map(jnp.result_type, grads) == jax.tree.map(jnp.result_type, reference)
    assert {g["n"].dtype for g in grads} == {jnp.dtype(jax.dtypes.float0)}
    if method != "projected_forward":  # an estimate; the others are exact
        floats = lambda t: [g["w"] for g in t]
        assert float(relative_error(floats(grads), floats(reference))) <= 1e-5
    # The dense fallback (no coupling), integer leaf and all, agrees too.
    if method != "revbackprop":
        dense = mw.dense(lambda p, h: jnp.tanh(h @ p["w"]) * p["n"])
        p = {"w": normal(4, (6, 4), 0.3), "n": jnp.int32(2)}
        fn = mw.value_and_grad(dense, lambda y: jnp.sum(y, -1), method=method, num_tangents=2)
        _, grads = fn(p, normal(5, (3, 6)), key=jax.random.key(0))
        assert grads["n"].dtype == jax.dtypes.float0 and grads["w"].dtype == jnp.float32


def test_gradients_keep_a_namedtuple_params_type():
    from typing import NamedTuple

    class Net(NamedTuple):
        linear: dict
        act: None

    layers, params, x, loss, args = submersive_mlp(widths=(6, 4), batch=3)
    params = Net(*params)
    for method in ("backprop", "moonwalk", "mixed_moonwalk"):
        _, grads = mw.value_and_grad(layers, loss, method=method)(params, x, *args)
        assert type(grads) is Net, method


def test_revbackprop_through_parameter_free_and_nested_layers():
    """A parameter-free coupling (no layer axis to read L from) and a stack of stacks both run
    through reversible_scan and match backprop."""
    from revjax import layers as rl

    w = 6
    x = (normal(0, (4, w)), normal(1, (4, w)))
    coupling = mw.from_coupling(mlp_coupling())
    leaky = rl.leaky_relu(0.3)  # parameter-free, applied to both halves
    both = lambda fn: lambda p, h: tuple(fn(p, a) for a in h)
    act = mw.from_coupling(rj.Coupling(both(leaky.forward), both(leaky.inverse)), "act")
    one = jax.tree.map(lambda a: a[0], init_mlp_stack(jax.random.key(2), 1, w, 12))
    nested = mw.stack(mw.stack(coupling), name="outer")
    stacked = jax.tree.map(
        lambda a: a.reshape(2, 3, *a.shape[1:]), init_mlp_stack(jax.random.key(3), 6, w, 12)
    )
    loss = lambda y: jnp.sum(jnp.tanh(y[0]) * y[1], axis=-1)
    for layers, params in (([coupling, act], (one, None)), (nested, stacked)):
        _, reference = mw.value_and_grad(layers, loss, method="backprop")(params, x)
        _, grads = jax.jit(mw.value_and_grad(layers, loss, method="revbackprop"))(params, x)
        assert float(relative_error(grads, reference)) <= 1e-5


@pytest.mark.parametrize("method", mw.METHODS)
def test_an_empty_batch_is_refused_by_every_method(method):
    """A zero-size batch gave NaN (backprop), a reshape error (moonwalk) or a ZeroDivisionError
    from the leaky ReLU's bit packing (mixed Moonwalk); now one clear error for all."""
    x = jnp.zeros((0, 5))
    loss = lambda y, t: jnp.sum((y - t) ** 2, -1)
    with pytest.raises(ValueError, match=rf"method={method!r}\): x has an empty batch.*\(0, 5\)"):
        mw.value_and_grad([mw.leaky_relu(0.5)], loss, method=method)((None,), x, x)


@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk"])
def test_drift_tracks_the_gradient_error_within_a_small_factor(method):
    """Drift is an estimate, not a bound: on 3-layer affine-coupling RevNets (width 5, weights
    ~ N(0, 0.25), 8 seeds) error / drift was 0.26 to 1.03 (seed 0 above 1, found by review),
    while the errors themselves span 6e-6 to 2e-2."""
    affine = lambda p, h: (jnp.tanh(h @ p["w1"]), h @ p["w2"])
    net = mw.stack(mw.from_coupling(rj.affine_coupling(affine, affine)))
    loss = lambda y: jnp.sum(jnp.sin(y[0]) * y[1], -1)
    fn = jax.jit(mw.value_and_grad(net, loss, method=method, with_drift=True))
    reference_fn = jax.jit(mw.value_and_grad(net, loss, method="backprop"))
    ratios = []
    for seed in range(8):
        k = jax.random.split(jax.random.key(seed), 6)
        branch = lambda a, b: {"w1": 0.5 * jax.random.normal(a, (3, 5, 5)),
                               "w2": 0.5 * jax.random.normal(b, (3, 5, 5))}  # fmt: skip
        params = (branch(k[0], k[1]), branch(k[2], k[3]))
        x = (jax.random.normal(k[4], (3, 5)), jax.random.normal(k[5], (3, 5)))
        _, grads, drift = fn(params, x)
        ratios.append(float(relative_error(grads, reference_fn(params, x)[1])) / float(drift))
    # Same order of magnitude both ways; the margin over the measured 0.26..1.03 is for other
    # platforms' round-off (these are float32 errors of 1e-5 and up).
    assert 0.1 <= min(ratios) and max(ratios) <= 2.0, ratios
