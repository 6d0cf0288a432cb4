"""Tests of revjax.nnx_state: save_state / restore_state of NNX graph nodes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_nnx import DEPTH, DIM, Block, inputs, loss_of, make_stack

import revjax.nnx as rnnx


def test_save_and_restore_state(tmp_path):
    x, key = inputs(), jax.random.key(6)
    model = make_stack(0.3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.grad(loss_of)(model, x, key)
    optimizer.update(model, grads)
    path = tmp_path / "state.msgpack"
    rnnx.save_state((model, optimizer), path)

    fresh_model = rnnx.Stack(Block, DEPTH, DIM, 0.3, rngs=nnx.Rngs(123))
    fresh = nnx.Optimizer(fresh_model, optax.adam(1e-2), wrt=nnx.Param)
    assert float(jnp.abs(fresh_model(x, key=key)[0] - model(x, key=key)[0]).max()) > 1e-3
    rnnx.restore_state((fresh_model, fresh), path)
    np.testing.assert_array_equal(fresh_model(x, key=key)[0], model(x, key=key)[0])
    restored, saved = nnx.state(fresh, nnx.OptState), nnx.state(optimizer, nnx.OptState)
    assert len(jax.tree.leaves(saved)) > 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    # The stack's own RNG stream was restored too: the next key-less call draws the same masks.
    np.testing.assert_array_equal(fresh_model(x)[0], model(x)[0])

    with pytest.raises(ValueError, match="does not match"):
        rnnx.restore_state(make_stack(0.3), path)
    wider = rnnx.Stack(Block, DEPTH, DIM + 1, 0.3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"f/down/bias is float32\[5, 8\] in .* float32\[5, 9\]"):
        rnnx.restore_state((wider, nnx.Optimizer(wider, optax.adam(1e-2), wrt=nnx.Param)), path)


def test_a_failed_restore_leaves_the_module_untouched(tmp_path):
    """Checked and written in one loop, a mismatch deep in the file left the variables before
    it overwritten: a silent mix of two models after ``except ValueError``."""
    path = tmp_path / "state.msgpack"
    rnnx.save_state(make_stack(), path)

    other = rnnx.Stack(Block, DEPTH, DIM, rngs=nnx.Rngs(7))
    other.blocks.g.down.bias.set_value(jnp.zeros((DEPTH, DIM + 1)))  # one mismatch at the end
    before = jax.tree.map(np.asarray, nnx.state(other, nnx.Param))
    with pytest.raises(ValueError, match=r"g/down/bias"):
        rnnx.restore_state(other, path)
    after = jax.tree.map(np.asarray, nnx.state(other, nnx.Param))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_python_scalar_variables_round_trip(tmp_path):
    class Scaled(nnx.Module):
        def __init__(self):
            self.temperature = nnx.Param(1.5)  # flax keeps a Python float here

    saved, restored = Scaled(), Scaled()
    saved.temperature.set_value(2.5)
    rnnx.save_state(saved, tmp_path / "s.msgpack")
    rnnx.restore_state(restored, tmp_path / "s.msgpack")
    assert restored.temperature.get_value() == 2.5
    assert isinstance(restored.temperature.get_value(), float)
    for value in (np.float32(0.5), np.zeros((), np.float32), np.arange(3.0)):  # NumPy values
        saved.temperature.set_value(value)
        other = np.full_like(value, 7) if isinstance(value, np.ndarray) else type(value)(7)
        restored.temperature.set_value(other)  # restoring keeps the node's type
        rnnx.save_state(saved, tmp_path / "s.msgpack")
        rnnx.restore_state(restored, tmp_path / "s.msgpack")
        got = restored.temperature.get_value()
        assert type(got) is type(value) and np.array_equal(got, value)


def test_paths_that_join_to_one_key_are_refused(tmp_path):
    """A key containing '/' and a nested path join to the same file key: one variable was
    silently not restored."""
    node = nnx.Dict(
        {
            "x": nnx.Dict({"a/b": nnx.Param(jnp.ones(2))}),
            "x/a": nnx.Dict({"b": nnx.Param(jnp.zeros(2))}),
        }
    )
    with pytest.raises(ValueError, match=r"both stored as 'x/a/b'"):
        rnnx.save_state(node, tmp_path / "c.msgpack")
