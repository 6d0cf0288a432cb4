"""Flax NNX integration: reversible blocks by decorator, and a stack of them as one NNX module.

A block is an ``nnx.Module`` with two residual branches, the submodules ``f`` and ``g``::

    @revjax.nnx.reversible
    class Block(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = Attention(dim, rngs=rngs)
            self.g = MLP(dim, rngs=rngs)

    model = revjax.nnx.Stack(Block, 48, 512, rngs=nnx.Rngs(0))   # 48 blocks, Block(512, rngs=.)
    y1, y2 = model((x1, x2))

The decorator gives the block the RevNet additive coupling on a stream of two halves,

    y1 = x1 + f(x2),  y2 = x2 + g(y1)        x2 = y2 - g(y1),  x1 = y1 - f(x2),

as ``__call__`` and ``inverse``. :class:`Stack` builds ``L`` blocks with ``nnx.vmap`` and
``nnx.split_rngs`` (every parameter gets a leading axis ``L``) and runs them with
:func:`revjax.reversible_scan`, so the gradient stores no per-layer activations.

Inside the scan nothing is stateful: each branch runs as a pure function of one layer's
parameters and a key from which its RNG streams are rebuilt (:mod:`revjax._nnx_branch`), in the
forward pass and again in the reconstruction, so dropout masks are replayed exactly. Layer ``l``'s
branch ``f`` gets stream ``i``'s key

    fold_in(k_f, i),   (k_f, k_g) = jax.random.split(fold_in(key, l)).

The per-call ``key`` comes from the ``key=`` argument, or else from the stack's own RNG stream
(advanced once per call, outside the scan, like ``nnx.Dropout``'s own stream) whenever the
blocks' output depends on their streams (:func:`draws_random`). The decorator and its checks
live in :mod:`revjax._nnx_block`; this module holds :class:`Stack` and re-exports the rest.

State other than parameters and RNG streams (``nnx.BatchNorm`` statistics, caches, counters) is
refused with a ``TypeError``: the reconstruction re-runs every branch, so such state would be
updated twice per step. Use ``nnx.LayerNorm``/``nnx.RMSNorm`` in reversible branches.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from revjax._nnx_block import BRANCHES, check_block, halves, named, reversible
from revjax._nnx_branch import draws_random, pure_branch, stream_template
from revjax._validate import positive_int
from revjax.coupling import Coupling, additive_coupling
from revjax.nnx_state import restore_state, save_state
from revjax.precision import Policy
from revjax.scan import anchor_interval, inverse_scan, plain_scan, reversible_scan

PyTree = Any
Key = Any
Method = Literal["reversible", "backprop", "checkpoint"]

METHODS: tuple[str, ...] = ("reversible", "backprop", "checkpoint")


# --------------------------------------------------------------------------- the stack


class Stack(nnx.Module):
    """``depth`` reversible blocks applied in sequence through :func:`revjax.reversible_scan`.

    ``Stack(block, depth, *args, rngs=rngs, **kwargs)`` builds ``block(*args, rngs=r, **kwargs)``
    ``depth`` times under ``nnx.vmap`` with ``nnx.split_rngs`` (independent initialisations);
    ``self.blocks`` is one block instance whose parameters have a leading axis ``depth``. The
    stack is an ordinary NNX module: ``nnx.jit``, ``nnx.grad``, ``nnx.Optimizer``,
    ``nnx.split``/``nnx.merge`` and :func:`save_state` work on it and on models containing it.

    Attributes (static, settable; ``method`` and ``deterministic`` also through ``nnx.view``):
      method: ``"reversible"`` (default; no stored activations), ``"backprop"`` (plain
        ``lax.scan``, the non-reversible twin with the same parameters and dropout masks) or
        ``"checkpoint"`` (``jax.checkpoint`` per block).
      deterministic: set by ``model.eval()`` / ``model.train()`` (``nnx.view``), or directly.
        ``True`` runs the blocks as ``model.eval()`` would set them: every ``deterministic``
        attribute inside them is ``True`` for the call (dropout off), whatever the layers' own
        flags. ``False`` (the default) leaves each layer's own flag in charge
        (``model.train()`` sets those to ``False`` as well). Randomness not governed by a
        ``deterministic`` attribute (a noise layer, dropout whose mode is given at call time)
        is unaffected. It does not change ``method``: a gradient taken in eval mode
        (fine-tuning without dropout, saliency maps) still stores no per-block activations. A
        forward pass costs the same either way, since ``reversible_scan`` only differs under
        differentiation.
      checkpoint_every, policy: passed to :func:`revjax.reversible_scan` (anchors, precision).

    ``rng_stream`` (constructor argument, default ``"dropout"``) names the stream of ``rngs``
    the stack forks for its own per-call keys (used when a call without ``key=`` draws random
    numbers). The stack's own keywords (``method``, ``checkpoint_every``, ``policy``,
    ``rng_stream``) are not passed on to ``block``: a block argument of one of these names
    needs another name.

    Raises:
      ValueError: ``depth`` is not a positive integer, ``method`` is unknown, a
        ``checkpoint_every`` below 1 or that does not divide ``depth``, an ``rng_stream``
        that ``rngs`` lacks (and no ``"default"`` stream), or, built under a mesh, a
        partitioned size (``nnx.with_partitioning``) its mesh axis does not divide.
      TypeError: ``block`` is not decorated with :func:`reversible`, its state is refused by
        :func:`check_block`, a ``checkpoint_every`` that is not an int, or a ``policy`` that is
        not a :class:`~revjax.precision.Policy`.
    """

    def __init__(
        self,
        block: type,
        depth: int,
        *args: Any,
        rngs: nnx.Rngs,
        method: Method = "reversible",
        checkpoint_every: int | None = None,
        policy: Policy | None = None,
        rng_stream: str = "dropout",
        **kwargs: Any,
    ):
        if not isinstance(block, type):
            raise TypeError(
                f"revjax.nnx.Stack: pass the block class, not an instance: Stack("
                f"{type(block).__name__}, depth, *args, rngs=rngs) builds depth instances "
                "itself, each with its own initialisation"
            )
        if not getattr(block, "__revjax_reversible__", False):
            raise TypeError(
                f"revjax.nnx.Stack: {getattr(block, '__name__', block)!r} is not a reversible "
                "block; decorate the class with @revjax.nnx.reversible"
            )
        depth = positive_int(depth, "depth", f"revjax.nnx.Stack({block.__name__})")
        _check_method(method)
        # Refuse a bad anchor interval now, not at the first call.
        anchor_interval(depth, checkpoint_every, f"revjax.nnx.Stack({block.__name__})")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"revjax.nnx.Stack({block.__name__}): policy must be a revjax.precision.Policy "
                f"or None, got {type(policy).__name__}"
            )

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def build(layer_rngs):
            return block(*args, rngs=layer_rngs, **kwargs)

        try:
            blocks = build(rngs)
        except KeyError as err:  # e.g. nnx.Dropout(rngs=rngs) with no stream of its name
            if "RngStream" in str(err):
                streams = _stream_names(rngs)
                err.add_note(
                    f"revjax.nnx.Stack({block.__name__}): building the blocks asked rngs for a "
                    f"stream it does not have; it has {streams}. Pass rngs=nnx.Rngs(...) with "
                    "the streams the block's layers use (Dropout: 'dropout')."
                )
            raise
        # The class checks each block when its outermost __init__ returns; checking the built
        # stack as well covers a subclass whose own __init__ escaped that wrapping.
        check_block(blocks)
        _check_partitioning(blocks, f"revjax.nnx.Stack({block.__name__})")
        self.blocks = blocks
        self.depth = depth
        self.method = method
        self.checkpoint_every = checkpoint_every
        self.policy = policy
        self.deterministic = False
        has_streams = bool(jax.tree.leaves(nnx.state(self.blocks, nnx.RngState)))
        self.rngs = _fork_stream(rngs, rng_stream, block.__name__) if has_streams else None

    def set_view(self, deterministic: bool | None = None, method: Method | None = None) -> None:
        """Used by ``nnx.view(model, deterministic=..., method=...)``."""
        if deterministic is not None:
            self.deterministic = deterministic
        if method is not None:
            _check_method(method)
            self.method = method

    def coupling(self) -> tuple[Coupling, PyTree]:
        """The stack as pure JAX: ``(block, params)`` for :func:`revjax.reversible_scan`.

        ``block`` is an additive coupling whose branches merge fresh copies of ``f`` and ``g``
        (in the mode :attr:`deterministic` selects, as :meth:`__call__` runs them);
        ``params = (params_f, params_g)`` are the branches' ``nnx.Param`` states, leading axis
        L. The branches take the scan's per-layer key (``reversible_scan(block, params, x,
        key=key)``, :func:`revjax.diagnostics.reconstruction_report` likewise). Without a key
        they run whenever their output does not depend on their RNG streams (eval mode,
        dropout rate 0, no random layers) and ignore the streams.

        Raises:
          TypeError: state other than parameters and RNG streams in the blocks.
          ValueError: (when the returned block is called) a branch that draws random numbers
            (:func:`draws_random`) is called without a key, naming the stack and the branch.
        """
        return self._coupling(self.deterministic)

    def _coupling(self, deterministic: bool) -> tuple[Coupling, PyTree]:
        """:meth:`coupling` with the blocks' dropout forced off (``deterministic=True``, as
        ``model.eval()`` sets it) or left to the layers' own flags (``False``)."""
        blocks = self.blocks
        if deterministic:
            blocks = nnx.with_attributes(blocks, deterministic=True, raise_if_not_found=False)
        owner = f"Stack({type(self.blocks).__name__})"
        branches, params = [], []
        for name in BRANCHES:
            module = getattr(blocks, name)
            graphdef, p, streams, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
            if jax.tree.leaves(rest):
                paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
                raise TypeError(
                    f"{owner}.{name}: state other than nnx.Param and RNG streams appeared after "
                    f"construction at {paths[:5]}; reversible branches cannot carry it through "
                    "the reconstruction"
                )
            template = stream_template(streams) if jax.tree.leaves(streams) else None
            branches.append(pure_branch(graphdef, template, rest, f"branch {name}", owner))
            params.append(p)
        return additive_coupling(*branches), tuple(params)

    def __call__(
        self, x: tuple[jax.Array, jax.Array], *, key: Key | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Applies the blocks to ``x = (x1, x2)`` and returns ``(y1, y2)``.

        ``key`` (optional) fixes the dropout masks and any other random draw; without it,
        and only when the blocks draw random numbers (:func:`draws_random`), the stack draws
        one from its own RNG stream. Pass the same key to :meth:`inverse` to invert a
        stochastic forward. With :attr:`deterministic` set, dropout is off.
        """
        x = halves(x, f"Stack({type(self.blocks).__name__})")
        _check_method(self.method)
        block, params = self.coupling()
        if key is None and self.rngs is not None:
            # Draw (and advance the stream) only when the output depends on it; blocks that
            # draw nothing still need stream values to merge, and ignore them.
            # Traced here first: a wrong branch shape must name the stack here too.
            with named(f"Stack({type(self.blocks).__name__})"):
                draws = draws_random(block, params, x)
            key = self.rngs() if draws else jax.random.key(0)
        options = dict(key=key, policy=self.policy)
        with named(f"Stack({type(self.blocks).__name__})"):
            if self.method == "backprop":
                return plain_scan(block, params, x, **options)
            if self.method == "checkpoint":
                return plain_scan(block, params, x, remat=True, **options)
            return reversible_scan(
                block, params, x, checkpoint_every=self.checkpoint_every, **options
            )

    def inverse(
        self, y: tuple[jax.Array, jax.Array], *, key: Key | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``x`` with ``self(x, key=key) == y`` (up to round-off).

        Raises:
          ValueError: the blocks draw random numbers (:func:`draws_random`: active dropout,
            noise) and no ``key`` is given (the draws of the forward pass cannot be known);
            the message suggests ``model.eval()`` only where eval mode would stop the draws.
        """
        y = halves(y, f"Stack({type(self.blocks).__name__})")
        block, params = self.coupling()
        if key is None and self.rngs is not None:
            where = f"Stack({type(self.blocks).__name__}).inverse"
            with named(where):  # traced here first: errors name the stack here too
                draws = draws_random(block, params, y)
                quiet_draws = draws and draws_random(*self._coupling(True), y)
            if draws:
                if not self.deterministic and not quiet_draws:
                    hint = ", or call model.eval() first (dropout off)"
                else:  # eval mode does not govern these draws (e.g. a noise layer)
                    hint = (
                        " (they draw even in eval mode, e.g. a noise layer, so only the key "
                        "can replay them)"
                    )
                raise ValueError(
                    f"Stack({type(self.blocks).__name__}).inverse: the blocks have active "
                    f"dropout or other random draws; pass the key= given to the forward call{hint}"
                )
            key = jax.random.key(0)  # unused: deterministic blocks ignore their streams
        with named(f"Stack({type(self.blocks).__name__}).inverse"):
            return inverse_scan(block, params, y, key=key, policy=self.policy)


def _stream_names(rngs: nnx.Rngs) -> list[str]:
    """The names of the streams ``rngs`` holds, sorted (for error messages)."""
    return sorted(k for k, v in vars(rngs).items() if isinstance(v, nnx.RngStream))


def _fork_stream(rngs: nnx.Rngs, name: str, block: str) -> nnx.RngStream:
    """``rngs[name].fork()``, or a ``ValueError`` listing the streams there are."""
    try:
        return rngs[name].fork()
    except KeyError as err:
        streams = _stream_names(rngs)
        raise ValueError(
            f"revjax.nnx.Stack({block}): rngs has no stream {name!r} (and no 'default') for "
            f"the stack's per-call keys; it has {streams}: pass rng_stream= naming one, e.g. "
            "the stream your Dropout layers use"
        ) from err


def _check_partitioning(blocks: nnx.Module, where: str) -> None:
    """Under a mesh (``jax.set_mesh``), refuses a variable whose partitioning metadata
    (``nnx.with_partitioning``) names a mesh axis that does not divide the array's size along
    it: ``nnx.vmap`` would leave it silently replicated on every device, where the same layer
    built outside a stack raises JAX's ``IndivisibleError``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return
    state = nnx.state(blocks)
    specs = nnx.to_flat_state(nnx.get_partition_spec(state))
    for (path, spec), (_, var) in zip(specs, nnx.to_flat_state(state), strict=True):
        spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
        shape = jnp.shape(var.get_value() if isinstance(var, nnx.Variable) else var)
        for axis, names in enumerate(spec or ()):
            if names is jax.sharding.PartitionSpec.UNCONSTRAINED:
                continue  # left to XLA: nothing to divide
            names = (names,) if isinstance(names, str) else tuple(names or ())
            size = math.prod(mesh.shape.get(n, 1) for n in names)
            if axis < len(shape) and shape[axis] % size:
                raise ValueError(
                    f"{where}: {'.'.join(map(str, path))} of shape {tuple(shape)} is partitioned "
                    f"{spec}, but its axis {axis} ({shape[axis]}) is not divisible by mesh axis "
                    f"{names if len(names) > 1 else names[0]!r} of size {size}; the stack would "
                    "hold it replicated on every device. Use sizes the mesh axis divides"
                )


def _check_method(method: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"revjax.nnx.Stack: method must be one of {METHODS}, got {method!r}")


__all__ = [
    "Stack",
    "check_block",
    "draws_random",
    "restore_state",
    "reversible",
    "save_state",
]
