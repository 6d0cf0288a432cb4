"""The ``@reversible`` decorator for Flax NNX blocks, and the checks on what a block holds.

A block is an ``nnx.Module`` whose ``__init__`` sets two residual branches ``self.f`` and
``self.g``; the decorator gives it the additive coupling ``y1 = x1 + f(x2)``, ``y2 = x2 +
g(y1)`` as ``__call__`` and its inverse as ``inverse``, and checks every instance once built
(:func:`check_block`). Internal to :mod:`revjax.nnx`, which re-exports :func:`reversible` and
:func:`check_block`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
from flax import nnx

from revjax._nnx_branch import ALLOWED_STATE, branch_draws_random
from revjax.coupling import Coupling, additive_coupling

BRANCHES: tuple[str, ...] = ("f", "g")


# --------------------------------------------------------------------------- the decorator


def reversible(cls: type) -> type:
    """Class decorator: an ``nnx.Module`` with branches ``f`` and ``g`` becomes a coupling block.

    The class's ``__init__`` must set ``self.f`` and ``self.g`` (``nnx.Module`` instances
    mapping one array to an array shaped like it: attention, MLP, conv, norms, dropout,
    ``nnx.Sequential``) and nothing else that holds state. The decorator adds

    * ``__call__(x)``: ``x = (x1, x2) -> (y1, y2)``, ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``
      (the additive coupling :class:`revjax.nnx.Stack` runs: branch outputs cast to the
      half's dtype, their shapes checked, pytree halves accepted; its errors start with the
      class name);
    * ``inverse(y)``: ``(y1, y2) -> (x1, x2)``, ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``
      (refused while dropout is active: a single block's masks come from its RNG counter);

    and checks every instance when it is built (see :func:`check_block`), once the outermost
    ``__init__`` has returned: a subclass whose ``__init__`` calls ``super().__init__()`` and
    then replaces a branch is checked with its own branches.

    Raises:
      TypeError: ``cls`` is not an ``nnx.Module`` subclass, or defines its own ``__call__`` or
        ``inverse`` (the coupling is what the decorator provides).
    """
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise TypeError(f"revjax.nnx.reversible decorates nnx.Module subclasses, got {cls!r}")
    for name in ("__call__", "inverse"):
        if name in vars(cls):
            raise TypeError(
                f"revjax.nnx.reversible: {cls.__name__} defines {name}; a reversible block only "
                "defines its branches self.f and self.g, and the decorator supplies the coupling"
            )
    if not getattr(vars(cls).get("__init__"), _CHECKED_INIT, False):
        cls.__init__ = _checked_init(cls.__init__)
    cls.__init_subclass__ = _checking_init_subclass(cls)
    cls.__call__ = _block_forward
    cls.inverse = _block_inverse
    cls.__revjax_reversible__ = True
    return cls


_CHECKED_INIT = "__revjax_checked_init__"


def _checked_init(init: Any) -> Any:
    """``init`` followed by the block checks, which run only in the outermost checked
    ``__init__`` of the instance's class: a subclass's ``__init__`` that calls
    ``super().__init__()`` and then sets its own branches is checked after it has set them."""

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if _outermost_checked_init(type(self)) is not checked_init:
            return  # a subclass's __init__ is still running; it checks when it returns
        for method, expected in (("__call__", _block_forward), ("inverse", _block_inverse)):
            if getattr(type(self), method) is not expected:
                raise TypeError(
                    f"{type(self).__name__} overrides {method} of the reversible block it "
                    "subclasses; the coupling is what @revjax.nnx.reversible provides"
                )
        check_block(self)

    setattr(checked_init, _CHECKED_INIT, True)
    return checked_init


def _outermost_checked_init(cls: type) -> Any:
    """The first checked ``__init__`` along ``cls``'s MRO (the one that returns last)."""
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if getattr(init, _CHECKED_INIT, False):
            return init
    return None


def _checking_init_subclass(cls: type) -> classmethod:
    """An ``__init_subclass__`` for the decorated ``cls`` that wraps every subclass's own
    ``__init__`` with :func:`_checked_init` (after the hook ``cls`` had, e.g. NNX's)."""
    own = vars(cls).get("__init_subclass__")

    def __init_subclass__(sub, **kwargs):
        if own is not None:
            own.__func__(sub, **kwargs)
        else:
            super(cls, sub).__init_subclass__(**kwargs)
        init = vars(sub).get("__init__")
        if init is not None and not getattr(init, _CHECKED_INIT, False):
            sub.__init__ = _checked_init(init)

    return classmethod(__init_subclass__)


def _block_coupling(self) -> Coupling:
    """The block's own coupling, branches called statefully: the same additive coupling as
    :class:`revjax.nnx.Stack`'s (branch outputs cast to the half's dtype, shapes checked,
    pytree halves), so one block runs the operations a stack of it runs (eager rounding may
    differ from the compiled scan's fusion by an ulp in low precision)."""
    return additive_coupling(lambda _, h: self.f(h), lambda _, h: self.g(h))


def _block_forward(self, x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    name = type(self).__name__
    x = halves(x, name)
    with named(name):
        return tuple(_block_coupling(self).forward((None, None), x))


def _block_inverse(self, y: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    name = type(self).__name__
    y1, y2 = halves(y, name)
    # g runs at y1 and f at x2, which has y2's shape. Traced here first: errors name the block.
    with named(f"{name}.inverse"):
        draws = branch_draws_random(self.g, y1) or branch_draws_random(self.f, y2)
        if draws:
            quiet = nnx.with_attributes(self, deterministic=True, raise_if_not_found=False)
            draws_in_eval = branch_draws_random(quiet.g, y1) or branch_draws_random(quiet.f, y2)
    if draws:
        if draws_in_eval:
            advice = ", even in eval mode (e.g. a noise layer); use"  # .eval() would not help
        else:
            advice = "; call .eval() first (dropout off), or use"
        raise ValueError(
            f"{name}.inverse: the block has active dropout or other random draws, which come "
            f"from its RNG counter and cannot be replayed here{advice} revjax.nnx.Stack with "
            "key= for a stochastic forward that can be inverted"
        )
    with named(f"{name}.inverse"):
        return tuple(_block_coupling(self).inverse((None, None), (y1, y2)))


def halves(x: Any, name: str) -> tuple[Any, Any]:
    """``(x1, x2)`` from a pair, or a ``ValueError`` naming ``name`` (a block class or stack)."""
    if not (isinstance(x, tuple | list) and len(x) == 2):
        raise ValueError(
            f"{name}: a reversible block takes a pair (x1, x2), got {type(x).__name__}"
        )
    return x[0], x[1]


def _state_entries(module: nnx.Module, prefix: tuple) -> list[tuple[str, Any]]:
    """``(dotted path, variable or raw array)`` for every leaf of ``nnx.state(module)``."""
    return [
        (".".join(map(str, (*prefix, *path))), leaf)
        for path, leaf in nnx.to_flat_state(nnx.state(module))
    ]


def check_block(block: nnx.Module) -> None:
    """Checks that ``block`` is a valid reversible block.

    Raises:
      TypeError: ``f`` or ``g`` is missing or not an ``nnx.Module``; state that is not an
        ``nnx.Param`` or an RNG stream (e.g. ``nnx.BatchStat`` or a raw array attribute),
        naming its path and type; a variable held outside ``f`` and ``g``; a variable shared
        by ``f`` and ``g``.
    """
    name = type(block).__name__
    for branch in BRANCHES:
        if not isinstance(getattr(block, branch, None), nnx.Module):
            raise TypeError(
                f"{name}: a reversible block needs an nnx.Module attribute self.{branch} (the "
                f"residual branch), got {getattr(block, branch, None)!r}"
            )
        for where, leaf in _state_entries(getattr(block, branch), (branch,)):
            if not isinstance(leaf, ALLOWED_STATE):
                raise TypeError(
                    f"{name}.{where} is state of type {type(leaf).__name__}: reversible blocks "
                    "may only hold nnx.Param and RNG streams, because the backward pass re-runs "
                    "each branch to reconstruct its input and would update other state twice "
                    "(use LayerNorm/RMSNorm instead of BatchNorm; for a constant buffer such as "
                    "a RoPE table compute it in __call__, or hold it in a subclass of nnx.Param "
                    "and keep it out of training with a filter, e.g. nnx.Optimizer(model, tx, "
                    "wrt=nnx.All(nnx.Param, nnx.Not(Buffer))): a plain nnx.Param would be "
                    "trained)"
                )
    owner: dict[int, str] = {}
    for branch in BRANCHES:
        for path, node in nnx.iter_graph(getattr(block, branch)):
            if not isinstance(node, nnx.Variable):
                continue
            where = ".".join(map(str, (branch, *path)))
            if id(node) in owner:
                raise TypeError(
                    f"{name}.{where} is the same variable as {name}.{owner[id(node)]}: f and g "
                    "must not share variables"
                )
            owner[id(node)] = where
    inside = {
        where
        for branch in BRANCHES
        for where, _ in _state_entries(getattr(block, branch), (branch,))
    }
    for where, _ in _state_entries(block, ()):
        if where not in inside:
            raise TypeError(
                f"{name}.{where} is state outside the branches f and g; a reversible block "
                "holds state only inside f and g"
            )


@contextlib.contextmanager
def named(where: str):
    """Prefixes the message of a ValueError/TypeError raised while tracing with ``where``, so
    a wrong branch shape names the block class as well as the branch."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError):  # JAX's own subclasses: leave untouched
            raise
        hint = ""
        if "forward-mode" in str(err):
            hint = (
                "; reversible_scan has a custom reverse-mode rule only: for jvp/jacfwd use "
                'nnx.view(model, method="backprop") (the twin with the same parameters)'
            )
        named = type(err)(f"{where}: {err}{hint}")
        for note in getattr(err, "__notes__", ()):  # e.g. the coupling's note naming the branch
            named.add_note(note)
        raise named from err


__all__ = ["BRANCHES", "check_block", "halves", "named", "reversible"]
