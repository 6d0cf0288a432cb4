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

Functional core. Inside the scan nothing is stateful: ``nnx.split`` separates each branch into a
graph definition, its ``nnx.Param`` state (the scanned, differentiated parameters) and its RNG
streams. Layer ``l``'s branch is a pure function ``(params_l, x_half, key) -> out`` that merges
a fresh copy of the module, reseeds every RNG stream in it from the explicit key, and calls it.
The key of stream ``i`` (in ``nnx.iter_graph`` order) of branch ``f`` in layer ``l`` is

    fold_in(k_f, i),   (k_f, k_g) = jax.random.split(fold_in(key, l))

in the forward pass and again in the reconstruction, so dropout masks are replayed exactly and
no module's mutable RNG counter is read or advanced inside the scan. The per-call ``key`` comes
from the ``key=`` argument, or else from the stack's own RNG stream (advanced once per call,
outside the scan, like ``nnx.Dropout``'s own stream) whenever the blocks' output depends on
their streams (:func:`draws_random`: dropout in training mode, noise layers, stochastic depth;
found from the traced computation, not from module attributes).

State other than parameters and RNG streams (``nnx.BatchNorm`` statistics, caches, counters) is
refused with a ``TypeError``: the reconstruction re-runs every branch, so such state would be
updated twice per step. Use ``nnx.LayerNorm``/``nnx.RMSNorm`` in reversible branches.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Literal

import jax
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from revjax._validate import positive_int
from revjax.coupling import Coupling, additive_coupling
from revjax.nnx_state import restore_state, save_state
from revjax.precision import Policy
from revjax.scan import anchor_interval, inverse_scan, plain_scan, reversible_scan

PyTree = Any
Key = Any
Method = Literal["reversible", "backprop", "checkpoint"]

METHODS: tuple[str, ...] = ("reversible", "backprop", "checkpoint")
BRANCHES: tuple[str, ...] = ("f", "g")
ALLOWED_STATE: tuple[type, ...] = (nnx.Param, nnx.RngState)


# --------------------------------------------------------------------------- the decorator


def reversible(cls: type) -> type:
    """Class decorator: an ``nnx.Module`` with branches ``f`` and ``g`` becomes a coupling block.

    The class's ``__init__`` must set ``self.f`` and ``self.g`` (``nnx.Module`` instances
    mapping one array to an array shaped like it: attention, MLP, conv, norms, dropout,
    ``nnx.Sequential``) and nothing else that holds state. The decorator adds

    * ``__call__(x)``: ``x = (x1, x2) -> (y1, y2)``, ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``
      (the additive coupling :class:`Stack` runs: branch outputs cast to the half's dtype,
      their shapes checked, pytree halves accepted; its errors start with the class name);
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
    :class:`Stack`'s (branch outputs cast to the half's dtype, shapes checked, pytree halves),
    so one block runs the operations a stack of it runs (eager rounding may differ from the
    compiled scan's fusion by an ulp in low precision)."""
    return additive_coupling(lambda _, h: self.f(h), lambda _, h: self.g(h))


def _block_forward(self, x: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    name = type(self).__name__
    x = _halves(x, name)
    with _named(name):
        return tuple(_block_coupling(self).forward((None, None), x))


def _block_inverse(self, y: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    name = type(self).__name__
    y1, y2 = _halves(y, name)
    # g runs at y1 and f at x2, which has y2's shape.
    if _branch_draws_random(self.g, y1) or _branch_draws_random(self.f, y2):
        quiet = nnx.with_attributes(self, deterministic=True, raise_if_not_found=False)
        if _branch_draws_random(quiet.g, y1) or _branch_draws_random(quiet.f, y2):
            advice = ", even in eval mode (e.g. a noise layer); use"  # .eval() would not help
        else:
            advice = "; call .eval() first (dropout off), or use"
        raise ValueError(
            f"{name}.inverse: the block has active dropout or other random draws, which come "
            f"from its RNG counter and cannot be replayed here{advice} revjax.nnx.Stack with "
            "key= for a stochastic forward that can be inverted"
        )
    with _named(f"{name}.inverse"):
        return tuple(_block_coupling(self).inverse((None, None), (y1, y2)))


def _halves(x: Any, name: str) -> tuple[Any, Any]:
    if not (isinstance(x, tuple | list) and len(x) == 2):
        raise ValueError(
            f"{name}: a reversible block takes a pair (x1, x2), got {type(x).__name__}"
        )
    return x[0], x[1]


def draws_random(block: Coupling, params: PyTree, x: PyTree) -> bool:
    """Whether one layer of ``block`` (params with a leading layer axis) at stream ``x`` has an
    output that depends on its key, i.e. whether its branches draw random numbers.

    Decided on the traced computation of layer 0 by backward liveness: an equation is live if
    one of its outputs is, and then all its inputs are (a live nested computation counts as
    using all of its inputs, so the answer errs towards True). It sees any use of the
    streams: dropout, noise layers, stochastic depth, dropout whose mode is given at call
    time.
    """
    layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    closed = jax.make_jaxpr(lambda k, p, h: block.forward(p, h, k))(
        jax.random.key(0), layer, shapes
    )
    return _output_uses_first_input(closed.jaxpr)


def _output_uses_first_input(jaxpr: Any) -> bool:
    """Backward liveness on a jaxpr: whether its first input reaches an output (errs towards
    True: a live equation counts as using all its inputs)."""
    variable = lambda v: isinstance(v, jax.extend.core.Var)
    live = {v for v in jaxpr.outvars if variable(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if variable(v))
    return jaxpr.invars[0] in live


def _branch_draws_random(branch: nnx.Module, h: jax.Array) -> bool:
    """Whether one (unstacked) branch's output at ``h`` depends on its RNG streams: the
    branch is traced with its streams rebuilt from a key, as :class:`Stack` runs it."""
    graphdef, params, streams, rest = nnx.split(branch, nnx.Param, nnx.RngState, ...)
    if not jax.tree.leaves(streams):
        return False
    pure = _pure_branch(graphdef, _stream_template(streams, stacked=False), rest, "the branch")
    return _depends_on_key(pure, params, h)


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


# --------------------------------------------------------------------------- the pure branches


def _stream_template(
    rng_state: nnx.State, stacked: bool = True
) -> tuple[Any, list[tuple[tuple[int, ...], Any, bool]]]:
    """Static description of one layer's RNG state: treedef and (shape, dtype, is_key) per leaf.

    A ``stacked`` ``rng_state`` has a leading layer axis, which the per-layer shapes drop.
    """
    leaves, treedef = jax.tree.flatten(rng_state)
    skip = 1 if stacked else 0
    spec = [
        (tuple(leaf.shape[skip:]), leaf.dtype, jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key))
        for leaf in leaves
    ]
    return treedef, spec


def _fresh_streams(template: tuple[Any, list], key: Key) -> nnx.State:
    """One layer's RNG state rebuilt from ``key``: stream ``i`` gets ``fold_in(key, i)``, count
    0."""
    treedef, spec = template
    leaves, stream = [], 0
    for shape, dtype, is_key in spec:
        if is_key:
            leaves.append(jax.random.fold_in(key, stream))
            stream += 1
        else:
            leaves.append(jnp.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, leaves)


def _pure_branch(
    graphdef: nnx.GraphDef,
    template: tuple[Any, list] | None,
    rest: nnx.State,
    where: str,
    owner: str = "the branch",
):
    """The branch as a pure function ``(params, h[, key]) -> out`` of one layer's parameters.

    ``rest`` is the array-free remainder of the branch's state (e.g. the empty capture slots
    ``nnx.capture`` adds); it is merged back unchanged. A call that leaves new state in the
    branch (``sow``, ``perturb``) raises ``TypeError`` naming ``where``: such values are created
    inside the scan and could only escape it as leaked tracers. A branch with RNG streams
    called without a key runs if its output does not depend on them (eval mode, rate 0),
    and otherwise raises ``ValueError`` naming ``owner``: its draws could not be replayed."""

    def branch(params: nnx.State, h: jax.Array, key: Key | None = None) -> jax.Array:
        if template is None:
            module = nnx.merge(graphdef, params, rest)
        else:
            if key is None:
                if _depends_on_key(branch, params, h):
                    raise ValueError(
                        f"{owner}: {where} draws random numbers (active dropout, noise) and "
                        "was called without a key, so its draws could not be replayed; pass "
                        "key= (e.g. reversible_scan(block, params, x, key=key)) and the same "
                        "key to inverse_scan"
                    )
                key = jax.random.key(0)  # never used: the output does not depend on it
            module = nnx.merge(graphdef, params, _fresh_streams(template, key), rest)
        out = module(h)
        created = [
            (".".join(map(str, path)), type(leaf).__name__)
            for path, leaf in nnx.to_flat_state(nnx.state(module))
            if not isinstance(leaf, ALLOWED_STATE) and jax.tree.leaves(leaf)
        ]
        if created:
            raise TypeError(
                f"{where} created state while running ({created[:3]}), e.g. by "
                "sow() or perturb() (nnx.capture); values made inside the scan cannot leave it. "
                "Return what you need to inspect, or run the block outside the stack"
            )
        return out

    return branch


def _depends_on_key(branch: Any, params: PyTree, h: PyTree) -> bool:
    """Whether ``branch(params, h, key)`` depends on ``key``, traced on shapes only (so it
    can be asked inside another trace, of ``params`` and ``h`` that are tracers)."""
    shape = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    closed = jax.make_jaxpr(lambda k, p, x: branch(p, x, k))(
        jax.random.key(0), jax.tree.map(shape, params), jax.tree.map(shape, h)
    )
    return _output_uses_first_input(closed.jaxpr)


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
        ``checkpoint_every`` below 1 or that does not divide ``depth``, or an ``rng_stream``
        that ``rngs`` lacks (and no ``"default"`` stream).
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
            template = _stream_template(streams) if jax.tree.leaves(streams) else None
            branches.append(_pure_branch(graphdef, template, rest, f"branch {name}", owner))
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
        x = _halves(x, f"Stack({type(self.blocks).__name__})")
        _check_method(self.method)
        block, params = self.coupling()
        if key is None and self.rngs is not None:
            # Draw (and advance the stream) only when the output depends on it; blocks that
            # draw nothing still need stream values to merge, and ignore them.
            key = self.rngs() if draws_random(block, params, x) else jax.random.key(0)
        options = dict(key=key, policy=self.policy)
        with _named(f"Stack({type(self.blocks).__name__})"):
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
        y = _halves(y, f"Stack({type(self.blocks).__name__})")
        block, params = self.coupling()
        if key is None and self.rngs is not None:
            if draws_random(block, params, y):
                if not self.deterministic and not draws_random(*self._coupling(True), y):
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
        with _named(f"Stack({type(self.blocks).__name__}).inverse"):
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


@contextlib.contextmanager
def _named(where: str):
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
