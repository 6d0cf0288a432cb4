"""Tests of revjax.linen: Linen modules as coupling branches."""

from __future__ import annotations

import re

import flax.errors
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import revjax as rj
from revjax.linen import init_linen_stack, linen_coupling
from revjax.scan import plain_scan

DIM, DEPTH = 8, 6


class Branch(nn.Module):
    rate: float = 0.0

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * DIM)(nn.LayerNorm()(x))
        h = nn.Dropout(self.rate, deterministic=self.rate == 0.0)(jnp.tanh(h))
        return nn.Dense(DIM)(h)


def relative_error(a, b):
    a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_linen_stack_gradient_equals_plain_scan(rate):
    x = tuple(jax.random.normal(k, (4, DIM)) for k in jax.random.split(jax.random.key(0)))
    block = linen_coupling(Branch(rate), Branch(rate))
    params = init_linen_stack(Branch(rate), Branch(rate), jax.random.key(1), DEPTH, x)
    assert all(leaf.shape[0] == DEPTH for leaf in jax.tree.leaves(params))
    # Independently initialised layers, not copies of one (the gradient checks below would
    # pass either way, both sides using the same parameters).
    kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim == 3]
    assert kernels and all(float(jnp.abs(k[0] - k[1]).max()) > 1e-3 for k in kernels)
    key = jax.random.key(2) if rate else None

    def loss(scan):
        return lambda p, x: jnp.sum(jnp.sin(scan(block, p, x, key=key)[0]))

    grads = jax.grad(loss(rj.reversible_scan), argnums=(0, 1))(params, x)
    twin = jax.grad(loss(plain_scan), argnums=(0, 1))(params, x)
    # float32 reconstruction round-off over 6 layers.
    assert relative_error(grads, twin) <= 1e-5
    if rate:  # dropout is live: another key gives another gradient
        other = jax.grad(
            lambda p: jnp.sum(rj.reversible_scan(block, p, x, key=jax.random.key(3))[0])
        )
        assert relative_error(other(params), grads[0]) > 1e-2
    y = rj.reversible_scan(block, params, x, key=key)
    # The same float32 round-off over 6 layers as the gradient's, hence the same bound.
    assert relative_error(rj.inverse_scan(block, params, y, key=key), x) <= 1e-5


def test_mutable_collections_and_bad_depth_are_refused():
    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    x = (jnp.ones((4, DIM)), jnp.ones((4, DIM)))
    with pytest.raises(
        TypeError, match=r"branch f \(Normed\) has variable collections \['batch_stats'\]"
    ):
        init_linen_stack(Normed(), Branch(), jax.random.key(0), 2, x)
    with pytest.raises(ValueError, match="depth must be a positive int"):
        init_linen_stack(Branch(), Branch(), jax.random.key(0), 0, x)
    variables = init_linen_stack(Branch(), Branch(), jax.random.key(0), np.int64(2), x)
    assert {leaf.shape[0] for leaf in jax.tree.leaves(variables)} == {2}


def test_init_from_shape_structs_equals_init_from_arrays():
    """The docstring and the pair error offer shape structs; they crashed inside Flax."""
    x = (jnp.ones((4, DIM)), jnp.ones((4, DIM)))
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    from_structs = init_linen_stack(Branch(), Branch(), jax.random.key(0), 2, structs)
    from_arrays = init_linen_stack(Branch(), Branch(), jax.random.key(0), 2, x)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_structs, from_arrays))


def test_non_linen_branches_and_an_unpaired_x_are_refused():
    f = lambda p, h: h
    with pytest.raises(TypeError, match=r"linen_coupling: f must be a flax.linen.Module, got"):
        linen_coupling(f, Branch())
    with pytest.raises(TypeError, match=r"init_linen_stack: g must be a flax.linen.Module"):
        init_linen_stack(Branch(), f, jax.random.key(0), 2, (jnp.ones((4, DIM)),) * 2)
    # One array of two rows used to be unpacked silently as (x[0], x[1]).
    with pytest.raises(TypeError, match=r"x must be the pair of halves.*shape \(2, 4\)"):
        init_linen_stack(Branch(), Branch(), jax.random.key(0), 2, jnp.ones((2, 4)))


def test_the_usual_mistakes_get_messages_that_say_what_to_do():
    """A class for an instance, an int seed for a key, a dropout branch without key=: each
    gave Flax's or JAX's message, which did not say what to change."""
    with pytest.raises(
        TypeError, match=r"f is the class Branch; pass an instance, Branch\(\.\.\.\)"
    ):
        linen_coupling(Branch, Branch())
    with pytest.raises(TypeError, match=r"key must be a PRNG key, e\.g\. jax\.random\.key\(0\)"):
        init_linen_stack(Branch(), Branch(), 0, 2, (jnp.ones((4, DIM)),) * 2)
    with pytest.raises(TypeError, match="rng_collection must name the RNG collection"):
        linen_coupling(Branch(), Branch(), rng_collection=None)
    f, g = Branch(rate=0.5), Branch(rate=0.5)
    x = (jnp.ones((4, DIM)), jnp.ones((4, DIM)))
    params = init_linen_stack(f, g, jax.random.key(0), 2, x)
    with pytest.raises(flax.errors.InvalidRngError) as info:
        rj.reversible_scan(linen_coupling(f, g), params, x)
    assert any("pass key= to reversible_scan" in note for note in info.value.__notes__)
    with pytest.raises(flax.errors.InvalidRngError) as info:  # the key feeds another collection
        rj.reversible_scan(
            linen_coupling(f, g, rng_collection="noise"), params, x, key=jax.random.key(1)
        )
    assert any("rng_collection=..." in note for note in info.value.__notes__)


class PartitionedMlp(nn.Module):
    """An MLP whose kernels carry tensor-parallel names (hidden axis over "model")."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(16, kernel_init=nn.with_partitioning(init, (None, "model")))(x)
        return nn.Dense(x.shape[-1], kernel_init=nn.with_partitioning(init, ("model", None)))(h)


def test_partition_names_get_the_layer_axis():
    """The stacked kernel (L, 8, 16) kept the names (None, "model"): its spec sharded the input
    axis, and the second kernel's layer axis, silently (or failed where L did not divide)."""
    x = (jnp.ones((4, 8)), jnp.ones((4, 8)))
    params = init_linen_stack(PartitionedMlp(), PartitionedMlp(), jax.random.key(0), 3, x)
    specs = nn.get_partition_spec(params)
    for branch in specs:
        assert branch["params"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec(
            None, None, "model"
        )
        assert branch["params"]["Dense_1"]["kernel"] == jax.sharding.PartitionSpec(
            None, "model", None
        )
    assert nn.unbox(params)[0]["params"]["Dense_0"]["kernel"].shape == (3, 8, 16)
    block = linen_coupling(PartitionedMlp(), PartitionedMlp())
    y = rj.reversible_scan(block, nn.unbox(params), x)
    h = x  # layer by layer, not through plain_scan (which shares reversible_scan's forward)
    for layer in range(3):
        h = block.forward(jax.tree.map(lambda a, i=layer: a[i], nn.unbox(params)), h)
    np.testing.assert_allclose(y[0], h[0], rtol=1e-6)
    np.testing.assert_allclose(y[1], h[1], rtol=1e-6)


def test_boxed_params_run_under_a_mesh():
    """``init_linen_stack``'s boxes name the stacked axes; each layer got the stacked names with
    its slice, so under a mesh Flax constrained a rank-2 kernel by a rank-3 spec (ValueError:
    "only valid for values of rank at least 3"). One device is enough to show it."""
    x = (jnp.ones((4, 8)), jnp.ones((4, 8)))
    params = init_linen_stack(PartitionedMlp(), PartitionedMlp(), jax.random.key(0), 3, x)
    block = linen_coupling(PartitionedMlp(), PartitionedMlp())

    def loss(p):
        return jnp.sum(rj.reversible_scan(block, p, x)[0] ** 2)

    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        boxed = jax.jit(jax.grad(loss))(params)
        unboxed = jax.jit(jax.grad(lambda p: loss(nn.unbox(p))))(params)
        back = jax.jit(lambda p: rj.inverse_scan(block, p, rj.reversible_scan(block, p, x)))(params)
    assert jax.tree.structure(boxed) == jax.tree.structure(params)  # the gradient keeps boxes
    for a, b in zip(jax.tree.leaves(boxed), jax.tree.leaves(unboxed), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(back[0], x[0], atol=1e-5)


@pytest.mark.parametrize(
    ("key", "got"),
    [
        (jnp.int32(3), "int32[]"),
        (np.array(0, np.uint32), "uint32[]"),
        (jax.random.split(jax.random.key(0), 2), "key<fry>[2]"),
    ],
)
def test_init_refuses_an_array_that_is_not_one_key(key, got):
    """Arrays passed the isinstance check and failed inside JAX without naming
    init_linen_stack ("invalid PRNG key data", "split accepts a single key")."""
    x = (jnp.ones((4, 8)), jnp.ones((4, 8)))
    with pytest.raises(
        TypeError, match=rf"init_linen_stack: key must be one PRNG key.*{re.escape(got)}"
    ):
        init_linen_stack(PartitionedMlp(), PartitionedMlp(), key, 2, x)


class TwoStreams(nn.Module):
    """Draws from two RNG collections: dropout, and additive noise of its own."""

    @nn.compact
    def __call__(self, h):
        h = nn.Dropout(0.3, deterministic=False)(nn.Dense(DIM)(h))
        return h + 0.1 * jax.random.normal(self.make_rng("noise"), h.shape)


def test_a_branch_may_draw_from_several_rng_collections():
    """Only one collection name was accepted, so a branch with dropout and its own noise could
    not run at all (the note suggested the one option that cannot help)."""
    x = tuple(jax.random.normal(k, (4, DIM)) for k in jax.random.split(jax.random.key(0)))
    block = linen_coupling(TwoStreams(), TwoStreams(), rng_collection=("dropout", "noise"))
    params = init_linen_stack(TwoStreams(), TwoStreams(), jax.random.key(1), 3, x)
    key = jax.random.key(2)

    def loss(scan):
        return lambda p, x: jnp.sum(jnp.sin(scan(block, p, x, key=key)[0]))

    grads = jax.grad(loss(rj.reversible_scan), argnums=(0, 1))(params, x)
    twin = jax.grad(loss(plain_scan), argnums=(0, 1))(params, x)
    assert relative_error(grads, twin) <= 1e-5  # both streams replayed in the backward pass
    y = rj.reversible_scan(block, params, x, key=key)
    assert relative_error(rj.inverse_scan(block, params, y, key=key), x) <= 1e-5
    # Naming one of the two leaves the other without a key: the note now says how to name both.
    dropout_only = linen_coupling(TwoStreams(), TwoStreams(), rng_collection="dropout")
    with pytest.raises(flax.errors.InvalidRngError) as info:
        rj.reversible_scan(dropout_only, params, x, key=key)
    assert any("a tuple for several" in note for note in info.value.__notes__)
    for bad in [(), ("dropout", "dropout"), ("dropout", 3)]:
        with pytest.raises(TypeError, match="or a tuple of distinct names"):
            linen_coupling(TwoStreams(), TwoStreams(), rng_collection=bad)


class TrainFlag(nn.Module):
    @nn.compact
    def __call__(self, h, train: bool):
        return nn.Dropout(0.2, deterministic=not train)(nn.Dense(DIM)(h))


def test_a_branch_that_wants_a_call_argument_gets_a_note():
    """A ``train`` argument of ``__call__`` (a common Linen idiom) failed with Flax's bare
    TypeError; the note says to make it an attribute."""
    x = (jnp.ones((4, DIM)), jnp.ones((4, DIM)))
    with pytest.raises(TypeError, match="missing 1 required positional argument") as info:
        init_linen_stack(TrainFlag(), TrainFlag(), jax.random.key(0), 2, x)
    notes = getattr(info.value, "__notes__", [])
    assert any("init_linen_stack calls TrainFlag with the half alone" in n for n in notes)
    params = init_linen_stack(Branch(), Branch(), jax.random.key(0), 2, x)
    with pytest.raises(TypeError) as info:
        rj.reversible_scan(linen_coupling(TrainFlag(), TrainFlag()), params, x)
    notes = getattr(info.value, "__notes__", [])
    assert any("linen_coupling calls TrainFlag with the half alone" in n for n in notes)
