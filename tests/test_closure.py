"""closure: values traced by an enclosing vmap/grad become shared parameters; jit's do not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_only_values_of_an_outer_vmap_or_grad_are_hoisted():
    """Closing over values of an enclosing jit needs nothing: the block (with its fused
    backward) is used as it is. A vmapped or differentiated value is hoisted."""
    layer, h = one_layer()
    shared = {}

    def probe(where):
        def fn(c):
            shared[where] = hoist_traced_constants(conditioned(c), layer, h, None)[1]
            return jnp.sum(c)

        return fn

    jax.jit(probe("jit"))(jnp.ones(8))
    jax.vmap(probe("vmap"))(jnp.ones((2, 8)))
    jax.grad(probe("grad"))(jnp.ones(8))
    assert shared["jit"] is None
    assert shared["vmap"] is not None and shared["grad"] is not None


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


def test_side_information_blocks_closing_over_traced_values_are_refused():
    """A block with aux (batch norm's statistics) is not rebuilt: a clear TypeError instead."""
    from revjax.coupling import Coupling

    def shifted(c):
        forward = lambda p, h: (h[0] + c, h[1])
        inverse = lambda p, h, aux=None: (h[0] - c, h[1])
        return Coupling(forward, inverse, aux=lambda p, h: jnp.mean(h[0]))

    _, h = one_layer()
    assert hoist_traced_constants(shifted(jnp.ones(8)), None, h, None)[1] is None
    with pytest.raises(TypeError, match=r"side information .* pass that value through params"):
        jax.vmap(lambda c: hoist_traced_constants(shifted(c), None, h, None))(jnp.ones((2, 8)))
