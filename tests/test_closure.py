"""closure: values traced by an enclosing vmap/grad become shared parameters; jit's do not."""

import jax
import jax.numpy as jnp
import numpy as np

import revjax as rj
from revjax.closure import hoist_traced_constants
from revjax.diagnostics import relative_error
from revjax.models.mlp import init_mlp_stack, mlp


def conditioned(c):
    branch = lambda p, h: mlp(p, h + c)
    return rj.additive_coupling(branch, branch)


def one_layer():
    layer = jax.tree.map(lambda a: a[0], init_mlp_stack(jax.random.key(0), 1, 8, 16))
    h = tuple(jax.random.normal(k, (5, 8)) for k in jax.random.split(jax.random.key(1)))
    return layer, h


def test_which_closed_over_values_are_hoisted():
    """Values of vmap or grad are hoisted; so are values staged by jit, floating or not (a grad
    outside the jit runs the backward pass after the staging ended); a block closing over
    concrete values only keeps its fused backward."""
    layer, h = one_layer()
    table = jax.random.normal(jax.random.key(5), (4, 8))
    shared = {}

    def probe(where, block_of):
        def fn(c):
            shared[where] = hoist_traced_constants(block_of(c), layer, h, None)[1]
            return jnp.sum(c)

        return fn

    jax.jit(probe("jit, float", conditioned))(jnp.ones(8))
    by_index = lambda i: rj.additive_coupling(*[lambda p, h: mlp(p, h + table[i])] * 2)
    jax.jit(probe("jit, int", by_index))(jnp.int32(2))
    jax.vmap(probe("vmap", conditioned))(jnp.ones((2, 8)))
    jax.grad(probe("grad", conditioned))(jnp.ones(8))
    probe("concrete", by_index)(2)
    assert shared["concrete"] is None
    assert all(shared[k] is not None for k in ("jit, float", "jit, int", "vmap", "grad"))


def test_the_closure_free_block_computes_the_same_layer():
    """The rebuilt block evaluates the traced jaxprs with the hoisted values passed in."""
    layer, h = one_layer()
    c = jax.random.normal(jax.random.key(2), (3, 8))

    def both(c_):
        block = conditioned(c_)
        free, shared = hoist_traced_constants(block, layer, h, None)
        y = block.forward(layer, h)
        return y, free.forward((layer, shared), h), free.inverse((layer, shared), y)

    y, y_free, x_free = jax.vmap(both)(c)
    for a, b in zip(y, y_free, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(x_free, h, strict=True):
        np.testing.assert_allclose(a, jnp.broadcast_to(b, a.shape), rtol=1e-5, atol=1e-5)


def test_blocks_with_side_information_are_hoisted_and_keep_it():
    """A block with aux (batch norm's statistics) closing over a vmapped value is rebuilt too
    (it once was used as it was, and its tracer leaked into the backward pass): the rebuilt
    block keeps ``aux`` and passes it to ``inverse``."""
    from revjax.coupling import Coupling

    def shifted(c):
        forward = lambda p, h: (h[0] + c, h[1])
        inverse = lambda p, h, aux=None: (h[0] - c * aux / aux, h[1])  # uses the side info
        return Coupling(forward, inverse, aux=lambda p, h: jnp.mean(h[0]) + 3.0)

    _, h = one_layer()
    seen = {}

    def probe(c):
        free, shared = hoist_traced_constants(shifted(c), None, h, None)
        side = free.aux((None, shared), h)
        y = free.forward((None, shared), h)
        seen["shared"], seen["side"] = shared, side
        return free.inverse((None, shared), y, aux=side)[0]

    x0 = jax.vmap(probe)(jnp.arange(2.0)[:, None] * jnp.ones((2, 8)))
    assert len(seen["shared"]) >= 1 and seen["side"] is not None
    np.testing.assert_allclose(x0, jnp.broadcast_to(h[0], x0.shape), rtol=1e-6, atol=1e-6)


def _scaled_batch_norm(c):
    """Batch norm followed by a layer-wise scaling by the closed-over ``c``."""
    scale = rj.Coupling(
        lambda p, h: h * c,
        lambda p, h: h / c,
        log_det=lambda p, h: jnp.log(jnp.abs(c)) * h.size,
    )
    return rj.sequence(rj.layers.batch_norm(), scale)


def test_batch_norm_closing_over_a_differentiated_value_matches_plain_backprop():
    """Found by a probe: ``jax.grad`` w.r.t. a value a batch-norm block closes over raised
    ``UnexpectedTracerError``. Gradients w.r.t. the closed-over value and the parameters now
    equal plain backprop's to relative error <= 1e-5 per leaf (the project's float32 gradient
    bound; with and without the log-det, under jit, and with the value vmapped per
    example)."""
    depth, channels = 3, 4
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (8, channels))
    params = (
        {
            "gamma": 1 + 0.1 * jax.random.normal(k[1], (depth, channels)),
            "beta": 0.1 * jax.random.normal(k[2], (depth, channels)),
        },
        None,
    )

    def loss(c, p, scan, log_det=False):
        out = scan(_scaled_batch_norm(c), p, x, return_log_det=log_det)
        y, extra = out if log_det else (out, 0.0)
        return jnp.sum(jnp.sin(y)) + extra

    grad = jax.grad(loss, (0, 1))
    for log_det in (False, True):
        want = grad(1.7, params, rj.scan.plain_scan, log_det)
        for got in (
            grad(1.7, params, rj.reversible_scan, log_det),
            jax.jit(grad, static_argnums=(2, 3))(1.7, params, rj.reversible_scan, log_det),
        ):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                assert relative_error(a, b) <= 1e-5, (log_det, relative_error(a, b))

    per_example = lambda scan: lambda cs, p: jnp.sum(jax.vmap(lambda c: loss(c, p, scan))(cs))
    cs = jnp.array([1.5, 2.0])
    want = jax.grad(per_example(rj.scan.plain_scan), (0, 1))(cs, params)
    got = jax.grad(per_example(rj.reversible_scan), (0, 1))(cs, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert relative_error(a, b) <= 1e-5, relative_error(a, b)
