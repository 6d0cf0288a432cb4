"""Tests of revjax.nnx_state: save_state / restore_state of NNX graph nodes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from nnx_helpers import DEPTH, DIM, Block, inputs, loss_of, make_stack

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


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    """Corrupt bytes raised msgpack's "unpack(b) received extra data", naming no file."""
    model = make_stack()
    path = tmp_path / "state.msgpack"
    rnnx.save_state(model, path)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(ValueError, match=r"restore_state: .*state\.msgpack is not a checkpoint"):
        rnnx.restore_state(model, path)
    path.write_bytes(b"\x01")  # valid msgpack, the integer 1
    with pytest.raises(ValueError, match=r"not a checkpoint written by save_state \(it holds"):
        rnnx.restore_state(model, path)
    with pytest.raises(FileNotFoundError, match=r"missing\.msgpack"):
        rnnx.restore_state(model, tmp_path / "missing.msgpack")


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


def _frozen_bias_optimizer(model: nnx.Module) -> nnx.Optimizer:
    """An optimiser that freezes the bias: optax keeps an empty MaskedNode in its place."""
    labels = lambda p: jax.tree.map_with_path(
        lambda path, _: "frozen" if "bias" in str(path) else "train", p
    )
    tx = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def test_variables_holding_pytrees_round_trip(tmp_path):
    """optax.multi_transform's MaskedNode (a frozen parameter's empty state) was written as a
    float64[0] array and crashed the restore in ``.item()``; a tuple left by ``sow`` likewise."""
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    optimizer = _frozen_bias_optimizer(model)
    optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    rnnx.save_state((model, optimizer), tmp_path / "m.msgpack")
    fresh = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
    fresh_optimizer = _frozen_bias_optimizer(fresh)
    rnnx.restore_state((fresh, fresh_optimizer), tmp_path / "m.msgpack")
    saved, restored = nnx.state((model, optimizer)), nnx.state((fresh, fresh_optimizer))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)

    class Holder(nnx.Module):
        def __init__(self, value):
            self.v = nnx.Intermediate(value)

    pair = (jnp.arange(3.0), np.float32(2.0))
    rnnx.save_state(Holder(pair), tmp_path / "t.msgpack")
    other = Holder((jnp.zeros(3), np.float32(0.0)))
    rnnx.restore_state(other, tmp_path / "t.msgpack")
    got = other.v.get_value()
    assert isinstance(got, tuple) and type(got[1]) is np.float32
    np.testing.assert_array_equal(got[0], pair[0])
    assert got[1] == np.float32(2.0)
    with pytest.raises(
        ValueError,
        match=r"v is leaves \['\[0\]', '\[1\]'\] in .* but tuple of leaves .*'\[2\]'",
    ):
        rnnx.restore_state(Holder((1.0, 2.0, 3.0)), tmp_path / "t.msgpack")
    rnnx.save_state(Holder(None), tmp_path / "n.msgpack")
    with pytest.raises(ValueError, match=r"v is leaves \[\] in .* but one array in the module"):
        rnnx.restore_state(Holder(jnp.ones(2)), tmp_path / "n.msgpack")
    # Leaves are matched by their paths: a dict with another key was filled by position.
    rnnx.save_state(Holder({"a": jnp.ones(2), "b": jnp.zeros(2)}), tmp_path / "d.msgpack")
    with pytest.raises(ValueError, match=r"v is leaves \[\"\['a'\]\", \"\['b'\]\"\]"):
        rnnx.restore_state(Holder({"a": jnp.ones(2), "c": jnp.ones(2)}), tmp_path / "d.msgpack")
    with pytest.raises(TypeError, match=r"save_state: v holds a value of type str"):
        rnnx.save_state(Holder("text"), tmp_path / "s.msgpack")


def test_restore_into_an_abstract_model(tmp_path):
    """A model from nnx.eval_shape (never initialised) holds ShapeDtypeStructs: the restore
    said "float32[4] in file but object[] in the module"."""
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    rnnx.save_state(model, tmp_path / "m.msgpack")
    abstract = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(5)))
    assert isinstance(abstract.kernel.get_value(), jax.ShapeDtypeStruct)
    rnnx.restore_state(abstract, tmp_path / "m.msgpack")
    assert isinstance(abstract.kernel.get_value(), jax.Array)
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(abstract(x), model(x))

    # With RNG streams (key_impl of an abstract key failed) and a Python-scalar variable (an
    # abstract weak int32 against the file's int64), as in a stack with dropout.
    class Counter(nnx.Module):
        def __init__(self, count):
            self.count = nnx.Variable(count)  # a Python int

    stack = make_stack(0.3)
    rnnx.save_state((stack, Counter(3)), tmp_path / "s.msgpack")
    abstract_stack, counter = nnx.eval_shape(lambda: (make_stack(0.3), Counter(0)))
    rnnx.restore_state((abstract_stack, counter), tmp_path / "s.msgpack")
    key, xs = jax.random.key(3), inputs()
    np.testing.assert_array_equal(abstract_stack(xs, key=key)[0], stack(xs, key=key)[0])
    np.testing.assert_array_equal(abstract_stack(xs)[0], stack(xs)[0])  # its own stream, too
    assert int(counter.count.get_value()) == 3


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="with x64 an abstract scalar is 64-bit")
def test_an_abstract_scalar_that_cannot_hold_the_saved_value_is_refused(tmp_path):
    """An abstract model's Python-scalar variable becomes a JAX array of the default dtype: a
    saved 3e9 came back as -1294967296 (int32 wrap, no warning) and 1e300 as inf."""

    class Counters(nnx.Module):
        def __init__(self, tokens, scale):
            self.tokens = nnx.Variable(tokens)
            self.scale = nnx.Variable(scale)

    for tokens, scale, bad in [(3_000_000_000, 1.0, "tokens is 3000000000"),
                               (5, 1e300, "scale is 1e+300")]:  # fmt: skip
        path = tmp_path / "c.msgpack"
        rnnx.save_state(Counters(tokens, scale), path)
        concrete = Counters(0, 0.0)  # a concrete module keeps Python scalars: exact
        rnnx.restore_state(concrete, path)
        assert (concrete.tokens.get_value(), concrete.scale.get_value()) == (tokens, scale)
        abstract = nnx.eval_shape(lambda: Counters(0, 0.0))
        message = re.escape(f"restore_state: {bad} in ") + ".* cannot hold"
        with pytest.raises(ValueError, match=message):
            rnnx.restore_state(abstract, path)
        assert isinstance(abstract.scale.get_value(), jax.ShapeDtypeStruct)  # left untouched
    rnnx.save_state(Counters(2**31 - 1, -3.4e38), path)  # the edges of int32, float32 fit
    abstract = nnx.eval_shape(lambda: Counters(0, 0.0))
    rnnx.restore_state(abstract, path)
    assert int(abstract.tokens.get_value()) == 2**31 - 1
    assert np.isfinite(abstract.scale.get_value())


def test_saving_an_abstract_node_says_it_is_abstract(tmp_path):
    """It said the variable held "a value of type ShapeDtypeStruct (object as an array)" and
    to keep such values out of nnx variables."""
    abstract = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"save_state: \S+ is abstract \(float32\[\d.*eval_shape"):
        rnnx.save_state(abstract, tmp_path / "a.msgpack")
    assert not (tmp_path / "a.msgpack").exists()


def test_an_interrupted_save_leaves_the_previous_file(tmp_path, monkeypatch):
    """The file was written in place: a kill mid-write destroyed the only checkpoint."""
    path = tmp_path / "m.msgpack"
    rnnx.save_state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), path)
    before = path.read_bytes()

    def killed(self, data):  # half the bytes, then the process dies
        open(self, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(path), "write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        rnnx.save_state(nnx.Linear(3, 4, rngs=nnx.Rngs(1)), path)
    assert path.read_bytes() == before
