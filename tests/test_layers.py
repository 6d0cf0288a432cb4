"""layers: layer-wise invertible layers invert, have the right log-det, compose, bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import revjax as rj
from revjax import layers
from revjax.diagnostics import reconstruction_report, relative_error
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.precision import LowPrecisionStreamWarning, Policy
from revjax.scan import plain_scan


def image(seed, n, h, w, c):
    return jax.random.normal(jax.random.key(seed), (n, h, w, c))


def make(kind, seed, c):
    """(layer, params) for one kind with C channels."""
    key = jax.random.key(seed + 100)
    if kind == "leaky_relu":
        return layers.leaky_relu(0.2), None
    if kind == "actnorm":
        return layers.actnorm(), layers.init_actnorm(image(seed + 1, 3, 2, 2, c) * 3 + 1)
    if kind == "permute":
        return layers.permute(np.random.default_rng(seed).permutation(c)), None
    if kind == "conv1x1":
        perm = np.random.default_rng(seed).permutation(c)
        params = layers.init_conv1x1(key, c, scale=0.3)
        params["log_scale"] = 0.3 * jax.random.normal(jax.random.key(seed + 5), (c,))
        return layers.conv1x1(perm), params
    if kind == "squeeze":
        return layers.squeeze(), None
    if kind == "batch_pool":
        return layers.batch_pool(), None
    raise ValueError(kind)


KINDS = ["leaky_relu", "actnorm", "permute", "conv1x1", "squeeze", "batch_pool"]


# 1e-6 (the bound, float32): one forward and one inverse, a few ulps; the leaky ReLU's
# 1/slope = 5 and conv1x1's triangular solves (near-identity factors) stay well inside it.
@pytest.mark.parametrize("kind", KINDS)
@given(
    seed=st.integers(0, 2**20),
    # A few shapes (each one compiles anew), random values and parameters for each.
    shape=st.sampled_from([(1, 2, 2, 1), (2, 4, 2, 3), (3, 2, 6, 5)]),
)
def test_inverse_of_forward_is_identity(kind, seed, shape):
    layer, params = make(kind, seed, shape[-1])
    x = image(seed, *shape)
    y = jax.jit(layer.forward)(params, x)
    x_rec = jax.jit(layer.inverse)(params, y)
    assert x_rec.shape == x.shape
    assert float(relative_error(x_rec, x)) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_matches_the_jacobian(kind):
    layer, params = make(kind, 3, 2)
    x = image(4, 2, 2, 2, 2)  # N = 2: a log-det that forgot the batch would differ by 2x
    flat = lambda v: layer.forward(params, v.reshape(x.shape)).reshape(-1)
    jac = jax.jacfwd(flat)(x.reshape(-1))
    _, logdet = jnp.linalg.slogdet(jac)
    np.testing.assert_allclose(layer.log_det(params, x), logdet, atol=1e-5)


def aux_of(layer, x):
    """The batch statistics ``batch_norm`` uses on ``x`` (its side information)."""
    return layer.aux(None, x)


SCALING = ["leaky_relu", "actnorm", "conv1x1", "batch_norm", "batch_norm_inference"]


def _scaling_layer(kind, dtype):
    """(layer, params) of a scaling kind, params cast to ``dtype``."""
    if kind == "batch_norm":
        layer, params = layers.batch_norm(), {"gamma": jnp.array([1.3, -0.7]), "beta": jnp.ones(2)}
    elif kind == "batch_norm_inference":
        layer = layers.batch_norm_inference()
        params = {"gamma": jnp.array([1.3, -0.7]), "beta": jnp.ones(2), "mean": jnp.ones(2),
                  "var": jnp.array([0.5, 2.0])}  # fmt: skip
    else:
        layer, params = make(kind, 3, 2)
    return layer, jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


@pytest.mark.parametrize("kind", SCALING)
def test_log_det_keeps_float64(kind):
    """With x64 params and input the log-det is float64 and matches the Jacobian's to float64
    round-off (it was cast to float32 at the end: a float32 result, float32 round-off). Batch
    norm's is that of the map with its batch statistics held fixed (README), the inference
    layer given those statistics."""
    with jax.enable_x64(True):
        layer, params = _scaling_layer(kind, jnp.float64)
        x = image(4, 2, 2, 2, 2).astype(jnp.float64) + 0.3  # N = 2, as above
        fixed, fixed_params = layer, params
        if kind == "batch_norm":
            fixed, fixed_params = layers.batch_norm_inference(), params | aux_of(layer, x)
        flat = lambda v: fixed.forward(fixed_params, v.reshape(x.shape)).reshape(-1)
        _, expected = jnp.linalg.slogdet(jax.jacfwd(flat)(x.reshape(-1)))
        log_det = layer.log_det(params, x)
        assert log_det.dtype == jnp.float64
        np.testing.assert_allclose(float(log_det), float(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", SCALING)
def test_log_det_of_bfloat16_params_is_summed_in_float32(kind):
    """bfloat16 params and input: the log-det is float32 and equals the float32 log-det of the
    same (bf16-valued) scales; the bf16 sum it replaced was 0.2% to 4% off here."""
    layer, params = _scaling_layer(kind, jnp.bfloat16)
    x = (image(4, 8, 4, 4, 2) + 0.3).astype(jnp.bfloat16)
    log_det = layer.log_det(params, x)
    assert log_det.dtype == jnp.float32
    if kind.startswith("batch_norm"):  # logs of the bf16 factors the forward pass applies
        f64 = lambda a: np.asarray(a, np.float64)
        scale = layers._bn_scale(params["gamma"], 1e-2)
        if kind == "batch_norm":  # (x - mean) / std * scale
            std = jnp.sqrt(aux_of(layer, x)["var"] + 1e-5)
            expected = 128 * np.sum(np.log(f64(scale)) - np.log(f64(std)))
        else:  # x * (scale / sqrt(var + eps)) + shift
            expected = 128 * np.sum(np.log(f64(scale / jnp.sqrt(params["var"] + 1e-5))))
    else:  # the same bf16 values, widened first
        wide = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        expected = layer.log_det(wide, x.astype(jnp.float32))
    # float32 round-off of a sum over 128 pixels (measured ~1e-7); the bf16 sum missed by >1e-3.
    np.testing.assert_allclose(float(log_det), float(expected), rtol=1e-5)


def test_shapes_of_the_pooling_layers():
    x = image(0, 2, 4, 6, 3)
    assert layers.squeeze().forward(None, x).shape == (2, 2, 3, 12)
    pooled = layers.batch_pool().forward(None, x)
    assert pooled.shape == (8, 2, 3, 3)
    # Example k N + n is phase k = 2 dh + dw of example n: phase (1, 0) of example 1.
    np.testing.assert_array_equal(pooled[2 * 2 + 1], x[1, 1::2, 0::2])


def test_actnorm_initialises_from_data():
    x = image(0, 16, 4, 4, 3) * jnp.array([1.0, 5.0, 0.1]) + jnp.array([2.0, -1.0, 0.0])
    y = layers.actnorm().forward(layers.init_actnorm(x), x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_layers_compose_and_run_in_reversible_scan():
    """A stack of (actnorm, leaky ReLU, conv1x1) layers through reversible_scan (generic
    inverse-then-vjp backward) equals plain backprop to 1e-5 at L = 8."""
    block = rj.sequence(layers.actnorm(), layers.leaky_relu(0.5), layers.conv1x1())
    depth, c = 8, 4
    keys = jax.random.split(jax.random.key(0), depth)
    params = (
        {"log_scale": 0.1 * jax.random.normal(keys[0], (depth, c)), "bias": jnp.zeros((depth, c))},
        None,
        jax.vmap(lambda k: layers.init_conv1x1(k, c))(keys),
    )
    x = image(1, 2, 4, 4, c)

    def loss(scan):
        return lambda p, x_: jnp.sum(jnp.tanh(scan(block, p, x_)))

    g = jax.grad(loss(rj.reversible_scan), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss(plain_scan), argnums=(0, 1))(params, x)
    assert float(relative_error(g, g_ref)) <= 1e-5


@pytest.mark.parametrize("kind", ["squeeze", "batch_pool"])
@pytest.mark.parametrize("shape", [(0, 2, 2, 1), (0, 4, 6, 3), (2, 0, 4, 3)])
def test_reshaping_layers_round_trip_an_empty_array(kind, shape):
    """squeeze raised ZeroDivisionError at batch 0 (a reshape with -1 over zero elements);
    batch_pool and conv1x1 already took an empty batch. Exact: no arithmetic, only moves."""
    layer, params = make(kind, 0, shape[-1])
    n, h, w, c = shape
    expected = (n, h // 2, w // 2, 4 * c) if kind == "squeeze" else (4 * n, h // 2, w // 2, c)
    y = layer.forward(params, jnp.zeros(shape))
    assert y.shape == expected
    assert layer.inverse(params, y).shape == shape


@pytest.mark.parametrize("slope", [0.0, -1.0, float("inf")])
def test_bad_slope_is_rejected(slope):
    with pytest.raises(ValueError, match="slope must be finite and > 0"):
        layers.leaky_relu(slope)


def test_bad_shapes_and_permutations_are_rejected():
    with pytest.raises(ValueError, match=r"even H and W, got shape \(1, 3, 4, 2\)"):
        layers.squeeze().forward(None, image(0, 1, 3, 4, 2))
    with pytest.raises(ValueError, match="batch_pool: expects"):
        layers.batch_pool().forward(None, jnp.ones((4, 4, 2)))
    with pytest.raises(ValueError, match="not a permutation"):
        layers.permute([0, 0, 1])
    with pytest.raises(ValueError, match="not a permutation"):  # once failed only at forward
        layers.permute([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match=r"layers.conv1x1: .* not a permutation"):
        layers.conv1x1([0, 0, 1])
    with pytest.raises(ValueError, match=r"conv1x1: expected 3 channels"):
        layers.conv1x1().forward(layers.init_conv1x1(jax.random.key(0), 3), jnp.ones((2, 4)))
    # A permutation of the wrong length failed inside dot_general / a reshape.
    four = layers.init_conv1x1(jax.random.key(0), 4)
    for run in (layers.conv1x1([1, 0]).forward, layers.conv1x1([1, 0]).inverse):
        with pytest.raises(ValueError, match=r"conv1x1: permutation has 2 entries but .* 4 chan"):
            run(four, jnp.ones((2, 4)))


def test_layerwise_chain_loses_snr_much_faster_than_couplings():
    """Hascoet et al.'s finding, in bfloat16 at L = 16: a chain of layer-wise inverses
    (actnorm, leaky ReLU 0.5, conv1x1) falls from 46 dB after one inverse step to -28 dB after
    sixteen (about -5 dB per step), additive MLP couplings of the same width from 57 dB to 41 dB
    (about -1 dB per step). Asserted with margins: couplings stay above 35 dB, the chain ends
    below 0 dB and falls at least 3x faster per step."""
    depth, c, dt = 16, 16, jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), depth)
    chain = rj.sequence(layers.actnorm(), layers.leaky_relu(0.5), layers.conv1x1())
    chain_params = jax.tree.map(
        lambda a: a.astype(dt),
        (
            {
                "log_scale": 0.1 * jax.random.normal(keys[0], (depth, c)),
                "bias": jnp.zeros((depth, c)),
            },
            None,
            jax.vmap(lambda k: layers.init_conv1x1(k, c, 0.1))(keys),
        ),
    )
    x = jax.random.normal(jax.random.key(1), (64, c)).astype(dt)
    chain_db = np.asarray(reconstruction_report(chain, chain_params, x)["snr_db"])
    coupling_params = init_mlp_stack(jax.random.key(0), depth, c // 2, 16, dtype=dt)
    halves = (x[:, : c // 2], x[:, c // 2 :])
    coupling_db = np.asarray(
        reconstruction_report(mlp_coupling(), coupling_params, halves)["snr_db"]
    )
    # index 0 = the input of layer 0, after 16 inverse steps; index -1 = after one step.
    assert coupling_db[0] > 35.0 and chain_db[0] < 0.0
    chain_drop, coupling_drop = chain_db[-1] - chain_db[0], coupling_db[-1] - coupling_db[0]
    assert chain_drop > 3 * coupling_drop


def hybrid_setup(channels, inner_layers, blocks, batch, branch_of):
    inner = rj.sequence(layers.conv1x1(), layers.actnorm(), layers.leaky_relu(0.5))

    def branch_params(key):
        keys = jax.random.split(key, inner_layers)
        return (
            jax.vmap(lambda k: layers.init_conv1x1(k, channels))(keys),
            {
                "log_scale": 0.1 * jax.random.normal(key, (inner_layers, channels)),
                "bias": jnp.zeros((inner_layers, channels)),
            },
            None,
        )

    keys = jax.random.split(jax.random.key(0), 2 * blocks)
    params = (jax.vmap(branch_params)(keys[:blocks]), jax.vmap(branch_params)(keys[blocks:]))
    branch = branch_of(inner)
    x = tuple(jax.random.normal(k, (batch, channels)) for k in jax.random.split(keys[0]))
    return rj.additive_coupling(branch, branch), params, x


def stored_branch(inner):
    return lambda p, h: plain_scan(inner, p, h)


def test_hybrid_block_gradient_matches_backprop():
    """float32, 3 blocks of branches with 4 layer-wise layers each: 1e-5 (measured ~1e-7)."""
    block, params, x = hybrid_setup(8, 4, 3, 16, layers.layerwise_branch)
    reference, _, _ = hybrid_setup(8, 4, 3, 16, stored_branch)
    loss = lambda b, scan: lambda p, x_: jnp.sum(jnp.tanh(scan(b, p, x_)[0]))
    g = jax.grad(loss(block, rj.reversible_scan))(params, x)
    g_ref = jax.grad(loss(reference, plain_scan))(params, x)
    assert float(relative_error(g, g_ref)) <= 1e-5


def test_hybrid_block_gradient_float32_and_bfloat16_across_inner_depth():
    """DESIGN's numerics rule for the hybrid block, whose branch vjp reconstructs its hidden
    activations layer by layer: the gradient against the same block with the branch's
    activations stored (2 blocks; 2 and 8 inner layers). Measured on CPU: float32 1.4e-7 and
    6.4e-7; a bfloat16 stream (outer and inner, named by policies) 1.2e-2 and 6.3e-2, the
    layer-wise inverses' fast drift (test above)."""
    bf16 = Policy(stream_dtype=jnp.bfloat16)
    errors = {}
    for inner in (2, 8):
        for dtype, policy in ((jnp.float32, None), (jnp.bfloat16, bf16)):
            branch = lambda b, policy=policy: layers.layerwise_branch(b, policy=policy)
            stored = lambda b, policy=policy: lambda p, h: plain_scan(b, p, h, policy=policy)
            block, params, x = hybrid_setup(8, inner, 2, 16, branch)
            reference, _, _ = hybrid_setup(8, inner, 2, 16, stored)
            params, x = jax.tree.map(lambda a, d=dtype: a.astype(d), (params, x))

            def loss(b, scan, policy=policy):
                return lambda p, x_: jnp.sum(jnp.tanh(scan(b, p, x_, policy=policy)[0]))

            g = jax.grad(loss(block, rj.reversible_scan))(params, x)
            g_ref = jax.grad(loss(reference, plain_scan))(params, x)
            errors[inner, dtype] = float(relative_error(g, g_ref))
    assert max(errors[i, jnp.float32] for i in (2, 8)) <= 1e-5, errors
    assert 1e-4 < errors[2, jnp.bfloat16] < errors[8, jnp.bfloat16] <= 0.2, errors


def test_layerwise_branch_policy_reaches_the_inner_scan():
    """An outer bfloat16 compute policy casts the branch input, so the inner stream was
    bfloat16 with no way to name it (the gradient then warns); the branch's own policy now
    reaches the inner scan: a float32 inner stream, and no warning."""
    outer = Policy(compute_dtype=jnp.bfloat16)
    for inner_policy, warns in ((None, True), (Policy(compute_dtype=jnp.bfloat16), False)):
        branch = lambda b, p=inner_policy: layers.layerwise_branch(b, policy=p)
        block, params, x = hybrid_setup(8, 2, 2, 16, branch)
        loss = lambda p, b=block, x=x: jnp.sum(
            jnp.tanh(rj.reversible_scan(b, p, x, policy=outer)[0])
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = jax.grad(loss)(params)
        assert any(w.category is LowPrecisionStreamWarning for w in caught) == warns
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_hybrid_block_second_derivatives_in_reverse_over_reverse():
    """The branch's own reversible_scan is a custom_vjp in the forward pass: jax.hessian (forward
    over reverse) raises JAX's TypeError there (README says so), jacrev of grad works."""
    block, params, x = hybrid_setup(4, 2, 2, 3, layers.layerwise_branch)
    reference, _, _ = hybrid_setup(4, 2, 2, 3, stored_branch)
    loss = lambda b, scan: lambda x1: jnp.sum(jnp.sin(scan(b, params, (x1, x[1]))[0]))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.hessian(loss(block, rj.reversible_scan))(x[0])
    hessian = jax.jacrev(jax.grad(loss(block, rj.reversible_scan)))(x[0])
    expected = jax.hessian(loss(reference, plain_scan))(x[0])
    # float32 second-order round-off through 2 blocks of 2 layer-wise layers (measured ~1e-7).
    assert float(relative_error(hessian, expected)) <= 1e-5


def test_hybrid_block_needs_less_memory_than_the_revnet_block():
    """Branches of 8 layer-wise layers, halves 64 wide, 4 blocks, batch 512: gradient temp
    2.4 MiB for hybrid blocks vs 7.3 MiB for RevNet blocks (whose branch recomputation stores
    its 8 hidden layers) vs 27.6 MiB for plain backprop."""

    def temp(branch_of, scan):
        block, params, x = hybrid_setup(64, 8, 4, 512, branch_of)
        loss = lambda p, x_: jnp.sum(scan(block, p, x_)[0] ** 2)
        return compiled_memory(jax.grad(loss), params, x).temp_bytes

    hybrid = temp(layers.layerwise_branch, rj.reversible_scan)
    revnet = temp(stored_branch, rj.reversible_scan)
    plain = temp(stored_branch, plain_scan)
    assert hybrid <= 0.5 * revnet and revnet <= 0.5 * plain, (hybrid, revnet, plain)


# --- invertible batch norm --------------------------------------------------------------------


def bn_params(seed, c, depth=None):
    shape = (c,) if depth is None else (depth, c)
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"gamma": jax.random.normal(k1, shape), "beta": 0.1 * jax.random.normal(k2, shape)}


@given(seed=st.integers(0, 2**20), shape=st.sampled_from([(4, 3), (2, 4, 2, 5), (8, 2)]))
def test_batch_norm_inverts_with_its_stored_statistics(seed, shape):
    """1e-6: the stored mean/std make the inverse exact up to round-off; gamma is drawn around
    0, where |gamma| + scale_eps keeps the scale >= 0.01 (at most 100x amplification of an ulp
    of the output, still far below 1e-6 relative)."""
    bn = layers.batch_norm()
    params = bn_params(seed, shape[-1])
    x = 3.0 * jax.random.normal(jax.random.key(seed + 1), shape) + 2.0
    y, side = jax.jit(lambda p, v: (bn.forward(p, v), bn.aux(p, v)))(params, x)
    x_rec = jax.jit(lambda p, v, a: bn.inverse(p, v, aux=a))(params, y, side)
    assert float(relative_error(x_rec, x)) <= 1e-6


def test_batch_norm_log_det_is_that_of_the_fixed_statistics_map():
    bn, frozen = layers.batch_norm(), layers.batch_norm_inference()
    params, x = bn_params(0, 3), image(1, 2, 2, 2, 3)
    moments = bn.aux(params, x)
    fixed = {**params, "mean": moments["mean"], "var": moments["var"]}
    np.testing.assert_allclose(frozen.forward(fixed, x), bn.forward(params, x), atol=1e-5)
    flat = lambda v: frozen.forward(fixed, v.reshape(x.shape)).reshape(-1)
    _, logdet = jnp.linalg.slogdet(jax.jacfwd(flat)(x.reshape(-1)))
    np.testing.assert_allclose(bn.log_det(params, x), logdet, rtol=1e-5)
    np.testing.assert_allclose(frozen.inverse(fixed, frozen.forward(fixed, x)), x, atol=1e-5)
    # Per example (the statistics held fixed, as a flow needs): log_det / N for every example;
    # vmapping the training-mode log_det would use per-example statistics instead.
    per_example = jax.vmap(lambda v: frozen.log_det(fixed, v[None]))(x)
    np.testing.assert_allclose(per_example, bn.log_det(params, x) / x.shape[0], rtol=1e-5)


def bn_stack(depth=6, c=4):
    block = rj.sequence(layers.batch_norm(), layers.leaky_relu(0.5), layers.conv1x1())
    keys = jax.random.split(jax.random.key(3), depth)
    params = (bn_params(2, c, depth), None, jax.vmap(lambda k: layers.init_conv1x1(k, c))(keys))
    return block, params, image(4, 8, 2, 2, c)


def test_batch_norm_stack_in_reversible_scan():
    """Gradients equal plain backprop (1e-5; through the batch statistics), the returned batch
    statistics equal the plain forward's, and inverse_scan needs and uses them."""
    block, params, x = bn_stack()

    def loss(scan):
        return lambda p, x_: jnp.sum(jnp.tanh(scan(block, p, x_)) * x_)

    g = jax.grad(loss(rj.reversible_scan), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss(plain_scan), argnums=(0, 1))(params, x)
    assert float(relative_error(g, g_ref)) <= 1e-5
    y, aux = rj.reversible_scan(block, params, x, return_aux=True)
    y_ref, aux_ref = plain_scan(block, params, x, return_aux=True)
    assert aux[0]["mean"].shape == (6, 4) and aux[1] is None
    # Only what the inverse needs is stored: 2 C numbers per layer (mean and var; std follows).
    assert sum(leaf.size for leaf in jax.tree.leaves(aux)) == 2 * 4 * 6
    assert float(relative_error(y, y_ref)) <= 1e-6
    assert float(relative_error(aux, aux_ref)) <= 1e-6
    # The statistics are the right ones: each layer's input moments over (N, H, W), by hand.
    h = x
    for layer in range(6):
        np.testing.assert_allclose(aux[0]["mean"][layer], h.mean((0, 1, 2)), atol=1e-6)
        np.testing.assert_allclose(aux[0]["var"][layer], h.var((0, 1, 2)), rtol=1e-5)
        h = block.forward(jax.tree.map(lambda a, i=layer: a[i], params), h)
    np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-6)
    # 18 inverse steps (batch norm, leaky ReLU whose inverse doubles, 1x1 conv, 6 layers):
    # measured 1.9e-6 on CPU, so 1e-5 (a single layer's inverse is bounded at 1e-6 above).
    assert float(relative_error(rj.inverse_scan(block, params, y, aux=aux), x)) <= 1e-5
    with pytest.raises(ValueError, match="needs side information"):
        rj.inverse_scan(block, params, y)
    # aux of another depth: was lax.scan's "different leading axis sizes: 6, 6, 6, 5, 5".
    short = jax.tree.map(lambda a: a[:5], aux)
    with pytest.raises(ValueError, match=r"aux must hold one entry per layer \(leading axis L = 6"):
        rj.inverse_scan(block, params, y, aux=short)


def test_log_det_of_a_layerwise_stack_through_the_generic_step():
    """Layers have no fused log-det step: each layer's backward is followed by a vjp of its
    log_det at the reconstructed input (batch norm's through its stored statistics too). The
    gradient of a flow loss equals plain backprop's (1e-5: float32 round-off of 6 layer-wise
    reconstructions, measured 4.3e-7) and the outputs come as (y, log_det, aux)."""
    block, params, x = bn_stack()

    def loss(scan):
        def value(p, x_):
            y, log_det, _ = scan(block, p, x_, return_log_det=True, return_aux=True)
            return 0.5 * jnp.sum(jnp.square(y)) - log_det

        return value

    g = jax.grad(loss(rj.reversible_scan), argnums=(0, 1))(params, x)
    g_ref = jax.grad(loss(plain_scan), argnums=(0, 1))(params, x)
    assert float(relative_error(g, g_ref)) <= 1e-5
    _, log_det, aux = rj.reversible_scan(block, params, x, return_log_det=True, return_aux=True)
    np.testing.assert_allclose(
        log_det, plain_scan(block, params, x, return_log_det=True)[1], rtol=1e-6
    )
    total, h = 0.0, x  # by hand: every layer's log-det at its own input
    for layer in range(6):
        p = jax.tree.map(lambda a, i=layer: a[i], params)
        total, h = total + block.log_det(p, h), block.forward(p, h)
    np.testing.assert_allclose(log_det, total, rtol=1e-5)
    assert aux[0]["mean"].shape == (6, 4)


def test_second_derivatives_see_that_the_stored_statistics_depend_on_x():
    """The backward pass reconstructs through the stored batch statistics; differentiating it
    again must differentiate them too (under stop_gradient the first assertion measured 0.44).
    Tolerance 1e-5: float32 second derivatives through reconstruction, measured 1.1e-7 (the
    Hessian) and 1.2e-6 (the HVP) here."""
    bn = layers.batch_norm()
    x, w = image(1, 5, 1, 1, 2), image(2, 5, 1, 1, 2)
    params = bn_params(0, 2, depth=1)
    loss_x = lambda scan: lambda v: jnp.sum(jnp.sin(scan(bn, params, v)) * w)
    hessian = lambda scan: jax.hessian(loss_x(scan))(x)
    assert float(relative_error(hessian(rj.reversible_scan), hessian(plain_scan))) <= 1e-5

    block, params, x = bn_stack()
    tangent = jax.tree.map(jnp.ones_like, params)
    loss_p = lambda scan: lambda p: jnp.sum(jnp.tanh(scan(block, p, x)) * x)
    hvp = lambda scan: jax.grad(
        lambda p: jnp.vdot(*map(_flat, (jax.grad(loss_p(scan))(p), tangent)))
    )(params)
    assert float(relative_error(hvp(rj.reversible_scan), hvp(plain_scan))) <= 1e-5


def _flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def test_running_statistics_update_once_per_step():
    """A training step reads the batch statistics from the forward pass and updates the running
    statistics once; the backward pass (reconstruction) cannot touch them."""
    block, params, x = bn_stack()
    running = {"mean": jnp.zeros((6, 4)), "var": jnp.ones((6, 4))}

    @jax.jit
    def step(params, running, x):
        def loss(p):
            y, aux = rj.reversible_scan(block, p, x, return_aux=True)
            return jnp.sum(y**2), aux[0]

        (_, batch), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, layers.update_running_stats(running, batch, momentum=0.9)

    _, after_one = step(params, running, x)
    _, batch = plain_scan(block, params, x, return_aux=True)
    expected = {"mean": 0.1 * batch[0]["mean"], "var": 0.9 + 0.1 * batch[0]["var"]}
    assert float(relative_error(after_one, expected)) <= 1e-6
    _, after_two = step(params, after_one, x)
    # By hand, not through update_running_stats: 0.9 (0.1 b) + 0.1 b, 0.9 (0.9 + 0.1 b) + 0.1 b.
    b = batch[0]
    expected_two = {"mean": 0.19 * b["mean"], "var": 0.81 + 0.19 * b["var"]}
    assert float(relative_error(after_two, expected_two)) <= 1e-6


def test_inference_batch_norm_with_the_batch_statistics_equals_training_mode():
    """Running statistics hold the variance without eps, so inference adds eps once."""
    bn, frozen = layers.batch_norm(eps=0.1), layers.batch_norm_inference(eps=0.1)
    params, x = bn_params(0, 3), image(1, 4, 2, 2, 3)
    stats = layers.update_running_stats(
        {"mean": jnp.zeros(3), "var": jnp.ones(3)}, bn.aux(params, x), momentum=0.0
    )
    np.testing.assert_allclose(
        frozen.forward({**params, **stats}, x), bn.forward(params, x), atol=1e-6
    )


def test_exact_mode_accepts_permutations_and_refuses_scaling_layers():
    from revjax.precision import apply_policy, exact_policy

    apply_policy(rj.sequence(layers.permute([1, 0]), layers.squeeze()), exact_policy())
    for layer in (layers.actnorm(), layers.leaky_relu(), layers.conv1x1(), layers.batch_norm()):
        with pytest.raises(ValueError, match="exact mode needs additive couplings"):
            apply_policy(layer, exact_policy())


def test_matmul_precision_policy_keeps_batch_norm_side_information():
    from revjax.precision import Policy

    block, params, x = bn_stack()
    policy = Policy(matmul_precision="highest")
    loss = lambda p: jnp.sum(jnp.tanh(rj.reversible_scan(block, p, x, policy=policy)))
    g = jax.grad(loss)(params)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.tanh(plain_scan(block, p, x))))(params)
    assert float(relative_error(g, g_ref)) <= 1e-5
    _, aux = rj.reversible_scan(block, params, x, policy=policy, return_aux=True)
    assert aux[0] is not None


def test_a_compute_dtype_reaches_branches_not_layerwise_layers():
    """Documented (README, precision): layer-wise layers act on the stream and run in its
    dtype (a conv1x1 stack is bitwise unchanged by a bf16 compute policy), while a coupling's
    branches do compute in bfloat16."""
    from revjax.precision import Policy

    c, depth = 4, 2
    conv = jax.vmap(lambda k: layers.init_conv1x1(k, c, scale=0.3))(
        jax.random.split(jax.random.key(0), depth)
    )
    x = image(1, 3, 2, 2, c)
    policy = Policy(compute_dtype=jnp.bfloat16)
    alone = rj.reversible_scan(layers.conv1x1(), conv, x, policy=policy)
    assert bool(rj.diagnostics.bitwise_equal(alone, rj.reversible_scan(layers.conv1x1(), conv, x)))
    branch = lambda p, h: jnp.tanh(h * p)
    mixed = rj.sequence(rj.additive_coupling(branch, branch), rj.swap())
    params = ((jnp.full((depth, 2), 0.3), jnp.full((depth, 2), 0.7)), None)
    halves = (x[..., :2], x[..., 2:])
    with_policy = rj.reversible_scan(mixed, params, halves, policy=policy)
    without = rj.reversible_scan(mixed, params, halves)
    assert not bool(rj.diagnostics.bitwise_equal(with_policy, without))  # branches in bf16
    # bf16 branch outputs added to the float32 stream: bf16 rounding of tanh (~4e-3).
    assert float(relative_error(with_policy, without)) <= 1e-2


def test_batch_norm_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"batch_norm: scale_eps must be finite and > 0, got 0\.0"):
        layers.batch_norm(scale_eps=0.0)
    with pytest.raises(ValueError, match="batch_norm: expected 3 channels"):
        layers.batch_norm().forward(bn_params(0, 3), jnp.ones((2, 4)))
    # batch_norm_inference broadcast 3-channel statistics over a 1-channel input (found by review)
    fixed = {**bn_params(0, 3), "mean": jnp.zeros(3), "var": jnp.ones(3)}
    frozen = layers.batch_norm_inference()
    with pytest.raises(ValueError, match="batch_norm_inference: expected 3 channels"):
        frozen.forward(fixed, jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="batch_norm_inference: expected 3 channels"):
        frozen.inverse(fixed, jnp.ones((2, 4)))


# --- params and settings that are not what the layer takes (found by an audit) ---------------


def test_a_short_actnorm_log_scale_is_refused_not_broadcast():
    """A (1,) log_scale broadcast over all C channels in forward while log_det counted it once:
    0.6 instead of slogdet's 1.8 at C = 3, silently."""
    params = {"log_scale": jnp.array([0.2]), "bias": jnp.zeros(3)}
    x = jnp.ones((2, 3))
    for run in (layers.actnorm().forward, layers.actnorm().inverse, layers.actnorm().log_det):
        with pytest.raises(ValueError, match=r"actnorm: params\['log_scale'\] has shape \(1,\), "):
            run(params, x)


def test_params_not_stacked_for_a_scan_get_a_hint():
    """Per-layer (C,) params handed to reversible_scan are sliced into 0-d ones; the error was a
    bare IndexError from inside the layer."""
    block = rj.sequence(layers.actnorm(), layers.leaky_relu(0.5))
    x = jnp.ones((2, 3))
    params = ({"log_scale": jnp.zeros(3), "bias": jnp.zeros(3)}, None)  # one layer's, unstacked
    with pytest.raises(ValueError, match=r"params\['bias'\] has shape \(\), .*stacked over layers"):
        rj.reversible_scan(block, params, x)
    stacked = jax.tree.map(lambda a: a[None], params)
    assert rj.reversible_scan(block, stacked, x).shape == x.shape


@pytest.mark.parametrize(
    ("layer", "params", "message"),
    [
        (layers.conv1x1(), {**layers.init_conv1x1(jax.random.key(0), 3),
                            "lower": jnp.zeros((2, 2))},
         r"conv1x1: params\['lower'\] has shape \(2, 2\), expected \(3, 3\)"),
        (layers.batch_norm(), {"gamma": jnp.ones(3)},
         r"batch_norm: params must be a dict with keys \['gamma', 'beta'\], got \['gamma'\]"),
        (layers.batch_norm(), {"gamma": jnp.ones(3), "beta": jnp.ones(5)},
         r"batch_norm: params\['beta'\] has shape \(5,\), expected \(3,\)"),
        (layers.actnorm(), (jnp.zeros(3), jnp.zeros(3)),
         r"actnorm: params must be a dict with keys \['bias', 'log_scale'\], got tuple"),
    ],
)  # fmt: skip
def test_params_of_the_wrong_shape_or_keys_name_the_layer(layer, params, message):
    with pytest.raises(ValueError, match=message):
        layer.forward(params, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=message):  # also when traced
        jax.jit(layer.forward)(params, jnp.ones((2, 3)))


def test_batch_norm_inverse_checks_its_side_information():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"batch_norm \(aux: .*\['mean', 'var'\], got \['mean'\]"):
        layers.batch_norm().inverse(bn_params(0, 3), x, aux={"mean": jnp.zeros(3)})


@pytest.mark.parametrize("make", [layers.batch_norm, layers.batch_norm_inference])
@pytest.mark.parametrize("setting", ["eps", "scale_eps"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "1e-5", None])
def test_batch_norm_settings_must_be_finite_and_positive(make, setting, value):
    """batch_norm_inference checked none (eps = 0 with var = 0 gave inf; scale_eps = -1 wiped a
    channel), batch_norm let inf through (a constant output, NaN inverse)."""
    with pytest.raises(ValueError, match=rf"{make.__name__}: {setting} must be finite and > 0"):
        make(**{setting: value})


@pytest.mark.parametrize("slope", ["0.1", None, True, jnp.array([0.1, 0.2]), 1j])
def test_a_slope_that_is_not_a_real_number_is_refused(slope):
    with pytest.raises(ValueError, match=r"layers\.leaky_relu: slope must be finite and > 0"):
        layers.leaky_relu(slope)


def test_a_slope_that_rounds_to_zero_in_the_input_dtype_is_refused():
    """Every negative input went to -0.0, unrecoverable, while log_det stayed finite."""
    x16 = -jnp.ones((3,), jnp.float16)
    layer = layers.leaky_relu(1e-8)
    for run in (layer.forward, layer.inverse, jax.jit(layer.forward)):
        with pytest.raises(ValueError, match=r"slope=1e-08 rounds to 0 in float16"):
            run(None, x16)
    y = layer.forward(None, x16.astype(jnp.float32))  # representable in float32
    np.testing.assert_allclose(layer.inverse(None, y), x16.astype(jnp.float32), rtol=1e-6)


def test_a_slope_that_overflows_in_the_input_dtype_is_refused():
    """slope=1e5 on float16 sent negative inputs to -inf, which the inverse turned into NaN,
    while log_det stayed finite (11.5)."""
    layer = layers.leaky_relu(1e5)
    x16 = jnp.array([-1.0, 0.5], jnp.float16)
    for run in (layer.forward, layer.inverse, jax.jit(layer.forward)):
        with pytest.raises(ValueError, match=r"slope=100000.0 overflows to inf in float16"):
            run(None, x16)
    x32 = x16.astype(jnp.float32)  # representable in float32
    np.testing.assert_allclose(layer.inverse(None, layer.forward(None, x32)), x32, rtol=1e-6)


def test_leaky_relu_reconstruction_keeps_the_branch_of_an_underflowed_negative():
    """slope x underflows to -0.0 for a float16 x of -1e-7; the inverse returned -0.0 and the
    backward pass, by x >= 0, differentiated the slope-1 branch there: reversible_scan gave 1.0
    where backprop gave 0.1. The sign bit keeps -0.0 on the negative branch (and log_det)."""
    block = rj.sequence(layers.actnorm(), layers.leaky_relu(0.1))
    zeros = jnp.zeros((1, 2), jnp.float16)
    params = ({"log_scale": zeros, "bias": zeros}, None)
    x = jnp.array([[-1e-7, -1.0]], jnp.float16)
    policy = Policy(stream_dtype=jnp.float16)

    def grad(scan):
        loss = lambda x_: scan(block, params, x_, policy=policy).astype(jnp.float32).sum()
        return jax.grad(loss)(x)

    np.testing.assert_array_equal(grad(rj.reversible_scan), grad(plain_scan))
    np.testing.assert_array_equal(grad(plain_scan), jnp.full((1, 2), 0.1, jnp.float16))
    layer = layers.leaky_relu(0.1)
    y = layer.forward(None, x)
    assert bool(jnp.signbit(y[0, 0])) and float(y[0, 0]) == 0.0  # underflowed to -0.0
    assert float(layer.log_det(None, x)) == float(layer.log_det(None, layer.inverse(None, y)))


def test_layerwise_layers_keep_the_stream_dtype_with_wider_params():
    """README: layer-wise layers transform the stream itself, in its dtype. float32 params on
    a bfloat16 stream promoted their outputs to float32, so reversible_scan refused the stack
    (a stream that changes dtype). Outputs are now rounded to the stream dtype; the gradient
    matches plain_scan's (the same rounding, stored instead of reconstructed) to within the
    bfloat16 stream's reconstruction drift (measured 1.4e-3 at L = 2)."""
    key = jax.random.key(0)
    channels, depth = 4, 2
    x = jax.random.normal(key, (8, channels)).astype(jnp.bfloat16)
    block = rj.sequence(layers.actnorm(), layers.leaky_relu(0.5), layers.conv1x1())
    one = (
        {"log_scale": 0.1 * jnp.ones(channels), "bias": 0.1 * jnp.ones(channels)},
        None,
        layers.init_conv1x1(key, channels),
    )
    params = jax.tree.map(lambda a: jnp.stack([a] * depth), one)
    policy = Policy(stream_dtype=jnp.bfloat16)
    y = rj.reversible_scan(block, params, x, policy=policy)
    assert y.dtype == jnp.bfloat16
    assert block.forward(jax.tree.map(lambda a: a[0], params), x).dtype == jnp.bfloat16
    loss = lambda scan: lambda p: jnp.sum(scan(block, p, x, policy=policy).astype(jnp.float32))
    error = relative_error(jax.grad(loss(rj.reversible_scan))(params),
                           jax.grad(loss(plain_scan))(params))  # fmt: skip
    assert float(error) <= 2e-2, float(error)


@pytest.mark.parametrize(
    "layer", [layers.actnorm(), layers.leaky_relu(), layers.conv1x1(), layers.squeeze()]
)
def test_a_pytree_stream_is_refused_naming_the_layer(layer):
    """The (x1, x2) halves failed deep inside JAX (a tracer conversion error, "'tuple' object
    has no attribute 'dtype'") without naming the layer."""
    halves = (jnp.ones((2, 4)), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match=r"layers\.\w+: acts on one channels-last array, got tuple"):
        layer.forward(None, halves)
    with pytest.raises(TypeError, match=r"acts on one channels-last array"):
        layer.inverse(None, halves)


def test_init_and_running_stats_settings_are_checked():
    with pytest.raises(ValueError, match=r"layers\.init_actnorm: eps must be finite and > 0"):
        layers.init_actnorm(jnp.ones((4, 3)), eps=0.0)
    with pytest.raises(ValueError, match=r"layers\.init_conv1x1: channels must be a positive int"):
        layers.init_conv1x1(jax.random.key(0), -2)
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    for momentum in (float("nan"), 1.5, -0.1, True):
        with pytest.raises(ValueError, match="update_running_stats: momentum must lie in"):
            layers.update_running_stats(stats, stats, momentum)
    with pytest.raises(ValueError, match=r"batch must be a dict with 'mean' and 'var', got \['m"):
        layers.update_running_stats(stats, {"mean": jnp.zeros(3)})
    # (C,) running statistics against (L, C) stacked batch ones were broadcast to (L, C).
    stacked = {"mean": jnp.zeros((2, 3)), "var": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"running\['mean'\] has shape \(3,\) but batch"):
        layers.update_running_stats(stats, stacked)
    # A traced momentum (a schedule under jit) is not checked, and works.
    out = jax.jit(layers.update_running_stats)(stats, {**stats, "mean": jnp.ones(3)}, 0.25)
    np.testing.assert_allclose(out["mean"], 0.75)


def test_layerwise_branch_checks_its_block_and_policy_when_built():
    """Both failed only at the branch's first call, naming reversible_scan."""
    with pytest.raises(TypeError, match=r"layerwise_branch: block must be a revjax\.Coupling, got"):
        layers.layerwise_branch(lambda p, h: h)
    with pytest.raises(TypeError, match="layerwise_branch: policy must be a Policy or None"):
        layers.layerwise_branch(layers.leaky_relu(0.5), policy="bf16")
