"""Flax Linen adapter: two Linen modules as the branches of a reversible coupling.

Linen modules are already pure (``module.apply(variables, x)``), so no decorator is needed:
:func:`linen_coupling` turns the residual branches ``f`` and ``g`` into a
:class:`revjax.Coupling` whose parameters are their variable dicts, and :func:`init_linen_stack`
initialises ``depth`` independent layers, stacked along a leading axis, for
:func:`revjax.reversible_scan`::

    f, g = Attention(...), Mlp(...)
    block = linen_coupling(f, g)
    params = init_linen_stack(f, g, key, depth, (x1, x2))
    y = revjax.reversible_scan(block, params, (x1, x2), key=dropout_key)

A key given to the scan reaches each branch as its ``"dropout"`` RNG (``rng_collection``),
split as in :func:`revjax.additive_coupling`, and is replayed in the backward pass. Only the
``"params"`` collection is supported: mutable collections (``batch_stats``) would be updated
twice per step by the reconstruction, so :func:`init_linen_stack` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from revjax._validate import positive_int
from revjax.coupling import Coupling, additive_coupling
from revjax.scan import check_key

PyTree = Any


def _without_layer_axis(box: Any) -> Any:
    """One layer's slice of a partitioning box from :func:`init_linen_stack`: the scan slices
    the array, and this drops the layer axis's (unsharded) name in front of the names, so Flax
    constrains the slice by one layer's names (as ``nn.scan`` does). A box whose names already
    match its array (not from a stack) is left as it is."""
    if (
        isinstance(box, nn.Partitioned)
        and len(box.names) == jnp.ndim(box.value) + 1
        and box.names[0] is None
    ):
        return box.remove_axis(0, {nn.PARTITION_NAME: None})
    return box


def _rngs(collections: tuple[str, ...], key: jax.Array | None) -> dict[str, jax.Array] | None:
    """The ``rngs`` of one branch call: ``key`` itself for one collection, one key split off
    it per collection for several."""
    if key is None:
        return None
    if len(collections) == 1:
        return {collections[0]: key}
    return dict(zip(collections, jax.random.split(key, len(collections)), strict=True))


def _note_call_arguments(err: TypeError, where: str, module: nn.Module) -> bool:
    """Adds what to do when ``module.__call__`` wants more than the half it is given (the
    error names that method); returns whether it did."""
    text = str(err)
    wants_more = "required positional argument" in text or "required keyword" in text
    if wants_more and f"{type(module).__name__}.__call__()" in text:
        err.add_note(
            f"revjax: {where} calls {type(module).__name__} with the half alone; make other "
            f"arguments (a train flag, say) attributes of the module, {type(module).__name__}"
            "(..., train=True), or wrap it in a module whose __call__ takes only the half"
        )
        return True
    return False


def _apply(module: nn.Module, collections: tuple[str, ...]):
    shown = collections[0] if len(collections) == 1 else collections

    def branch(variables: PyTree, h: jax.Array, key: jax.Array | None = None) -> jax.Array:
        is_box = lambda leaf: isinstance(leaf, meta.AxisMetadata)
        variables = jax.tree.map(_without_layer_axis, variables, is_leaf=is_box)
        try:
            return module.apply(variables, h, rngs=_rngs(collections, key))
        except flax.errors.InvalidRngError as err:
            if key is None:
                err.add_note(
                    f"revjax: the branch draws random numbers; pass key= to reversible_scan "
                    f"(and the same key to inverse_scan): it reaches each branch as its "
                    f"{shown!r} RNG, replayed in the backward pass"
                )
            else:
                err.add_note(
                    f"revjax: the scan's key reaches the branches as their {shown!r} RNG "
                    "only; name every collection the module draws from with "
                    "linen_coupling(..., rng_collection=...), a tuple for several, e.g. "
                    "('dropout', 'noise')"
                )
            raise
        except TypeError as err:
            _note_call_arguments(err, "linen_coupling", module)
            raise

    return branch


def _collections(rng_collection: Any) -> tuple[str, ...]:
    """``rng_collection`` as a tuple of distinct names; anything else raises ``TypeError``."""
    names = (rng_collection,) if isinstance(rng_collection, str) else rng_collection
    if (
        not isinstance(names, tuple | list)
        or not names
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise TypeError(
            "linen_coupling: rng_collection must name the RNG collection the scan's key "
            f"feeds (e.g. 'dropout'), or a tuple of distinct names, got {rng_collection!r}"
        )
    return tuple(names)


def _check_modules(where: str, f: Any, g: Any) -> None:
    for name, module in (("f", f), ("g", g)):
        if isinstance(module, type) and issubclass(module, nn.Module):
            raise TypeError(
                f"{where}: {name} is the class {module.__name__}; pass an instance, "
                f"{module.__name__}(...)"
            )
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{where}: {name} must be a flax.linen.Module, got {type(module).__name__}; "
                "for a pure function use revjax.additive_coupling"
            )


def linen_coupling(
    f: nn.Module, g: nn.Module, *, rng_collection: str | Sequence[str] = "dropout"
) -> Coupling:
    """The additive coupling ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` of two Linen modules.

    ``params = (variables_f, variables_g)``, each a Linen variable dict ``{"params": ...}``.
    A branch's key (split off the scan's) is its ``rng_collection`` RNG; for a tuple of
    collections (``("dropout", "noise")``) it is split into one key per collection.

    Raises:
      TypeError: ``f`` or ``g`` is not a ``flax.linen.Module`` (or is the class, not an
        instance); ``rng_collection`` is not a string or a tuple of distinct strings.
    """
    _check_modules("linen_coupling", f, g)
    collections = _collections(rng_collection)
    return additive_coupling(_apply(f, collections), _apply(g, collections))


def init_linen_stack(
    f: nn.Module, g: nn.Module, key: jax.Array, depth: int, x: tuple[jax.Array, jax.Array]
) -> tuple[PyTree, PyTree]:
    """``depth`` independently initialised layers: ``(variables_f, variables_g)`` whose leaves
    have a leading axis ``depth``. ``x = (x1, x2)`` gives the halves' shapes and dtypes, as
    arrays or ``jax.ShapeDtypeStruct`` s (``f`` is initialised on ``x2``, ``g`` on ``x1``).
    Partitioning metadata (``nn.with_partitioning``) gets the layer axis, unsharded, in front
    of its names, so ``nn.get_partition_spec`` of the result places the stacked arrays.

    Raises:
      ValueError: ``depth`` is not a positive int.
      TypeError: a branch has variable collections other than ``"params"``, ``f``/``g`` is not
        a Linen module, ``key`` is not a PRNG key, or ``x`` is not a pair.
    """
    _check_modules("init_linen_stack", f, g)
    depth = positive_int(depth, "depth", "init_linen_stack")
    if not isinstance(key, jax.Array | np.ndarray):  # a typed key, or raw uint32 key data
        example = f"jax.random.key({key!r})" if isinstance(key, int) else "jax.random.key(0)"
        raise TypeError(
            f"init_linen_stack: key must be a PRNG key, e.g. {example}, got {type(key).__name__}"
        )
    check_key(key, where="init_linen_stack")  # one key: not a scalar, not a batch of keys
    if not (isinstance(x, tuple | list) and len(x) == 2):
        raise TypeError(
            "init_linen_stack: x must be the pair of halves (x1, x2) (arrays or shape structs), "
            f"got {type(x).__name__}{f' of shape {x.shape}' if hasattr(x, 'shape') else ''}"
        )
    # Shape structs (jax.ShapeDtypeStruct) stand for zeros of their shape and dtype.
    x1, x2 = (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), half) for half in x)

    def init_layer(layer_key):
        kf, kg = jax.random.split(layer_key)
        return f.init(kf, x2), g.init(kg, x1)

    try:
        variables = jax.vmap(init_layer)(jax.random.split(key, depth))
    except TypeError as err:
        for module in (f, g):  # one note, for the first branch that wants more
            if _note_call_arguments(err, "init_linen_stack", module):
                break
        raise
    # Partitioning metadata (nn.with_partitioning) names the axes of one layer's arrays; the
    # stacked arrays have a leading layer axis, which is not sharded (as revjax.nnx.Stack does).
    variables = meta.add_axis(variables, 0, {nn.PARTITION_NAME: None})
    for name, module, branch in zip("fg", (f, g), variables, strict=True):
        extra = sorted(set(branch) - {"params"})
        if extra:
            raise TypeError(
                f"init_linen_stack: branch {name} ({type(module).__name__}) "
                f"has variable collections {extra}; only 'params' is supported because the "
                "backward pass re-runs each branch and would update mutable state twice"
            )
    return variables


__all__ = [
    "init_linen_stack",
    "linen_coupling",
]
