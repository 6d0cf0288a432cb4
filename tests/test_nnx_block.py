"""Tests of the @revjax.nnx.reversible decorator and its block checks (revjax/_nnx_block.py):
what a block may hold, subclasses, a single block's call and inverse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_helpers import BATCH, DIM, Block, Noisy, inputs, make_stack, max_relative_error

import revjax.nnx as rnnx


def test_batch_norm_state_is_refused_with_its_path():
    @rnnx.reversible
    class Normed(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Sequential(nnx.Linear(dim, dim, rngs=rngs), nnx.BatchNorm(dim, rngs=rngs))
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(TypeError, match=r"Normed\.f\.layers\.1\.mean is state of type BatchStat"):
        rnnx.Stack(Normed, 2, DIM, rngs=nnx.Rngs(0))

    @rnnx.reversible
    class Buffered(nnx.Module):  # a constant table held as a raw array
        def __init__(self, dim, *, rngs):
            self.f, self.g = nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)
            self.f.table = jnp.ones((4, dim))

    # The advice once said "wrap constants in nnx.Param", which an optimizer then trains.
    with pytest.raises(TypeError, match=r"subclass of nnx\.Param .* a plain nnx\.Param would be"):
        Buffered(DIM, rngs=nnx.Rngs(0))


def test_a_subclass_is_checked_after_its_own_init():
    """The check ran when the decorated base's __init__ returned, before a subclass's
    __init__ replaced a branch: a BatchNorm branch was built, then failed at the first call
    with a false "appeared after construction"."""

    @rnnx.reversible
    class Base(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    class WithBatchNorm(Base):
        def __init__(self, dim, *, rngs):
            super().__init__(dim, rngs=rngs)
            self.g = nnx.BatchNorm(dim, rngs=rngs)

    refused = r"WithBatchNorm\.g\.mean is state of type BatchStat"
    with pytest.raises(TypeError, match=refused):
        WithBatchNorm(DIM, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=refused):
        rnnx.Stack(WithBatchNorm, 2, DIM, rngs=nnx.Rngs(0))

    class Repaired(WithBatchNorm):  # checked once, with the branches it ends with
        def __init__(self, dim, *, rngs):
            super().__init__(dim, rngs=rngs)
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    class Inherited(Base):  # no __init__ of its own
        pass

    for cls in (Repaired, Inherited):
        block, x = cls(DIM, rngs=nnx.Rngs(0)), inputs()
        assert max_relative_error(block.inverse(block(x)), x) <= 1e-6
        assert rnnx.Stack(cls, 2, DIM, rngs=nnx.Rngs(0))(x)[0].shape == (BATCH, DIM)


def test_other_bad_blocks():
    class Undecorated(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = self.g = nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(TypeError, match=r"decorate the class with @revjax\.nnx\.reversible"):
        rnnx.Stack(Undecorated, 2, DIM, rngs=nnx.Rngs(0))

    with pytest.raises(TypeError, match="defines __call__"):

        @rnnx.reversible
        class WithCall(nnx.Module):
            def __call__(self, x):
                return x

    @rnnx.reversible
    class NoG(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(TypeError, match=r"nnx\.Module attribute self\.g"):
        NoG(DIM, rngs=nnx.Rngs(0))

    @rnnx.reversible
    class Shared(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Linear(dim, dim, rngs=rngs)
            self.g = nnx.Sequential(self.f)

    with pytest.raises(TypeError, match="must not share variables"):
        Shared(DIM, rngs=nnx.Rngs(0))

    @rnnx.reversible
    class Outside(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Linear(dim, dim, rngs=rngs)
            self.g = nnx.Linear(dim, dim, rngs=rngs)
            self.scale = nnx.Param(jnp.ones(dim))

    with pytest.raises(TypeError, match=r"Outside\.scale .*outside the branches"):
        Outside(DIM, rngs=nnx.Rngs(0))

    class Scaled(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.linear = nnx.Linear(dim, dim, rngs=rngs)
            self.scale = jnp.full((dim,), 2.0)  # a raw array: not a parameter

        def __call__(self, x):
            return self.linear(x) * self.scale

    @rnnx.reversible
    class RawArray(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = Scaled(dim, rngs=rngs)
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(TypeError, match=r"RawArray\.f\.scale is state of type ArrayImpl"):
        RawArray(DIM, rngs=nnx.Rngs(0))

    @rnnx.reversible
    class LambdaBranch(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = lambda h: h
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(TypeError, match=r"needs an nnx\.Module attribute self\.f"):
        LambdaBranch(DIM, rngs=nnx.Rngs(0))

    class Overriding(Block):
        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="Overriding overrides __call__"):
        Overriding(DIM, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="method must be one of"):
        make_stack(method="magic")
    with pytest.raises(ValueError, match=r"takes a pair \(x1, x2\)"):
        make_stack()(inputs()[0])


def test_single_block_call_and_inverse():
    block = Block(DIM, rngs=nnx.Rngs(0))
    x = inputs()
    y = block(x)
    np.testing.assert_allclose(y[0], x[0] + block.f(x[1]), rtol=1e-6)
    np.testing.assert_allclose(y[1], x[1] + block.g(y[0]), rtol=1e-6)
    assert max_relative_error(block.inverse(y), x) <= 1e-6
    noisy = Block(DIM, 0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Block\.inverse: the block has active dropout"):
        noisy.inverse(noisy(x))
    noisy.eval()
    assert max_relative_error(noisy.inverse(noisy(x)), x) <= 1e-6


def test_single_block_computes_what_a_stack_of_it_computes():
    """A block called alone runs the stack's coupling: branch outputs cast to the half's dtype
    (it used to add them as they came, so bf16 halves with float32 params came out float32),
    shapes checked (a broadcasting branch used to pass), pytree halves accepted."""
    stack = make_stack(depth=1)
    graphdef, state = nnx.split(stack.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    x = tuple(h.astype(jnp.bfloat16) for h in inputs())
    y, expected = block(x), stack(x)
    assert [a.dtype for a in y] == [jnp.bfloat16, jnp.bfloat16]
    for a, b in zip(y, expected, strict=True):
        # Eager branches round their bf16 intermediates op by op, the compiled scan fuses them
        # in float32: the halves differ by a bf16 ulp of their size (|x| < 4), measured 7.8e-3.
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)
    back = block.inverse(y)
    assert [a.dtype for a in back] == [jnp.bfloat16, jnp.bfloat16]
    # bf16 halves: the reconstruction is exact up to bf16 round-off of the additions.
    assert max_relative_error(jax.tree.map(lambda a: a.astype(jnp.float32), back), inputs()) <= 2e-2

    class Summing(nnx.Module):  # (B, D) -> (B, 1): broadcasts against the half
        def __init__(self, dim, *, rngs):
            self.linear = nnx.Linear(dim, 1, rngs=rngs)

        def __call__(self, h):
            return self.linear(h)

    @rnnx.reversible
    class Broadcasting(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = Summing(dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    with pytest.raises(ValueError, match=r"f must return.*\(6, 8\).*\(6, 1\)"):
        Broadcasting(DIM, rngs=nnx.Rngs(0))(inputs())

    class DictBranch(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.linear = nnx.Linear(dim, dim, rngs=rngs)

        def __call__(self, h):
            return {"a": self.linear(h["a"])}

    @rnnx.reversible
    class DictBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = DictBranch(dim, rngs=rngs), DictBranch(dim, rngs=rngs)

    dict_block = DictBlock(DIM, rngs=nnx.Rngs(0))
    halves = ({"a": inputs()[0]}, {"a": inputs()[1]})
    assert max_relative_error(dict_block.inverse(dict_block(halves)), halves) <= 1e-6


def test_single_block_inverse_refuses_any_random_branch():
    """Noise without a ``deterministic`` attribute was missed by the attribute check and the
    inverse came back silently wrong; the traced computation sees it."""

    @rnnx.reversible
    class NoisyBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = Noisy(dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    block, x = NoisyBlock(DIM, rngs=nnx.Rngs(0)), inputs()
    with pytest.raises(ValueError, match=r"NoisyBlock\.inverse: .* other random draws"):
        block.inverse(block(x))
    block.eval()  # does not stop the noise, and the message does not suggest it
    with pytest.raises(ValueError, match="even in eval mode") as info:
        block.inverse(block(x))
    assert "eval() first" not in str(info.value)


def test_single_block_errors_name_the_block_class():
    """A single block's shape error said only "additive_coupling: g must ...", while the same
    block in a stack said "Stack(Wide): ..."; the class name leads both now."""

    class Widen(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.linear = nnx.Linear(dim, 2 * dim, rngs=rngs)

        def __call__(self, h):
            return self.linear(h)

    @rnnx.reversible
    class Wide(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = nnx.Linear(dim, dim, rngs=rngs), Widen(dim, rngs=rngs)

    block, x = Wide(DIM, rngs=nnx.Rngs(0)), inputs()
    with pytest.raises(ValueError, match=r"^Wide: additive_coupling: g must return .*\(6, 16\)"):
        block(x)
    with pytest.raises(ValueError, match=r"^Wide\.inverse: additive_coupling: g must return"):
        block.inverse(x)


def test_errors_name_the_block_class_when_branches_hold_rng_streams():
    """With dropout in a branch the block is first traced to see whether it draws, outside the
    naming context: the same shape error came without "Stack(WideDrop)" (called without key=)
    or "WideDrop.inverse"."""

    class WidenDrop(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.linear = nnx.Linear(dim, 2 * dim, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, h):
            return self.dropout(self.linear(h))

    @rnnx.reversible
    class WideDrop(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = nnx.Linear(dim, dim, rngs=rngs), WidenDrop(dim, rngs=rngs)

    x = inputs()
    stack = rnnx.Stack(WideDrop, 2, DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^Stack\(WideDrop\): additive_coupling: g must"):
        stack(x)
    with pytest.raises(ValueError, match=r"^Stack\(WideDrop\)\.inverse: additive_coupling: g"):
        stack.inverse(x)
    block = WideDrop(DIM, rngs=nnx.Rngs(0))
    block.eval()
    with pytest.raises(ValueError, match=r"^WideDrop\.inverse: additive_coupling: g must"):
        block.inverse(x)
