"""Tests of revjax/_nnx_branch.py: an NNX branch as a pure function of one layer's parameters
whose RNG streams are rebuilt from an explicit key (the contract revjax.nnx.Stack relies on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_helpers import BATCH, DIM, Mlp, Noisy, make_stack

from revjax._nnx_branch import branch_draws_random, depends_on_key, pure_branch, stream_template


def split_branch(branch: nnx.Module):
    graphdef, params, streams, rest = nnx.split(branch, nnx.Param, nnx.RngState, ...)
    return graphdef, params, streams, rest


class TwoStreams(nnx.Module):
    """Dropout (stream "dropout") after a noise layer drawing from a stream of its own."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.noise = Noisy(DIM, rngs=nnx.Rngs(params=rngs.params(), dropout=rngs.noise()))
        self.mlp = Mlp(DIM, 0.5, rngs=rngs)

    def __call__(self, h):
        return self.mlp(self.noise(h))


def test_the_key_contract_stream_i_gets_fold_in_key_i():
    """The pure branch equals the module with stream i (in nnx.iter_graph order) reseeded to
    fold_in(key, i), count 0, whatever count the module's own streams had reached."""
    branch = TwoStreams(rngs=nnx.Rngs(0, noise=1, dropout=2))
    h = jax.random.normal(jax.random.key(1), (BATCH, DIM))
    branch(h)  # advances the module's own counters: the pure branch must not read them
    graphdef, params, streams, rest = split_branch(branch)
    pure = pure_branch(graphdef, stream_template(streams, stacked=False), rest, "branch f")
    key = jax.random.key(7)
    streams_in_order = [n for _, n in nnx.iter_graph(branch) if isinstance(n, nnx.RngStream)]
    assert len(streams_in_order) == 2
    for i, stream in enumerate(streams_in_order):
        stream.key.set_value(jax.random.fold_in(key, i))
        stream.count.set_value(jnp.zeros((), jnp.uint32))
    np.testing.assert_array_equal(pure(params, h, key), branch(h))
    # Replayed: a call advances no counter of the module's (the next call would differ).
    np.testing.assert_array_equal(pure(params, h, key), pure(params, h, key))
    assert float(jnp.abs(pure(params, h, key) - pure(params, h, jax.random.key(8))).max()) > 0


def test_the_template_of_a_stacked_state_drops_the_layer_axis():
    stacked = make_stack(0.5, depth=3).blocks.f  # parameters and streams with leading axis 3
    _, _, streams, _ = split_branch(stacked)
    _, spec = stream_template(streams)
    key_shapes = [shape for shape, _, is_key in spec if is_key]
    assert key_shapes == [()] and all(shape == () for shape, _, _ in spec)
    assert [shape for shape, _, _ in stream_template(streams, stacked=False)[1]] == [(3,), (3,)]


def test_a_random_branch_without_a_key_is_refused_and_a_deterministic_one_runs():
    branch = Mlp(DIM, 0.5, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (BATCH, DIM))
    graphdef, params, streams, rest = split_branch(branch)
    pure = pure_branch(graphdef, stream_template(streams, False), rest, "branch f", "Stack(B)")
    assert depends_on_key(pure, params, h) and branch_draws_random(branch, h)
    with pytest.raises(ValueError, match=r"^Stack\(B\): branch f draws random numbers"):
        pure(params, h)
    branch.eval()
    graphdef, params, streams, rest = split_branch(branch)
    pure = pure_branch(graphdef, stream_template(streams, False), rest, "branch f")
    assert not depends_on_key(pure, params, h) and not branch_draws_random(branch, h)
    np.testing.assert_array_equal(pure(params, h), branch(h))
    assert not branch_draws_random(nnx.Linear(DIM, DIM, rngs=nnx.Rngs(0)), h)  # no streams
