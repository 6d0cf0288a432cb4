"""closure: values traced by an enclosing vmap/grad become shared parameters; jit's do not."""

import jax
import jax.numpy as jnp
import numpy as np

import revjax as rj
from revjax.closure import hoist_traced_constants
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


def test_blocks_with_side_information_are_used_as_they_are():
    """A block with aux (batch norm's statistics) is not rebuilt: its inverse needs the
    forward's side information. A forward-only vmap over a closed-over value still works."""
    from revjax.coupling import Coupling

    def shifted(c):
        forward = lambda p, h: (h[0] + c, h[1])
        inverse = lambda p, h, aux=None: (h[0] - c, h[1])
        return Coupling(forward, inverse, aux=lambda p, h: jnp.mean(h[0]))

    _, h = one_layer()
    shared = {}

    def probe(c):
        shared["vmap"] = hoist_traced_constants(shifted(c), None, h, None)[1]
        return jnp.sum(c)

    jax.vmap(probe)(jnp.ones((2, 8)))
    assert shared["vmap"] is None
