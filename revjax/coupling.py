"""Reversible blocks as pairs of pure functions.

A :class:`Coupling` is the unit that :func:`revjax.reversible_scan` stacks. It is a pair of pure
functions ``forward(params, x) -> y`` and ``inverse(params, y) -> x`` with ``x`` and ``y`` pytrees
of the same structure, shapes and dtypes, plus optional fields:

* ``backward(params, y, y_bar) -> (x, x_bar, params_bar)``: a *fused* reconstruct-and-vjp step.
  Given a layer's output and its cotangent it returns the layer's input, the input cotangent and
  the parameter cotangent. Couplings built here provide one that evaluates each sub-function once;
  blocks without one get :func:`reconstruct_and_vjp`'s generic "invert, then ``jax.vjp``" path.
* ``log_det(params, x) -> scalar``: ``log|det dy/dx|`` summed over every element of ``x``. For a
  per-example value (normalising flows) ``jax.vmap`` it over the batch, except through
  ``layers.batch_norm``, whose batch statistics couple the examples (under ``vmap`` each
  example would use its own): with the statistics held fixed every example's is
  ``log_det / N``.
* ``log_det_backward(params, y, y_bar, log_det_bar) -> (x, x_bar, params_bar)``: ``backward``
  for the pair ``(forward, log_det)``: the cotangents also carry ``log_det_bar`` times the
  gradient of ``log_det`` at the reconstructed input. This is what
  ``reversible_scan(..., return_log_det=True)`` steps with; the Feistel couplings here provide
  one that adds the log-det term to their branch cotangents before each branch's pullback, so
  it costs no extra branch evaluation. Blocks with a ``log_det`` but without one get
  :func:`reconstruct_and_vjp_with_log_det`'s generic path (one more ``jax.vjp``, of
  ``log_det``).
* ``vijp_step(params, x, x_bar) -> (y, y_bar, params_bar)``: the Moonwalk step
  (:mod:`revjax.moonwalk`). Given a layer's input and its input cotangent ``x_bar``, returns the
  output, the output cotangent ``y_bar`` solving ``y_bar J = x_bar`` (``J = dy/dx``; the
  vector-inverse-Jacobian product) and the parameter cotangent ``y_bar dy/dparams``. Couplings
  built here provide one that evaluates each branch once; see ``_feistel_coupling``.
* ``aux(params, x) -> side``: side information the inverse needs but cannot recompute from the
  output, such as a batch norm's batch statistics. :func:`revjax.reversible_scan` stores it per
  layer (small: ``O(L C)``) in the forward pass and passes it back as ``inverse(params, y,
  aux=side)`` and ``backward(params, y, y_bar, aux=side)``; ``forward`` recomputes it from ``x``,
  so the vjp differentiates through it.
* ``map_branches(wrap) -> Coupling``: the same coupling rebuilt with every residual branch ``fn``
  replaced by ``wrap(fn, kind)`` (``kind`` is ``"additive"`` or ``"affine"``). This is how a
  precision policy (:mod:`revjax.precision`) reaches inside f and g to cast their inputs or put
  their outputs on a fixed-point grid. Hand-written couplings have none.

Randomness (dropout) is threaded explicitly: when a caller has a PRNG key it calls
``forward(params, x, key)`` (likewise ``inverse``, ``backward``, ``log_det``), and the couplings
here split it between their sub-functions, calling ``f(params_f, x_half, key_f)``. Without a key
every function is called without one, so key-free user functions never need a ``key`` argument.

Feistel couplings split the stream into two halves ``x = (x1, x2)`` (each half any pytree) and
update one half from the other with an elementwise invertible *combine* rule:

    y1 = combine(x1, F(x2)),        y2 = combine(x2, G(y1))
    x2 = uncombine(y2, G(y1)),      x1 = uncombine(y1, F(x2))

``additive_coupling`` uses ``combine(a, d) = a + d`` (RevNet, Gomez et al. 2017);
``affine_coupling`` uses ``combine(a, (s, t)) = a * exp(s) + t`` (Real NVP, Dinh et al. 2017).
F and G themselves need not be invertible.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Key = Any
# wrap(branch, kind) -> branch, kind in {"additive", "affine"}; see Coupling.map_branches.
BranchWrapper = Callable[[Callable[..., Any], str], Callable[..., Any]]


class Coupling(NamedTuple):
    """A reversible block: ``forward(params, x) -> y`` and ``inverse(params, y) -> x``.

    ``backward`` (optional) is a fused ``(params, y, y_bar) -> (x, x_bar, params_bar)`` step,
    ``log_det`` (optional) returns ``log|det dy/dx|``, ``map_branches`` (optional) rebuilds the
    coupling with wrapped branches, ``vijp_step`` (optional) is the Moonwalk forward step
    ``(params, x, x_bar) -> (y, y_bar, params_bar)``, ``aux`` (optional) ``(params, x) ->
    side`` is side information the inverse needs (batch statistics), which ``reversible_scan``
    stores per layer and passes as ``inverse(..., aux=side)``, and ``log_det_backward``
    (optional) is ``backward`` with the cotangent of ``log_det`` too, ``(params, y, y_bar,
    log_det_bar) -> (x, x_bar, params_bar)``; see the module docstring.
    """

    forward: Callable[..., PyTree]
    inverse: Callable[..., PyTree]
    backward: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    log_det: Callable[..., jax.Array] | None = None
    map_branches: Callable[[BranchWrapper], Coupling] | None = None
    vijp_step: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None
    aux: Callable[..., PyTree] | None = None
    log_det_backward: Callable[..., tuple[PyTree, PyTree, PyTree]] | None = None


def call_with_key(fn: Callable[..., Any], *args: Any, key: Key | None) -> Any:
    """Calls ``fn(*args)`` or, when ``key`` is not None, ``fn(*args, key)``."""
    return fn(*args) if key is None else fn(*args, key)


def split_key(key: Key | None, num: int) -> list[Key | None]:
    """``num`` independent keys from ``key``; ``num`` Nones when ``key`` is None."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


def with_aux(fn: Callable[..., Any], block: Coupling, aux: PyTree) -> Callable[..., Any]:
    """``fn`` with ``aux=aux`` bound when ``block`` has side information, else ``fn``."""
    return fn if block.aux is None else functools.partial(fn, aux=aux)


def reconstruct_and_vjp(block: Coupling) -> Callable[..., tuple[PyTree, PyTree, PyTree]]:
    """The block's backward step ``(params, y, y_bar[, key][, aux=]) -> (x, x_bar, params_bar)``.

    Uses the block's fused ``backward`` when it has one. Otherwise reconstructs
    ``x = inverse(params, y)`` and pulls ``y_bar`` back through ``jax.vjp`` of ``forward`` at
    ``(params, x)``, which evaluates ``forward`` once more than a fused step would. A block with
    ``aux`` receives its stored side information as ``aux=``.
    """
    if block.backward is not None:
        return block.backward

    def generic_backward(params, y, y_bar, key=None, aux=None):
        x = call_with_key(with_aux(block.inverse, block, aux), params, y, key=key)
        _, pullback = jax.vjp(lambda p, x_: call_with_key(block.forward, p, x_, key=key), params, x)
        params_bar, x_bar = pullback(y_bar)
        return x, x_bar, params_bar

    return generic_backward


def add_cotangents(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf by leaf, in ``a``'s dtypes; ``float0`` leaves (the cotangents of integer
    inputs) stay as they are."""
    return jax.tree.map(
        lambda u, v: u if u.dtype == jax.dtypes.float0 else u + v.astype(u.dtype), a, b
    )


def reconstruct_and_vjp_with_log_det(block: Coupling) -> Callable[..., tuple]:
    """The backward step of ``(forward, log_det)``: ``(params, y, y_bar, log_det_bar[, key][,
    aux=]) -> (x, x_bar, params_bar)``, the cotangents being those of ``<y_bar, forward(params,
    x)> + log_det_bar * log_det(params, x)``.

    Uses the block's ``log_det_backward`` when it has one. Otherwise takes
    :func:`reconstruct_and_vjp`'s step and adds the pullback of ``log_det_bar`` through
    ``jax.vjp`` of ``log_det`` at the reconstructed ``x``.

    Raises:
      ValueError: the block has no ``log_det``.
    """
    if block.log_det_backward is not None:
        return block.log_det_backward
    if block.log_det is None:
        raise ValueError(
            "this Coupling has no log_det, so the log-determinant of a stack of it is undefined "
            "(a sequence has one only when every block does; give a hand-written Coupling a "
            "log_det field)"
        )
    step = reconstruct_and_vjp(block)

    def generic_log_det_backward(params, y, y_bar, log_det_bar, key=None, aux=None):
        x, x_bar, params_bar = call_with_key(with_aux(step, block, aux), params, y, y_bar, key=key)
        log_det = lambda p, x_: call_with_key(block.log_det, p, x_, key=key)
        value, pullback = jax.vjp(log_det, params, x)  # value may be a Python float
        params_ld, x_ld = pullback(jnp.asarray(log_det_bar, jnp.result_type(value)))
        return x, add_cotangents(x_bar, x_ld), add_cotangents(params_bar, params_ld)

    return generic_log_det_backward


# --------------------------------------------------------------------------------------------
# Shape checks shared by the Feistel couplings.


def _describe(tree: PyTree) -> str:
    return str(jax.tree.map(lambda a: f"{jnp.shape(a)}", tree))


def _abridged(text: str, limit: int = 400) -> str:
    """``text``, cut to ``limit`` characters with a count of the rest (a Flax module's
    parameter tree would otherwise fill the screen)."""
    return (
        text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"
    )


def _type_name(value: Any) -> str:
    """``"array"`` for any JAX/NumPy array (a tracer under jit included), else the type's name."""
    return "array" if isinstance(value, jax.Array | np.ndarray) else type(value).__name__


def _check_like(name: str, half_name: str, out: PyTree, half: PyTree) -> None:
    """Raises unless ``out`` has exactly the structure and leaf shapes of ``half``.

    Broadcasting is not allowed: ``x1 + f(x2)`` with a broadcastable but smaller ``f(x2)`` would
    silently produce a block that no longer matches the network the user wrote.
    """
    out_def, half_def = jax.tree.structure(out), jax.tree.structure(half)
    if out_def != half_def:
        raise ValueError(
            f"{name} must return a pytree shaped like {half_name}: expected structure "
            f"{half_def}, got {out_def}"
        )
    for o, h in zip(jax.tree.leaves(out), jax.tree.leaves(half), strict=True):
        if jnp.shape(o) != jnp.shape(h):
            raise ValueError(
                f"{name} must return an array shaped like {half_name}: expected "
                f"{_describe(half)}, got {_describe(out)}"
            )
        complex_out = jnp.issubdtype(jnp.result_type(o), jnp.complexfloating)
        if complex_out and not jnp.issubdtype(jnp.result_type(h), jnp.complexfloating):
            raise TypeError(
                f"{name} returned {jnp.result_type(o)} for the real {jnp.result_type(h)} half "
                f"{half_name}; casting it into the stream would drop the imaginary part"
            )


def _split_halves(x: PyTree, where: str) -> tuple[PyTree, PyTree]:
    # Exactly a tuple: the output is a tuple, and a scan's carry (and a custom_vjp's cotangent)
    # must keep the input's pytree type, so a list or NamedTuple would fail later, obscurely.
    if not (type(x) is tuple and len(x) == 2):
        raise TypeError(
            f"{where}: a Feistel coupling acts on a tuple of two halves (x1, x2); got "
            f"{_type_name(x)} {_describe(x)}"
            + ("; pass tuple(x)" if isinstance(x, tuple | list) and len(x) == 2 else "")
        )
    return x[0], x[1]


def _split_params(params: PyTree, where: str) -> tuple[PyTree, PyTree]:
    if not (isinstance(params, tuple | list) and len(params) == 2):
        raise TypeError(
            f"{where}: params must be a pair (params_f, params_g), one per branch; got "
            f"{_type_name(params)} {_describe(params)}"
        )
    return params[0], params[1]


# --------------------------------------------------------------------------------------------
# Combine rules: elementwise invertible updates of one half by a function of the other.


class _CombineRule(NamedTuple):
    """``combine(a, d)``, its inverse, its vjp, and the inverse of its vjp in ``a``.

    ``vjp(y, d, y_bar) -> (a_bar, d_bar)`` is the pullback of ``combine`` written in terms of its
    *output* ``y`` (so the backward pass never needs ``a``); ``solve(d, a_bar) -> y_bar`` inverts
    its ``a`` part (``a_bar = y_bar da y``, an elementwise invertible map); ``log_det(d)`` is
    ``log|det da y|``.
    """

    combine: Callable[[PyTree, Any], PyTree]
    uncombine: Callable[[PyTree, Any], PyTree]
    vjp: Callable[[PyTree, Any, PyTree], tuple[PyTree, Any]]
    solve: Callable[[Any, PyTree], PyTree]
    check: Callable[[str, str, Any, PyTree], None]
    log_det: Callable[[Any], jax.Array] | None


def _cast_like(d: PyTree, a: PyTree) -> PyTree:
    # The stream keeps its dtype: a bf16 branch output is added into a float32 stream in float32.
    return jax.tree.map(lambda di, ai: jnp.asarray(di).astype(ai.dtype), d, a)


_ADDITIVE = _CombineRule(
    combine=lambda a, d: jax.tree.map(jnp.add, a, _cast_like(d, a)),
    uncombine=lambda y, d: jax.tree.map(jnp.subtract, y, _cast_like(d, y)),
    vjp=lambda y, d, y_bar: (y_bar, jax.tree.map(lambda g, di: g.astype(di.dtype), y_bar, d)),
    solve=lambda d, a_bar: a_bar,
    check=lambda name, half_name, d, a: _check_like(name, half_name, d, a),
    log_det=None,
)


def _bounded_log_scale(raw: jax.Array, bound: float) -> jax.Array:
    """``bound * tanh(raw / bound)``: a log-scale in ``(-bound, bound)``, so ``exp`` of it neither
    overflows nor collapses to 0 (which would make the inverse divide by ~0)."""
    return bound * jnp.tanh(raw / bound)


def _affine_rule(bound: float) -> _CombineRule:
    def check_bound(half):
        for leaf in jax.tree.leaves(half):
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.floating) and bound >= math.log(jnp.finfo(dtype).max):
                # e^m itself is inf there: y = inf, and the inverse's x = (inf - t) e^-s is NaN.
                limit = math.log(jnp.finfo(dtype).max)
                raise ValueError(
                    f"affine_coupling: max_log_scale={bound} lets the scale e^s overflow the "
                    f"{dtype} stream (e^m is finite only for m < log(max {dtype}) = "
                    f"{limit:.4g}); use a smaller max_log_scale"
                )

    def combine(a, st):
        check_bound(a)
        s, t = st
        return jax.tree.map(
            lambda ai, si, ti: ai * jnp.exp(si.astype(ai.dtype)) + ti.astype(ai.dtype), a, s, t
        )

    def uncombine(y, st):
        check_bound(y)
        s, t = st
        return jax.tree.map(
            lambda yi, si, ti: (yi - ti.astype(yi.dtype)) * jnp.exp(-si.astype(yi.dtype)), y, s, t
        )

    def vjp(y, st, y_bar):
        # y = a e^s + t  =>  a_bar = y_bar e^s,  s_bar = y_bar a e^s = y_bar (y - t),  t_bar = y_bar
        s, t = st
        a_bar = jax.tree.map(lambda g, si: g * jnp.exp(si.astype(g.dtype)), y_bar, s)
        s_bar = jax.tree.map(
            lambda g, yi, si, ti: (g * (yi - ti.astype(yi.dtype))).astype(si.dtype), y_bar, y, s, t
        )
        t_bar = jax.tree.map(lambda g, ti: g.astype(ti.dtype), y_bar, t)
        return a_bar, (s_bar, t_bar)

    def solve(st, a_bar):
        # a_bar = y_bar e^s  =>  y_bar = a_bar e^-s
        return jax.tree.map(lambda g, si: g * jnp.exp(-si.astype(g.dtype)), a_bar, st[0])

    def check(name, half_name, st, a):
        if not (isinstance(st, tuple | list) and len(st) == 2):
            raise ValueError(
                f"{name} of an affine coupling must return (log_scale, shift), each shaped like "
                f"{half_name}; got {type(st).__name__}"
            )
        _check_like(f"{name} (log_scale)", half_name, st[0], a)
        _check_like(f"{name} (shift)", half_name, st[1], a)

    def log_det(st):
        # Summed in float32 at least (a bfloat16 log-scale summed in bfloat16 loses digits).
        wide = lambda si: si.astype(jnp.promote_types(si.dtype, jnp.float32))
        return sum(jnp.sum(wide(si)) for si in jax.tree.leaves(st[0]))

    return _CombineRule(combine, uncombine, vjp, solve, check, log_det)


def _flax_module_kind(fn: Any) -> str | None:
    """``"nnx"`` / ``"linen"`` when ``fn`` is a Flax module instance, else None. Flax is looked
    up only if already imported (an object cannot be a module of an unimported library), so
    revjax's core does not import it; flax's function wrappers (``nnx.jit(f)``) are not
    modules and pass."""
    nnx, linen = sys.modules.get("flax.nnx"), sys.modules.get("flax.linen")
    if nnx is not None and isinstance(fn, nnx.Module):
        return "nnx"
    if linen is not None and isinstance(fn, linen.Module):
        return "linen"
    return None


def _check_branch_functions(kind: str, **branches: Any) -> None:
    """Refuses branches that are not pure ``fn(params, half[, key])`` functions, at construction
    (they would otherwise fail inside the first scan with an unrelated message)."""
    for name, fn in branches.items():
        flax = _flax_module_kind(fn)
        if flax == "nnx":
            raise TypeError(
                f"{kind}: branch {name} is an nnx.Module ({type(fn).__name__}), which holds its "
                "own parameters; a branch is a pure function fn(params, half[, key]). Decorate a "
                "block class with @revjax.nnx.reversible and stack it with revjax.nnx.Stack"
            )
        if flax == "linen":
            raise TypeError(
                f"{kind}: branch {name} is a linen Module ({type(fn).__name__}), which needs its "
                "params bound by apply; use revjax.linen.linen_coupling(f_module, g_module)"
            )
        if not callable(fn):
            raise TypeError(
                f"{kind}: branch {name} must be a function {name}(params, half[, key]), got "
                f"{type(fn).__name__} {fn!r}"
            )


def _feistel_coupling(
    f: Callable,
    g: Callable,
    rule: _CombineRule,
    kind: str,
    map_branches: Callable[[BranchWrapper], Coupling] | None = None,
) -> Coupling:
    """``y1 = combine(x1, f(x2)); y2 = combine(x2, g(y1))`` with a fused backward step."""

    def branch(fn, name, half_name, p, other, half, key):
        try:
            out = call_with_key(fn, p, other, key=key)
        except Exception as err:  # say where, then re-raise the branch's own error unchanged
            other_name = "x2" if name == "f" else "y1"
            err.add_note(
                f"revjax: raised by {kind}'s branch {name}(params_{name}, {other_name}) with "
                f"{other_name} of shape {_describe(other)} and params_{name} of shape "
                f"{_abridged(_describe(p))}; its output is combined with {half_name} of shape "
                f"{_describe(half)}"
                + (
                    ", and with a PRNG key as third argument because key= was given (a branch "
                    "without randomness may take and ignore it: fn(params, half, key=None))"
                    if key is not None
                    else ""
                )
            )
            raise
        try:
            rule.check(f"{kind}: {name}", half_name, out, half)
        except ValueError as err:  # the branch may be right and the halves disagree
            other_name = "x2" if name == "f" else "y1"
            err.add_note(
                f"revjax: {name} was called on {other_name} of shape {_describe(other)} and "
                f"its output is combined with {half_name} of shape {_describe(half)}; if {name} "
                "is right, the stream's two halves disagree: they must share their leading "
                "(batch) axes"
            )
            raise
        # Arrays from here on: a Python scalar output of a scalar half has no .astype.
        return jax.tree.map(jnp.asarray, out)

    def forward(params, x, key=None):
        (pf, pg), (x1, x2) = (
            _split_params(params, f"{kind}.forward"),
            _split_halves(x, f"{kind}.forward"),
        )
        kf, kg = split_key(key, 2)
        y1 = rule.combine(x1, branch(f, "f", "x1", pf, x2, x1, kf))
        y2 = rule.combine(x2, branch(g, "g", "x2", pg, y1, x2, kg))
        return (y1, y2)

    def inverse(params, y, key=None):
        (pf, pg), (y1, y2) = (
            _split_params(params, f"{kind}.inverse"),
            _split_halves(y, f"{kind}.inverse"),
        )
        kf, kg = split_key(key, 2)
        x2 = rule.uncombine(y2, branch(g, "g", "x2", pg, y1, y2, kg))
        x1 = rule.uncombine(y1, branch(f, "f", "x1", pf, x2, y1, kf))
        return (x1, x2)

    def with_log_det_term(out, out_bar, log_det_bar):
        # The cotangent of a branch output when the loss also has log_det_bar * log_det, and
        # log_det = rule.log_det(f_out) + rule.log_det(g_out) is a function of the outputs.
        if log_det_bar is None:
            return out_bar
        value, pullback = jax.vjp(rule.log_det, out)
        return add_cotangents(out_bar, pullback(jnp.asarray(log_det_bar, value.dtype))[0])

    def fused_backward(params, y, y_bar, key, log_det_bar):
        # Each of f and g is evaluated exactly once: its vjp yields both its value (needed to
        # reconstruct the input half) and the pullback (needed for the cotangents).
        (pf, pg), (y1, y2) = (
            _split_params(params, f"{kind}.backward"),
            _split_halves(y, f"{kind}.backward"),
        )
        y1_bar, y2_bar = y_bar
        kf, kg = split_key(key, 2)

        g_out, g_pullback = jax.vjp(lambda p, h: branch(g, "g", "x2", p, h, y2, kg), pg, y1)
        x2 = rule.uncombine(y2, g_out)
        x2_bar, g_out_bar = rule.vjp(y2, g_out, y2_bar)
        pg_bar, y1_bar_from_g = g_pullback(with_log_det_term(g_out, g_out_bar, log_det_bar))
        y1_bar = jax.tree.map(jnp.add, y1_bar, y1_bar_from_g)

        f_out, f_pullback = jax.vjp(lambda p, h: branch(f, "f", "x1", p, h, y1, kf), pf, x2)
        x1 = rule.uncombine(y1, f_out)
        x1_bar, f_out_bar = rule.vjp(y1, f_out, y1_bar)
        pf_bar, x2_bar_from_f = f_pullback(with_log_det_term(f_out, f_out_bar, log_det_bar))
        x2_bar = jax.tree.map(jnp.add, x2_bar, x2_bar_from_f)

        return (x1, x2), (x1_bar, x2_bar), _like_sequence(params, [pf_bar, pg_bar])

    def backward(params, y, y_bar, key=None):
        return fused_backward(params, y, y_bar, key, None)

    def log_det_backward(params, y, y_bar, log_det_bar, key=None):
        # Additive (rule.log_det None): volume preserving, log_det is the constant 0.
        return fused_backward(params, y, y_bar, key, None if rule.log_det is None else log_det_bar)

    def vijp_step(params, x, x_bar, key=None):
        # Backprop relations, t1 = y1_bar + (dg/dy1)^T g_bar being the total cotangent of y1:
        #   x1_bar = t1 (dy1/dx1),  x2_bar = y2_bar (dy2/dx2) + (df/dx2)^T f_bar.
        # Solved forward: t1 from x1_bar, y2_bar from x2_bar, then y1_bar = t1 - (dg/dy1)^T g_bar.
        # f and g are evaluated once each.
        (pf, pg), (x1, x2) = (
            _split_params(params, f"{kind}.vijp_step"),
            _split_halves(x, f"{kind}.vijp_step"),
        )
        x1_bar, x2_bar = x_bar
        kf, kg = split_key(key, 2)

        f_out, f_pullback = jax.vjp(lambda p, h: branch(f, "f", "x1", p, h, x1, kf), pf, x2)
        y1 = rule.combine(x1, f_out)
        y1_bar_total = rule.solve(f_out, x1_bar)
        _, f_out_bar = rule.vjp(y1, f_out, y1_bar_total)
        pf_bar, x2_bar_from_f = f_pullback(f_out_bar)

        g_out, g_pullback = jax.vjp(lambda p, h: branch(g, "g", "x2", p, h, x2, kg), pg, y1)
        y2 = rule.combine(x2, g_out)
        y2_bar = rule.solve(g_out, jax.tree.map(jnp.subtract, x2_bar, x2_bar_from_f))
        _, g_out_bar = rule.vjp(y2, g_out, y2_bar)
        pg_bar, y1_bar_from_g = g_pullback(g_out_bar)
        y1_bar = jax.tree.map(jnp.subtract, y1_bar_total, y1_bar_from_g)

        return (y1, y2), (y1_bar, y2_bar), _like_sequence(params, [pf_bar, pg_bar])

    log_det = None
    if rule.log_det is not None:

        def log_det(params, x, key=None):
            (pf, pg), (x1, x2) = (
                _split_params(params, f"{kind}.log_det"),
                _split_halves(x, f"{kind}.log_det"),
            )
            kf, kg = split_key(key, 2)
            f_out = branch(f, "f", "x1", pf, x2, x1, kf)
            y1 = rule.combine(x1, f_out)
            g_out = branch(g, "g", "x2", pg, y1, x2, kg)
            return rule.log_det(f_out) + rule.log_det(g_out)

    return Coupling(
        forward,
        inverse,
        backward,
        log_det,
        map_branches,
        vijp_step,
        log_det_backward=log_det_backward,
    )


def additive_coupling(f: Callable, g: Callable) -> Coupling:
    """RevNet additive coupling of two residual branches.

    Args:
      f: ``f(params_f, x2[, key]) -> d1``, ``d1`` shaped like ``x1``.
      g: ``g(params_g, y1[, key]) -> d2``, ``d2`` shaped like ``x2``.

    Returns:
      A :class:`Coupling` with ``params = (params_f, params_g)`` and ``x = (x1, x2)``::

        y1 = x1 + f(params_f, x2)          x2 = y2 - g(params_g, y1)
        y2 = x2 + g(params_g, y1)          x1 = y1 - f(params_f, x2)

      Branch outputs are cast to the dtype of the half they are added to, so a float32 stream
      stays float32 when f and g compute in bfloat16. ``log|det J| = 0`` (volume preserving).
    """
    _check_branch_functions("additive_coupling", f=f, g=g)
    block = _feistel_coupling(
        f,
        g,
        _ADDITIVE,
        "additive_coupling",
        lambda wrap: additive_coupling(wrap(f, "additive"), wrap(g, "additive")),
    )
    # Volume preserving: no branch needs evaluating. With it, sequences of additive and affine
    # couplings (NICE / Real NVP flows) keep their log_det.
    return block._replace(log_det=lambda params, x, key=None: jnp.zeros((), jnp.float32))


def affine_coupling(f: Callable, g: Callable, *, max_log_scale: float = 2.0) -> Coupling:
    """Real NVP style affine coupling of two branches, with a bounded scale.

    Args:
      f: ``f(params_f, x2[, key]) -> (raw_log_scale, shift)``, both shaped like ``x1``.
      g: ``g(params_g, y1[, key]) -> (raw_log_scale, shift)``, both shaped like ``x2``.
      max_log_scale: bound ``m`` on the log-scale: ``s = m * tanh(raw / m)``, so every scale lies
        in ``(e^-m, e^m)`` and the inverse never divides by a vanishing number. ``m`` must be
        below ``log`` of the largest number of each half's dtype (88.7 for float32 and
        bfloat16, 11.09 for float16), where ``e^m`` overflows: ``ValueError`` at trace time.

    Returns:
      A :class:`Coupling` with ``params = (params_f, params_g)`` and ``x = (x1, x2)``::

        y1 = x1 * exp(s_f(x2)) + t_f(x2)          x2 = (y2 - t_g(y1)) * exp(-s_g(y1))
        y2 = x2 * exp(s_g(y1)) + t_g(y1)          x1 = (y1 - t_f(x2)) * exp(-s_f(x2))

      and ``log_det(params, x) = sum(s_f(x2)) + sum(s_g(y1))`` over all elements, in float32
      (float64 for a float64 log-scale).
    """
    _check_branch_functions("affine_coupling", f=f, g=g)
    if not 0 < max_log_scale < math.inf:  # inf would give inf * tanh(raw / inf) = NaN
        raise ValueError(
            f"affine_coupling: max_log_scale must be finite and > 0, got {max_log_scale}"
        )

    def bounded(fn, name):
        def wrapped(p, h, *key):
            raw, shift = _as_pair(call_with_key(fn, p, h, key=key[0] if key else None), name)
            s = jax.tree.map(lambda r: _bounded_log_scale(r, max_log_scale), raw)
            return (s, shift)

        return wrapped

    return _feistel_coupling(
        bounded(f, "f"),
        bounded(g, "g"),
        _affine_rule(max_log_scale),
        "affine_coupling",
        lambda wrap: affine_coupling(
            wrap(f, "affine"), wrap(g, "affine"), max_log_scale=max_log_scale
        ),
    )


def _as_pair(out: Any, name: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple | list) and len(out) == 2):
        got = (
            f"a {type(out).__name__} of {len(out)}: {_describe(out)}"
            if isinstance(out, tuple | list)
            else f"{_type_name(out)} of shape {_describe(out)}"
        )
        raise ValueError(
            f"affine_coupling: branch {name} must return a pair (raw_log_scale, shift), each "
            f"shaped like the half it updates; got {got}"
        )
    return out[0], out[1]


def sequence(*blocks: Coupling) -> Coupling:
    """Composition ``blocks[-1] o ... o blocks[0]`` with ``params = (params_0, ..., params_n)``.

    The inverse and the backward step run the blocks in reverse order, each with its own fused
    backward when it has one. A key is split into one key per block. ``log_det`` is the sum of
    the blocks' log-determinants and exists when every block has one.
    """
    if not blocks:
        raise ValueError("sequence() needs at least one block")
    for i, b in enumerate(blocks):
        if not isinstance(b, Coupling):
            raise TypeError(f"sequence: block {i} is a {type(b).__name__}, not a Coupling")
    n = len(blocks)
    steps = [reconstruct_and_vjp(b) for b in blocks]

    def _params(params):
        if not (isinstance(params, tuple | list) and len(params) == n):
            raise ValueError(
                f"sequence of {n} blocks expects params as a tuple of {n} per-block params; "
                f"got {type(params).__name__} {_describe(params)}"
            )
        return params

    def forward(params, x, key=None):
        for b, p, k in zip(blocks, _params(params), split_key(key, n), strict=True):
            x = call_with_key(b.forward, p, x, key=k)
        return x

    def side(params, x, key=None):
        out = []
        for b, p, k in zip(blocks, _params(params), split_key(key, n), strict=True):
            out.append(None if b.aux is None else call_with_key(b.aux, p, x, key=k))
            x = call_with_key(b.forward, p, x, key=k)
        return tuple(out)

    def inverse(params, y, key=None, aux=None):
        keys, aux = split_key(key, n), aux or (None,) * n
        for i in reversed(range(n)):
            inv = with_aux(blocks[i].inverse, blocks[i], aux[i])
            y = call_with_key(inv, _params(params)[i], y, key=keys[i])
        return y

    def run_backward(block_steps, params, y, y_bar, key, aux, *log_det_bar):
        # The blocks' steps in reverse order; log_det_bar (if any) is the same for every block,
        # log_det being a sum over them.
        keys, params, aux = split_key(key, n), _params(params), aux or (None,) * n
        params_bar = [None] * n
        for i in reversed(range(n)):
            step = with_aux(block_steps[i], blocks[i], aux[i])
            y, y_bar, params_bar[i] = call_with_key(
                step, params[i], y, y_bar, *log_det_bar, key=keys[i]
            )
        return y, y_bar, _like_sequence(params, params_bar)

    def backward(params, y, y_bar, key=None, aux=None):
        return run_backward(steps, params, y, y_bar, key, aux)

    log_det = log_det_backward = None
    if all(b.log_det is not None for b in blocks):
        log_det_steps = [reconstruct_and_vjp_with_log_det(b) for b in blocks]

        def log_det(params, x, key=None):
            total = jnp.zeros((), jnp.float32)
            for b, p, k in zip(blocks, _params(params), split_key(key, n), strict=True):
                total = total + call_with_key(b.log_det, p, x, key=k)
                x = call_with_key(b.forward, p, x, key=k)
            return total

        def log_det_backward(params, y, y_bar, log_det_bar, key=None, aux=None):
            return run_backward(log_det_steps, params, y, y_bar, key, aux, log_det_bar)

    vijp_step = None
    if all(b.vijp_step is not None for b in blocks):

        def vijp_step(params, x, x_bar, key=None):
            params_bar = []
            for b, p, k in zip(blocks, _params(params), split_key(key, n), strict=True):
                x, x_bar, p_bar = call_with_key(b.vijp_step, p, x, x_bar, key=k)
                params_bar.append(p_bar)
            return x, x_bar, _like_sequence(params, params_bar)

    def map_branches(wrap):
        for i, b in enumerate(blocks):
            if b.map_branches is None:
                raise TypeError(
                    f"sequence: block {i} is a hand-written Coupling without map_branches, so its "
                    "branches cannot be wrapped (e.g. cast to a compute dtype by a precision "
                    "policy); build it with additive_coupling/affine_coupling or give it one"
                )
        return sequence(*(b.map_branches(wrap) for b in blocks))

    has_aux = any(b.aux is not None for b in blocks)
    return Coupling(
        forward,
        inverse,
        backward,
        log_det,
        map_branches,
        vijp_step,
        side if has_aux else None,
        log_det_backward,
    )


def _like_sequence(template: tuple | list, items: list) -> tuple | list:
    """``items`` in the container type of ``template`` (tuple, list or NamedTuple)."""
    if isinstance(template, list):
        return list(items)
    if hasattr(template, "_fields"):
        return type(template)(*items)
    return tuple(items)


def swap() -> Coupling:
    """Exchanges the halves: ``(x1, x2) -> (x2, x1)``. Parameter-free: pass ``None`` as params.

    Both halves must have the same structure, shapes and dtypes when used inside a scan, whose
    carry cannot change type between layers.
    """

    def forward(params, x, key=None):
        x1, x2 = _split_halves(x, "swap")
        return (x2, x1)

    def backward(params, y, y_bar, key=None):
        return forward(params, y), forward(params, y_bar), jax.tree.map(jnp.zeros_like, params)

    return Coupling(
        forward,
        forward,
        backward,
        lambda params, x, key=None: jnp.zeros((), jnp.float32),
        lambda wrap: swap(),  # no branches to wrap
        backward,  # a permutation: the same formula maps (x, x_bar) to (y, y_bar)
        log_det_backward=lambda params, y, y_bar, log_det_bar, key=None: backward(
            params, y, y_bar, key
        ),  # log_det is the constant 0
    )


__all__ = [
    "Coupling",
    "additive_coupling",
    "affine_coupling",
    "sequence",
    "swap",
]
