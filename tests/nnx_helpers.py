"""Shared fixtures of the NNX tests (test_nnx.py, test_nnx_block.py, test_nnx_branch.py,
test_nnx_state.py): a pre-norm MLP branch with dropout, a reversible block of two of them, a
stack of it, inputs, a loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import revjax.nnx as rnnx

DIM, DEPTH, BATCH = 8, 5, 6


class Mlp(nnx.Module):
    """Pre-norm MLP branch with dropout: every kind of state a branch may hold."""

    def __init__(self, dim: int, rate: float, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.down(jnp.tanh(self.up(self.norm(x)))))


@rnnx.reversible
class Block(nnx.Module):
    def __init__(self, dim: int, rate: float = 0.0, *, rngs: nnx.Rngs):
        self.f = Mlp(dim, rate, rngs=rngs)
        self.g = Mlp(dim, rate, rngs=rngs)


def make_stack(rate: float = 0.0, depth: int = DEPTH, **options) -> rnnx.Stack:
    return rnnx.Stack(Block, depth, DIM, rate, rngs=nnx.Rngs(0), **options)


def inputs(seed: int = 1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (BATCH, DIM)), jax.random.normal(k2, (BATCH, DIM)))


def max_relative_error(a, b) -> float:
    errors = jax.tree.map(lambda u, v: float(jnp.linalg.norm(u - v) / jnp.linalg.norm(v)), a, b)
    return float(np.max(jax.tree.leaves(errors)))  # np.max keeps a NaN leaf; max() may drop it


class Noisy(nnx.Module):
    """Gaussian-noise branch: draws from its stream with no ``deterministic`` attribute."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.rngs = rngs.dropout.fork()

    def __call__(self, h):
        h = self.linear(h)
        return h + 0.1 * jax.random.normal(self.rngs(), h.shape)


def loss_of(model, x, key):
    y1, y2 = model(x, key=key)
    return jnp.sum(jnp.sin(y1) * y2) + jnp.sum(y1**2)
