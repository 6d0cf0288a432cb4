"""Flax NNX branches as pure functions of their parameters, with RNG streams from a key.

Inside :func:`revjax.reversible_scan` nothing may be stateful. ``nnx.split`` separates a
branch into a graph definition, its ``nnx.Param`` state (the scanned, differentiated
parameters) and its RNG streams; :func:`pure_branch` turns that into a pure function
``(params_l, x_half, key) -> out`` that merges a fresh copy of the module, reseeds every RNG
stream in it from the explicit key (stream ``i`` in ``nnx.iter_graph`` order gets
``fold_in(key, i)``, count 0), and calls it. Called with the same key in the forward pass and in
the reconstruction, it replays dropout masks exactly, and no module's mutable RNG counter is
read or advanced inside the scan.

Whether a branch's output depends on its key (dropout in training mode, noise layers,
stochastic depth) is read off the traced computation by backward liveness
(:func:`draws_random`), not from module attributes. Internal to :mod:`revjax.nnx`, which
re-exports :func:`draws_random`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from revjax.coupling import Coupling

PyTree = Any
Key = Any

# The state a reversible branch may hold: anything else would be updated twice per step.
ALLOWED_STATE: tuple[type, ...] = (nnx.Param, nnx.RngState)


def stream_template(
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
    0. A stream with its own axes (sub-layers made by ``nnx.vmap`` under ``nnx.split_rngs``, one
    key each) gets that many independent keys split from it, in its shape."""
    treedef, spec = template
    leaves, stream = [], 0
    for shape, dtype, is_key in spec:
        if is_key:
            one = jax.random.fold_in(key, stream)
            size = math.prod(shape)
            leaves.append(one if not shape else jax.random.split(one, size).reshape(shape))
            stream += 1
        else:
            leaves.append(jnp.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, leaves)


def pure_branch(
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
        # Taken before the call: under a trace merge shares the Variables, so a write would
        # show in params too. Arrays are compared by identity: an unwritten Param keeps its.
        given = {path: jax.tree.leaves(v) for path, v in nnx.to_flat_state(params)}
        if template is None:
            module = nnx.merge(graphdef, params, rest)
        else:
            if key is None:
                if depends_on_key(branch, params, h):
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
        written = [
            ".".join(map(str, path))
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
            if path in given
            and any(a is not b for a, b in zip(jax.tree.leaves(v), given[path], strict=False))
        ]
        # A Flax transform inside the branch (nnx.remat, nnx.jit) hands the state back as
        # new values that merely pass the old ones through: traced again to tell them apart.
        if written and not _params_written(graphdef, template, rest, params, h, key):
            written = []
        if written:
            raise TypeError(
                f"{where} wrote to its parameters while running ({written[:3]}); a reversible "
                "branch is a pure function of its parameters (it runs again to reconstruct, and "
                "the write could not be kept), so compute the value and return it instead, or "
                "keep it in an optimizer or outside the stack"
            )
        return out

    return branch


def _params_written(
    graphdef: nnx.GraphDef,
    template: tuple[Any, list] | None,
    rest: nnx.State,
    params: nnx.State,
    h: PyTree,
    key: Key | None,
) -> bool:
    """Whether calling the branch changes a parameter: traced on shapes, each parameter after
    the call must be its input, possibly passed through nested computations (the outputs of
    ``nnx.remat``/``nnx.jit`` that return their input unchanged); anything else is a write."""

    def parameters_after(p, h_, k):
        streams = () if template is None else (_fresh_streams(template, k),)
        module = nnx.merge(graphdef, p, *streams, rest)
        module(h_)
        return nnx.state(module, nnx.Param)

    shape = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    inputs = jax.tree.map(shape, (params, h, key))
    closed, after = jax.make_jaxpr(parameters_after, return_shape=True)(*inputs)
    before = jax.tree_util.tree_flatten_with_path(params)[0]
    position = {jax.tree_util.keystr(path): i for i, (path, _) in enumerate(before)}
    jaxpr = closed.jaxpr
    for out, (path, _) in zip(
        jaxpr.outvars, jax.tree_util.tree_flatten_with_path(after)[0], strict=True
    ):
        expected = position.get(jax.tree_util.keystr(path))
        if expected is None or _input_index(jaxpr, out) != expected:
            return True
    return False


def _input_index(jaxpr: Any, var: Any) -> int | None:
    """The position of the input of ``jaxpr`` that ``var`` equals, following outputs of nested
    calls (``pjit``, ``remat``, ``closed_call``) that return one of their inputs unchanged;
    None when ``var`` is computed."""
    if not isinstance(var, jax.extend.core.Var):
        return None
    for i, v in enumerate(jaxpr.invars):
        if v is var:
            return i
    for eqn in jaxpr.eqns:
        if not any(v is var for v in eqn.outvars):
            continue
        inner = _nested_call(eqn)
        if inner is None:
            return None
        position = next(i for i, v in enumerate(eqn.outvars) if v is var)
        through = _input_index(inner, inner.outvars[position])
        return None if through is None else _input_index(jaxpr, eqn.invars[through])
    return None


def _nested_call(eqn: Any) -> Any:
    """The jaxpr an equation calls with its own inputs and outputs one to one, if any."""
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's, or an open Jaxpr
        if (
            isinstance(inner, jax.extend.core.Jaxpr)
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
        ):
            return inner
    return None


def depends_on_key(branch: Any, params: PyTree, h: PyTree) -> bool:
    """Whether ``branch(params, h, key)`` depends on ``key``, traced on shapes only (so it
    can be asked inside another trace, of ``params`` and ``h`` that are tracers)."""
    shape = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    closed = jax.make_jaxpr(lambda k, p, x: branch(p, x, k))(
        jax.random.key(0), jax.tree.map(shape, params), jax.tree.map(shape, h)
    )
    return output_uses_first_input(closed.jaxpr)


def draws_random(block: Coupling, params: PyTree, x: PyTree) -> bool:
    """Whether one layer of ``block`` (params with a leading layer axis) at stream ``x`` has an
    output that depends on its key, i.e. whether its branches draw random numbers.

    Decided on the traced computation of layer 0 by JAX's dead-code elimination, which looks
    inside nested computations (``nnx.cond``, ``nnx.scan``, ``nnx.remat``, ``jax.jit``): a
    branch whose dropout sits inside one is deterministic in eval mode. It sees any use of
    the streams: dropout, noise layers, stochastic depth, dropout whose mode is given at
    call time.
    """
    layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    closed = jax.make_jaxpr(lambda k, p, h: block.forward(p, h, k))(
        jax.random.key(0), layer, shapes
    )
    return output_uses_first_input(closed.jaxpr)


def output_uses_first_input(jaxpr: Any) -> bool:
    """Whether a jaxpr's first input reaches an output: by JAX's ``dce_jaxpr``, which follows
    the use of each input into nested jaxprs (a ``cond`` whose branches ignore it does not
    use it). Where that internal function is missing, a flat backward liveness pass, which
    errs towards True (a live equation counts as using all its inputs)."""
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr
    except ImportError:  # pragma: no cover - depends on the JAX version
        dce_jaxpr = None
    if dce_jaxpr is not None:
        _, used_inputs = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
        return bool(used_inputs[0])
    variable = lambda v: isinstance(v, jax.extend.core.Var)
    live = {v for v in jaxpr.outvars if variable(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if variable(v))
    return jaxpr.invars[0] in live


def branch_draws_random(branch: nnx.Module, h: jax.Array) -> bool:
    """Whether one (unstacked) branch's output at ``h`` depends on its RNG streams: the
    branch is traced with its streams rebuilt from a key, as :class:`revjax.nnx.Stack` runs
    it."""
    graphdef, params, streams, rest = nnx.split(branch, nnx.Param, nnx.RngState, ...)
    if not jax.tree.leaves(streams):
        return False
    pure = pure_branch(graphdef, stream_template(streams, stacked=False), rest, "the branch")
    return depends_on_key(pure, params, h)


__all__ = [
    "ALLOWED_STATE",
    "branch_draws_random",
    "depends_on_key",
    "draws_random",
    "pure_branch",
    "stream_template",
]
