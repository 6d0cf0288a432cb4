"""Reversible decoder-only transformer (Reformer-style) and its non-reversible twin.

Each block is a RevNet coupling of pre-norm causal self-attention and a pre-norm MLP:

    y1 = x1 + Attention(LN(x2)),    y2 = x2 + MLP(LN(y1)),

stacked by :class:`revjax.nnx.Stack`, so training stores no per-block activations. Token and
position embeddings and the output head are ordinary layers outside the reversible stack; the
embedding ``h`` enters as both halves, ``(x1, x2) = (h, h)``, and the head reads
``LN((y1 + y2) / 2)``.

The twin with identical parameters is the same model with the stack's method switched:
``nnx.view(model, method="backprop")`` (plain backprop) or ``method="checkpoint"`` (one
``jax.checkpoint`` per block, the equivalent of ``nnx.remat`` on each block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from revjax._validate import check_dropout_rate, positive_int
from revjax.nnx import Method, Stack, reversible
from revjax.precision import Policy


def _linear(
    d_in: int, d_out: int, split: str, axis: str | None, rngs: nnx.Rngs, bias: bool = True
) -> nnx.Linear:
    """``nnx.Linear``; with a mesh ``axis`` name, Megatron-style partitioning metadata: output
    features sharded (``split="out"``, bias too) or input features (``split="in"``)."""
    if axis is None:
        return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs)
    names = (None, axis) if split == "out" else (axis, None)
    bias_names = (axis,) if split == "out" else (None,)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, bias_names),
        rngs=rngs,
    )


def _dropout(rate: float, where: str, rngs: nnx.Rngs) -> nnx.Dropout:
    """``nnx.Dropout(rate)``. It forks a dropout stream whenever ``rngs`` can supply one (a
    ``dropout`` or ``default`` stream), so the parameters drawn from a seed and the saved state
    do not depend on the rate; without such a stream a rate of 0 needs none."""
    check_dropout_rate(rate, where)
    can_supply = "dropout" in rngs or "default" in rngs
    return nnx.Dropout(rate, rngs=rngs if rate > 0 or can_supply else None)


def _check_tensor_parallel(axis: str | None, sizes: dict[str, int], where: str) -> None:
    """A ``tensor_parallel`` axis needs a mesh (``jax.set_mesh``); there the ``axis`` must
    exist, be an ``AxisType.Auto`` axis (an Explicit one needs ``out_sharding`` in every
    sharded matmul) and divide every sharded feature size; otherwise partitioning would fail
    later or silently replicate the weights."""
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None:
        return
    if mesh.empty:  # Flax's own error ("an auto mesh context is required") names neither
        raise ValueError(
            f"{where}: tensor_parallel={axis!r} needs a mesh with that axis: build the model "
            "under jax.set_mesh(mesh) (or leave tensor_parallel=None on one device)"
        )
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{where}: tensor_parallel={axis!r} is not an axis of the mesh {dict(mesh.shape)}"
        )
    if dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis] != AxisType.Auto:
        raise ValueError(
            f"{where}: tensor_parallel={axis!r} is an AxisType.Explicit axis; the sharded "
            "matmuls would need out_sharding annotations: build the model under a mesh whose "
            "axes are all AxisType.Auto (Flax partitioning needs all-Auto or all-Explicit)"
        )
    size = mesh.shape[axis]
    bad = {name: n for name, n in sizes.items() if n % size}
    if bad:
        raise ValueError(
            f"{where}: {', '.join(f'{k}={v}' for k, v in bad.items())} not divisible by the "
            f"size {size} of mesh axis {axis!r}; those weights would be silently replicated"
        )


def _ids_or_vocab_size(ids: jax.Array, vocab_size: int) -> jax.Array:
    """``ids`` as int32, each outside ``[0, vocab_size)`` replaced by ``vocab_size`` (out of
    range for a gather, refused by the loss). Compared in int32, which holds ``vocab_size``
    where a narrow dtype (int8) would not, or in the ids' own 64-bit dtype (x64), where
    narrowing first would wrap ``2**32 + 5`` to the valid id 5."""
    ids = ids.astype(ids.dtype if ids.dtype.itemsize > 4 else jnp.int32)
    return jnp.where((ids < 0) | (ids >= vocab_size), vocab_size, ids).astype(jnp.int32)


def _embedding_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table[tokens]``: ``(V, D)``, ``(..., T) int -> (..., T, D)``. Ids outside ``[0, V)``
    (negative ones too) give NaN rows (JAX's ``fill`` gather), which the loss then shows.

    On a mesh with ``AxisType.Explicit`` axes the tokens' sharding is part of their type and a
    gather's output sharding must be named: it is the tokens' spec plus an unsharded feature
    axis (data parallelism). Elsewhere this is ``jnp.take``, as in ``nnx.Embed``.
    """
    # A negative id would wrap to the end of the table (NumPy indexing): send it out of range.
    tokens = _ids_or_vocab_size(jnp.asarray(tokens), table.shape[0])
    sharding = jax.typeof(tokens).sharding
    if all(axis is None for axis in sharding.spec):
        return jnp.take(table, tokens, axis=0)
    out = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, None))
    return table.at[tokens].get(out_sharding=out, mode="fill", fill_value=jnp.nan)


def _check_width(x: jax.Array, dim: int, where: str, layout: str, *, min_ndim: int) -> None:
    """``x`` has at least ``min_ndim`` axes and ``dim`` features on the last (static shapes)."""
    if jnp.ndim(x) < min_ndim or jnp.shape(x)[-1] != dim:
        raise ValueError(f"{where}: expects x of shape {layout} with dim={dim}, got {jnp.shape(x)}")


class CausalSelfAttention(nnx.Module):
    """``x (B, T, D) -> Dropout(W_o softmax(Q K^T / sqrt(D/H) + causal mask) V)``, with
    ``Q, K, V = LN(x) W_q, LN(x) W_k, LN(x) W_v`` split into ``H`` heads.

    ``tensor_parallel``: a mesh axis name; ``W_q, W_k, W_v`` are then sharded by output
    feature (whole heads per device when ``H`` is divisible by the axis size) and ``W_o`` by
    input feature, so attention needs one all-reduce of its output (Megatron-LM)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        dropout: float = 0.0,
        tensor_parallel: str | None = None,
        rngs: nnx.Rngs,
    ):
        dim = positive_int(dim, "dim", "CausalSelfAttention")
        heads = positive_int(heads, "heads", "CausalSelfAttention")
        if dim % heads:
            raise ValueError(f"CausalSelfAttention: dim={dim} is not divisible by heads={heads}")
        _check_tensor_parallel(tensor_parallel, {"dim": dim}, "CausalSelfAttention")
        self.heads, self.dim = heads, dim
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.q = _linear(dim, dim, "out", tensor_parallel, rngs, bias=False)
        self.k = _linear(dim, dim, "out", tensor_parallel, rngs, bias=False)
        self.v = _linear(dim, dim, "out", tensor_parallel, rngs, bias=False)
        self.out = _linear(dim, dim, "in", tensor_parallel, rngs, bias=False)
        self.dropout = _dropout(dropout, "CausalSelfAttention", rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_width(x, self.dim, "CausalSelfAttention", "(..., length, dim)", min_ndim=2)
        *batch, length, dim = x.shape
        h = self.norm(x)
        # One batch axis for dot_product_attention, which takes (B, T, H, D / H) only: the
        # leading axes are folded into it (two of them failed inside JAX) and unfolded after.
        split = lambda a: a.reshape(-1, length, self.heads, dim // self.heads)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.dropout(self.out(attended.reshape(*batch, length, dim)))


class FeedForward(nnx.Module):
    """``x (..., D) -> Dropout(W_2 gelu(LN(x) W_1 + b_1) + b_2)``, hidden width ``hidden``;
    with ``tensor_parallel``, ``W_1, b_1`` are sharded by hidden unit and ``W_2`` by input."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        dropout: float = 0.0,
        tensor_parallel: str | None = None,
        rngs: nnx.Rngs,
    ):
        dim = positive_int(dim, "dim", "FeedForward")
        hidden = positive_int(hidden, "hidden", "FeedForward")
        _check_tensor_parallel(tensor_parallel, {"hidden": hidden}, "FeedForward")
        self.dim = dim
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.up = _linear(dim, hidden, "out", tensor_parallel, rngs)
        self.down = _linear(hidden, dim, "in", tensor_parallel, rngs)
        self.dropout = _dropout(dropout, "FeedForward", rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_width(x, self.dim, "FeedForward", "(..., dim)", min_ndim=1)
        return self.dropout(self.down(jax.nn.gelu(self.up(self.norm(x)))))


@reversible
class TransformerBlock(nnx.Module):
    """Reversible transformer block: ``f`` = causal self-attention, ``g`` = MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        *,
        dropout: float = 0.0,
        tensor_parallel: str | None = None,
        rngs: nnx.Rngs,
    ):
        tp = tensor_parallel
        self.f = CausalSelfAttention(dim, heads, dropout=dropout, tensor_parallel=tp, rngs=rngs)
        self.g = FeedForward(dim, hidden, dropout=dropout, tensor_parallel=tp, rngs=rngs)


class ReversibleTransformer(nnx.Module):
    """Byte/token-level causal language model: ``tokens (B, T) int -> logits (B, T, vocab)``
    (or one unbatched sequence ``(T,) -> (T, vocab)``).

    Args:
      vocab_size, dim, depth, heads: sizes; ``hidden`` defaults to ``4 * dim``.
      max_len: longest sequence (learned position embeddings).
      dropout: rate of the dropout after attention and after the MLP.
      method, checkpoint_every, policy: see :class:`revjax.nnx.Stack`.
      tensor_parallel: optional mesh axis name over which attention heads and MLP hidden units
        are sharded (partitioning metadata; build the model under ``jax.set_mesh(mesh)``).
        Embeddings and head are replicated.
      rngs: ``nnx.Rngs`` with a ``params`` stream (initialisation) and, when ``dropout > 0``,
        a ``dropout`` stream, which the stack forks for its per-call keys.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        *,
        hidden: int | None = None,
        dropout: float = 0.0,
        method: Method = "reversible",
        checkpoint_every: int | None = None,
        policy: Policy | None = None,
        tensor_parallel: str | None = None,
        rngs: nnx.Rngs,
    ):
        hidden = 4 * dim if hidden is None else hidden
        sizes = {"vocab_size": vocab_size, "dim": dim, "max_len": max_len, "hidden": hidden}
        for name, value in sizes.items():
            positive_int(value, name, "ReversibleTransformer")
        check_dropout_rate(dropout, "ReversibleTransformer")
        self.max_len = max_len
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
        self.stack = Stack(
            TransformerBlock,
            depth,
            dim,
            heads,
            hidden,
            dropout=dropout,
            tensor_parallel=tensor_parallel,
            method=method,
            checkpoint_every=checkpoint_every,
            policy=policy,
            rngs=rngs,
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise TypeError(
                "ReversibleTransformer: tokens must be integer ids in [0, vocab_size), got "
                f"{jnp.result_type(tokens)}{list(jnp.shape(tokens))}"
            )
        if jnp.ndim(tokens) not in (1, 2):  # (length,) is one unbatched sequence, e.g. vmapped
            raise ValueError(
                "ReversibleTransformer: tokens must be (batch, length) or (length,) ids, got "
                f"shape {jnp.shape(tokens)}"
            )
        length = tokens.shape[-1]
        if length == 0:  # else a ZeroDivisionError from a reshape in the attention
            raise ValueError(
                f"ReversibleTransformer: tokens have length 0 (shape {jnp.shape(tokens)}); "
                "a sequence needs at least one token"
            )
        if length > self.max_len:
            raise ValueError(
                f"ReversibleTransformer: sequence length {length} exceeds max_len={self.max_len}"
            )
        h = _embedding_lookup(self.embed.embedding[...], tokens) + self.position[...][:length]
        y1, y2 = self.stack((h, h), key=key)
        return self.head(self.norm((y1 + y2) / 2))


def next_token_loss(
    model: ReversibleTransformer, tokens: jax.Array, key: jax.Array | None = None
) -> jax.Array:
    """Mean cross-entropy (nats) of predicting ``tokens[:, t + 1]`` from ``tokens[:, :t + 1]``.

    ``tokens (B, T)`` with ``T >= 2`` (one input and one target at least). A target id outside
    ``[0, vocab_size)`` gives a NaN loss and NaN gradients, like such an input id (optax would
    read a negative label as one counted from the end of the vocabulary, and a selected-away
    position would leave the gradients finite, so an optimiser would step on them)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"next_token_loss: tokens must have shape (batch, T) with T >= 2, got {tokens.shape}"
        )
    logits = model(tokens[:, :-1], key=key)
    vocab_size = logits.shape[-1]
    labels = _ids_or_vocab_size(tokens[:, 1:], vocab_size)
    valid = labels < vocab_size
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    # A product, not a select: the NaN reaches the gradients too.
    return (losses * jnp.where(valid, 1.0, jnp.nan)).mean()


__all__ = [
    "CausalSelfAttention",
    "FeedForward",
    "ReversibleTransformer",
    "TransformerBlock",
    "next_token_loss",
]
