"""Tests of revjax.models.transformer: the reversible transformer and its twin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from reconstruction_checks import check_reconstruction_across_depth

from revjax.memory import compiled_memory
from revjax.models.lm_training import functional_train_step
from revjax.models.transformer import ReversibleTransformer, next_token_loss


def tokens(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


def small_model(**options) -> ReversibleTransformer:
    return ReversibleTransformer(256, 32, 3, 4, 32, dropout=0.1, rngs=nnx.Rngs(0), **options)


def max_relative_error(a, b) -> float:
    errors = jax.tree.map(lambda u, v: float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v)), a, b)
    return float(np.max(jax.tree.leaves(errors)))  # np.max keeps a NaN leaf; max() may drop it


def test_twin_has_identical_parameters_and_gradients():
    model, batch, key = small_model(), tokens(4, 33), jax.random.key(1)
    twin = nnx.view(model, method="backprop")
    assert (model.stack.method, twin.stack.method) == ("reversible", "backprop")
    # The same seed gives the same parameters whatever the method (a model built as backprop
    # is the twin of one built reversible), so saved states and seeds carry across methods.
    built = small_model(method="backprop")
    for a, b in zip(
        jax.tree.leaves(nnx.state(built, nnx.Param)),
        jax.tree.leaves(nnx.state(model, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    loss_rev, grads_rev = nnx.value_and_grad(next_token_loss)(model, batch, key)
    loss_twin, grads_twin = nnx.value_and_grad(next_token_loss)(twin, batch, key)
    assert abs(float(loss_rev - loss_twin)) <= 1e-6 * abs(float(loss_twin))
    # float32, 3 reversible blocks with dropout: reconstruction round-off only.
    assert max_relative_error(grads_rev, grads_twin) <= 1e-5


def test_causal_and_differentiable_in_every_parameter():
    model = small_model()
    model.eval()
    batch = tokens(2, 16)
    changed = batch.at[:, 10].set((batch[:, 10] + 1) % 256)
    before, after = model(batch), model(changed)
    # Positions before 10 cannot see position 10; positions from 10 on do.
    assert float(jnp.abs(before[:, :10] - after[:, :10]).max()) == 0.0
    assert float(jnp.abs(before[:, 10:] - after[:, 10:]).max()) > 1e-4
    model.train()
    grads = nnx.grad(next_token_loss)(model, tokens(2, 17), jax.random.key(0))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_bad_sizes():
    with pytest.raises(ValueError, match="dim=30 is not divisible by heads=4"):
        ReversibleTransformer(256, 30, 2, 4, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth must be a positive int"):
        ReversibleTransformer(256, 32, 0, 4, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 40 exceeds max_len=32"):
        small_model()(tokens(1, 40))
    with pytest.raises(ValueError, match=r"tokens have length 0 \(shape \(2, 0\)\)"):
        small_model()(tokens(2, 0))  # was a ZeroDivisionError from a reshape
    with pytest.raises(TypeError, match=r"tokens must be integer ids.*got float32\[1, 8\]"):
        small_model()(tokens(1, 8).astype(jnp.float32))  # was "indices must have an integer type"
    with pytest.raises(
        ValueError, match=r"\(batch, length\) or \(length,\) ids, got shape \(2, 3, 4\)"
    ):
        small_model()(jnp.zeros((2, 3, 4), jnp.int32))  # was "too many values to unpack"
    assert small_model()(jnp.zeros((8,), jnp.int32)).shape == (8, 256)  # one unbatched sequence


def test_more_bad_settings_are_refused():
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        ReversibleTransformer(256, 32, 2, 0, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dropout rate must lie in \[0, 1\), got -0.5"):
        ReversibleTransformer(256, 32, 2, 4, 16, dropout=-0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        ReversibleTransformer(0, 32, 2, 4, 16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"T >= 2, got \(2, 1\)"):
        next_token_loss(small_model(), tokens(2, 1))  # once a silent NaN
    # Without a mesh Flax said only "an auto mesh context is required".
    with pytest.raises(ValueError, match=r"tensor_parallel='model' needs a mesh .*set_mesh"):
        ReversibleTransformer(256, 32, 2, 4, 16, tensor_parallel="model", rngs=nnx.Rngs(0))


def test_the_public_sublayers_check_their_sizes_and_input_width():
    """CausalSelfAttention and FeedForward are public; dim=0 gave a ZeroDivisionError, a
    negative size a JAX shape error, the wrong width a reshape TypeError."""
    from revjax.models.transformer import CausalSelfAttention, FeedForward

    with pytest.raises(ValueError, match="CausalSelfAttention: dim must be a positive int, got 0"):
        CausalSelfAttention(0, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="FeedForward: hidden must be a positive int, got -3"):
        FeedForward(8, -3, rngs=nnx.Rngs(0))
    attention, feed_forward = (
        CausalSelfAttention(8, 2, rngs=nnx.Rngs(0)),
        FeedForward(8, 16, rngs=nnx.Rngs(0)),
    )
    with pytest.raises(ValueError, match=r"CausalSelfAttention: .*dim=8, got \(2, 5, 6\)"):
        attention(jnp.ones((2, 5, 6)))
    with pytest.raises(ValueError, match=r"CausalSelfAttention: .*\(\.\.\., length, dim\).*\(8,\)"):
        attention(jnp.ones((8,)))
    with pytest.raises(
        ValueError, match=r"FeedForward: expects x of shape \(\.\.\., dim\) with dim=8"
    ):
        feed_forward(jnp.ones((2, 5, 6)))
    assert attention(jnp.ones((2, 5, 8))).shape == feed_forward(jnp.ones((2, 5, 8))).shape
    # Two batch axes (the docstring's (..., length, dim)) failed inside dot_product_attention
    # ("too many values to unpack"); each leading index is attended on its own, causally.
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    both = attention(x)
    assert both.shape == (2, 3, 5, 8)
    np.testing.assert_allclose(both[1, 2], attention(x[1, 2]), rtol=1e-5, atol=1e-6)
    assert attention(jnp.ones((5, 8))).shape == (5, 8)


def test_no_dropout_needs_no_dropout_stream():
    """Without dropout the model builds from a params stream alone (once a KeyError); with a
    stream that can supply dropout keys the parameters drawn from a seed do not depend on the
    rate, so saved states and seeds stay valid across rates."""
    model = ReversibleTransformer(256, 32, 2, 4, 16, rngs=nnx.Rngs(params=0))
    assert model(tokens(2, 8)).shape == (2, 8, 256)
    params = lambda rate: nnx.state(
        ReversibleTransformer(256, 32, 2, 4, 16, dropout=rate, rngs=nnx.Rngs(0)), nnx.Param
    )
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params(0.0), params(0.1))
    assert all(jax.tree.leaves(same))


def test_token_ids_outside_the_vocabulary_give_nan():
    """Neither too large nor negative ids are silently read as another token's embedding."""
    model = ReversibleTransformer(256, 32, 1, 4, 16, rngs=nnx.Rngs(0))
    logits = np.asarray(model(jnp.array([[1, 2, 3], [1, 2, 256], [1, 2, -1]])))
    assert np.isfinite(logits[0]).all()
    # The NaN row reaches every position of its sequence (masked attention weights are 0, and
    # 0 * NaN = NaN in the matmul), never another sequence of the batch.
    assert np.isnan(logits[1:, 2]).all()
    # A narrow signed dtype: vocab_size (256) does not fit int8, and the out-of-range marker
    # once wrapped to 0, reading id -56 as token 0.
    narrow = np.asarray(model(jnp.array([[1, 2, -56]], jnp.int8)))
    assert np.isnan(narrow[0, 2]).all()
    np.testing.assert_array_equal(np.asarray(model(jnp.array([[1, 2, 3]], jnp.int8))), logits[:1])
    # A bad id used only as a target (the last position): a negative one was read by optax as
    # counted from the end of the vocabulary, a finite loss equal to that of id 255.
    assert np.isfinite(next_token_loss(model, jnp.array([[1, 2, 255]])))
    for bad in (-1, 256):
        assert np.isnan(next_token_loss(model, jnp.array([[1, 2, bad]]))), bad
        # The gradients too: a selected-away position left them finite, and training stepped.
        grads = nnx.grad(next_token_loss)(model, jnp.array([[1, 2, bad]]))
        assert all(np.isnan(g).any() for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
    with jax.enable_x64(True):  # 2**32 + 5 narrowed to int32 first was read as id 5
        wide = jnp.array([[1, 2, 2**32 + 5]], jnp.int64)
        assert np.isnan(np.asarray(model(wide))[0, 2]).all()
        assert np.isnan(next_token_loss(model, wide))
        assert np.isfinite(next_token_loss(model, jnp.array([[1, 2, 5]], jnp.int64)))
    assert np.isfinite(next_token_loss(model, [[1, 2, 3]]))  # a nested list, as jnp takes it
    with pytest.raises(ValueError, match="hidden must be a positive int, got 0"):
        ReversibleTransformer(256, 32, 1, 4, 16, hidden=0, rngs=nnx.Rngs(0))


def training_step_temp_mib(depth: int, method: str) -> float:
    """Compiled temp memory of one AdamW training step (forward, gradient, update)."""
    batch, length = 8, 512  # activations (attention scores) dominate the per-layer parameters
    model = ReversibleTransformer(256, 32, depth, 4, length, method=method, rngs=nnx.Rngs(0))
    step, state = functional_train_step(
        model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    )
    abstract = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
    return compiled_memory(step, state, abstract).temp_mib


def test_training_step_memory_is_flat_in_depth():
    reversible = [training_step_temp_mib(depth, "reversible") for depth in (4, 32)]
    twin = [training_step_temp_mib(depth, "backprop") for depth in (4, 32)]
    # Issue criterion: L = 4 and L = 32 within 5%. What still grows with L is parameter-sized
    # (gradients, Adam update), about 1 MiB here against ~130 MiB of one block's activations.
    assert abs(reversible[1] - reversible[0]) <= 0.05 * reversible[0]
    assert twin[1] > 4 * twin[0]  # the twin stores every block's activations
    assert reversible[1] < twin[1] / 10


def test_stack_reconstruction_float32_and_bfloat16_across_depth():
    """DESIGN's numerics rule for the transformer's attention and MLP couplings (width 32, 4
    heads, 16 positions; tests/reconstruction_checks.py)."""

    def make(depth):
        model = ReversibleTransformer(256, 32, depth, 4, 16, rngs=nnx.Rngs(0))
        h = jax.random.normal(jax.random.key(3), (4, 16, 32))
        return (*model.stack.coupling(), (h, h))

    check_reconstruction_across_depth(make)
