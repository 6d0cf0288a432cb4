"""Training loop of the byte-level language model (:mod:`revjax.models.transformer`).

Pure pieces (batch sampling, the jitted train and eval steps) plus :func:`train_lm`, which
trains one model with optax AdamW and logs train and validation loss. Batches depend only on
``(seed, step)``, so a run resumed from a checkpoint sees exactly the batches it would have seen,
and two runs with different ``method`` (reversible vs its twin) see identical data and keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from revjax._validate import check_dropout_rate, positive_int
from revjax.data import TextSplit
from revjax.models.transformer import ReversibleTransformer, next_token_loss
from revjax.nnx import Method, restore_state, save_state

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Model and optimisation settings of a language-model run.

    The learning rate rises linearly from 0 to ``lr`` over ``warmup`` steps, then decays to 0
    along a cosine until ``steps``. ``warmup >= steps`` is allowed (a short smoke run keeps the
    default warm-up): the run then ends before the rate reaches ``lr``."""

    depth: int = 4
    dim: int = 64
    heads: int = 4
    seq_len: int = 64
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 20
    dropout: float = 0.1
    eval_every: int = 25
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        """Checks every setting and stores it as a Python ``int``/``float`` (a NumPy or JAX
        scalar is accepted), so the config is written to JSON like one of Python numbers.

        Raises:
          ValueError: a count below 1, ``dim`` not divisible by ``heads``, a negative or
            non-integer ``warmup`` or ``seed``, ``lr`` not finite and > 0, ``weight_decay``
            not finite and >= 0, a dropout rate outside ``[0, 1)``.
        """
        counts = ("depth", "dim", "heads", "seq_len", "batch", "steps", "eval_every")
        for name in (*counts, "eval_batches"):
            object.__setattr__(self, name, positive_int(getattr(self, name), name, "LMConfig"))
        for name in ("warmup", "seed"):  # 0 allowed
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"LMConfig: {name} must be an int >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.seed >= SEED_LIMIT:  # seed + 2 seeds a key, and JAX's keys hold 32 bits
            raise ValueError(f"LMConfig: seed must be < 2**32 - 2, got {self.seed}")
        if self.dim % self.heads:
            raise ValueError(f"LMConfig: dim={self.dim} is not divisible by heads={self.heads}")
        for name, low, open_low in (("lr", 0.0, True), ("weight_decay", 0.0, False)):
            value = getattr(self, name)
            real = not isinstance(value, bool | str) and np.ndim(value) == 0
            real = real and np.asarray(value).dtype.kind in "iuf"  # no bool, complex, object
            if not (real and math.isfinite(value) and (value > low if open_low else value >= low)):
                bound = "> 0" if open_low else ">= 0"
                raise ValueError(f"LMConfig: {name} must be a finite number {bound}, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_dropout_rate(self.dropout, "LMConfig")
        object.__setattr__(self, "dropout", float(self.dropout))


#: Seeds are below this: ``jax.random.key(seed + 2)`` keeps 32 bits without x64, so
#: ``seed = 2**32 - 2`` gave the base key of ``key(0)`` (and 2**63 an ``OverflowError``).
SEED_LIMIT = 2**32 - 2


def corpus_fingerprint(corpus: TextSplit) -> dict[str, Any]:
    """What identifies the text a run trains and evaluates on: the splits' sizes and the
    SHA-256 of both (recorded with a checkpoint, compared by :func:`resume`)."""
    digest = hashlib.sha256()
    for split in (corpus.train, corpus.valid):
        data = np.ascontiguousarray(split)
        digest.update(str((data.dtype.str, data.shape)).encode())
        digest.update(data.tobytes())
    return {"train": len(corpus.train), "valid": len(corpus.valid), "sha256": digest.hexdigest()}


#: Settings a checkpoint's continuation must share with the run that wrote it: the learning-rate
#: schedule, the batches, the keys and the shapes depend on them (evaluation settings do not).
TRAJECTORY_FIELDS = (
    "depth",
    "dim",
    "heads",
    "seq_len",
    "batch",
    "steps",
    "lr",
    "weight_decay",
    "warmup",
    "dropout",
    "seed",
)


def config_path(checkpoint: str | Path) -> Path:
    """Where :func:`train_lm` records the config of ``checkpoint``: ``<checkpoint>.config.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".config.json")


class History(NamedTuple):
    """Logged losses (nats per byte) at ``steps``; ``train_loss`` is the loss of that step's
    batch, ``eval_loss`` the mean over the fixed validation batches."""

    steps: list[int]
    train_loss: list[float]
    eval_loss: list[float]
    seconds: float


def sample_batch(corpus: np.ndarray, batch: int, length: int, seed: int, step: int) -> np.ndarray:
    """``batch`` windows of ``length + 1`` consecutive bytes at offsets drawn from
    ``(seed, step)``: int32 ``(batch, length + 1)``.

    Every window of the corpus can be drawn: the starts are uniform over
    ``0 .. len(corpus) - length - 1``, so a corpus of exactly ``length + 1`` bytes has one.

    Raises:
      ValueError: ``batch`` or ``length`` is not a positive int; the corpus is shorter than
        ``length + 1`` bytes (no whole window).
    """
    batch = positive_int(batch, "batch", "sample_batch")
    length = positive_int(length, "length", "sample_batch")
    if len(corpus) < length + 1:
        raise ValueError(
            f"sample_batch: corpus of {len(corpus)} bytes is shorter than one window of "
            f"{length + 1} (length + 1)"
        )
    # integers' upper bound is exclusive: the last window starts at len(corpus) - length - 1.
    starts = np.random.default_rng((seed, step)).integers(0, len(corpus) - length, batch)
    return np.stack([corpus[s : s + length + 1] for s in starts]).astype(np.int32)


def make_model(config: LMConfig, method: Method = "reversible") -> ReversibleTransformer:
    """The model of ``config``; the same seed gives the same parameters for every method."""
    return ReversibleTransformer(
        VOCAB_SIZE,
        config.dim,
        config.depth,
        config.heads,
        config.seq_len,
        dropout=config.dropout,
        method=method,
        rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )


def _check_model_matches(model: ReversibleTransformer, config: LMConfig, method: Method) -> None:
    """Refuse a given model that is not ``config``'s (it was trained, then checkpointed under
    ``config``'s sizes, which resume could not restore) or not built for ``method`` (which
    was ignored)."""
    if not isinstance(model, ReversibleTransformer):
        raise TypeError(
            f"train_lm: model must be a ReversibleTransformer, got {type(model).__name__}"
        )
    expected = nnx.state(nnx.eval_shape(lambda: make_model(config, method)), nnx.Param)
    given = nnx.state(model, nnx.Param)
    shapes = lambda state: [a.shape for a in jax.tree.leaves(state)]
    heads = getattr(getattr(model.stack.blocks, "f", None), "heads", config.heads)
    if (
        jax.tree.structure(expected) != jax.tree.structure(given)
        or shapes(expected) != shapes(given)
        or heads != config.heads  # the same parameter shapes, another computation
    ):
        raise ValueError(
            "train_lm: the given model's parameters (or heads) are not those config "
            f"(depth={config.depth}, dim={config.dim}, heads={config.heads}, "
            f"seq_len={config.seq_len}) gives; build it with make_model(config, method)"
        )
    if model.stack.method != method:
        raise ValueError(
            f"train_lm: method={method!r} but the given model was built with "
            f"method={model.stack.method!r}"
        )


def make_optimizer(model: ReversibleTransformer, config: LMConfig) -> nnx.Optimizer:
    """AdamW with linear warm-up to ``lr`` then cosine decay to 0 at ``steps``."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup, max(config.steps, config.warmup + 1)
    )
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def functional_train_step(
    model: ReversibleTransformer, optimizer: nnx.Optimizer
) -> tuple[Callable[..., tuple[jax.Array, nnx.State]], nnx.State]:
    """The training step as a pure function of the split state, for ``jax.jit`` with donation
    and for compiled-memory analysis: ``(step, state)`` with ``state = nnx.state((model,
    optimizer))`` and ``step(state, tokens, key=None) -> (loss, new_state)``."""
    graphdef, state = nnx.split((model, optimizer))

    def step(state: nnx.State, tokens: jax.Array, key: jax.Array | None = None):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens, key)
        optimizer.update(model, grads)
        return loss, nnx.state((model, optimizer))

    return step, state


@nnx.jit
def train_step(
    model: ReversibleTransformer,
    optimizer: nnx.Optimizer,
    tokens: jax.Array,
    key: jax.Array | None,
) -> jax.Array:
    """One AdamW step on ``tokens (B, T + 1)``; returns the batch loss before the update."""
    loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens, key)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: ReversibleTransformer, tokens: jax.Array) -> jax.Array:
    """The mean next-byte loss (nats) of ``tokens (B, T + 1)``. No key is passed, so in
    training mode the stack draws dropout masks from its own stream: call it in eval mode (as
    :func:`evaluate` does) for a deterministic loss."""
    return next_token_loss(model, tokens)


def evaluate(model: ReversibleTransformer, batches: list[np.ndarray]) -> float:
    """Mean loss over ``batches`` with dropout off; leaves the model in training mode."""
    model.eval()
    loss = float(np.mean([float(eval_step(model, b)) for b in batches]))
    model.train()
    return loss


def train_lm(
    config: LMConfig,
    corpus: TextSplit,
    method: Method = "reversible",
    *,
    start_step: int = 0,
    stop_step: int | None = None,
    model: ReversibleTransformer | None = None,
    optimizer: nnx.Optimizer | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[ReversibleTransformer, nnx.Optimizer, History]:
    """Trains for steps ``[start_step, stop_step)`` (default: to ``config.steps``).

    Losses are logged at every ``eval_every``-th step and at the last one. With ``model`` and
    ``optimizer`` (e.g. restored by :func:`resume`) training continues them; ``checkpoint``
    saves both at every logged step (overwriting), so it always holds the latest logged state,
    and records ``config`` and the corpus's :func:`corpus_fingerprint` beside it
    (:func:`config_path`) for :func:`resume` to check. ``progress(step, loss)`` is called after
    every step.

    Raises:
      ValueError: ``start_step >= stop_step`` (nothing to train) or ``stop_step`` beyond
        ``config.steps``; ``start_step`` is not the given ``optimizer``'s step count (its
        learning-rate schedule would be off by the difference), or not 0 without one (a new
        optimiser starts at 0); a split of ``corpus`` shorter than one window of
        ``config.seq_len + 1`` bytes (refused before any model is built); an ``optimizer``
        without its ``model``; a ``model`` whose parameter shapes are not ``config``'s or
        built for another ``method``.
      TypeError: ``model`` is not a :class:`ReversibleTransformer`.

    A given model is switched to training mode (``model.train()``) before the first step.
    """
    stop_step = config.steps if stop_step is None else stop_step
    if not 0 <= start_step < stop_step <= config.steps:
        raise ValueError(
            f"train_lm: nothing to train from step {start_step} to {stop_step} (need "
            f"0 <= start < stop <= steps = {config.steps})"
        )
    updates = 0 if optimizer is None else int(optimizer.step[...])
    if start_step != updates:
        given = "a new optimiser starts at 0" if optimizer is None else "the given optimizer"
        raise ValueError(
            f"train_lm: start_step={start_step} but {given} has made {updates} updates; "
            "continue a run with start_step equal to its optimiser's step count (resume "
            "returns it), or the batches and the learning-rate schedule disagree"
        )
    for name, split in (("train", corpus.train), ("valid", corpus.valid)):
        if len(split) < config.seq_len + 1:
            raise ValueError(
                f"train_lm: the corpus's {name} split has {len(split)} bytes, fewer than one "
                f"window of seq_len + 1 = {config.seq_len + 1}; use a shorter seq_len or more text"
            )
    if model is None:
        if optimizer is not None:  # its moments and step count would drive a fresh model
            raise ValueError(
                "train_lm: optimizer= was given without its model=; pass both (resume returns "
                "both) or neither"
            )
        model = make_model(config, method)
    else:
        _check_model_matches(model, config, method)
    model.train()  # a model handed over in eval mode trained without dropout until evaluate()
    optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
    valid = [
        sample_batch(corpus.valid, config.batch, config.seq_len, config.seed + 1, i)
        for i in range(config.eval_batches)
    ]
    base_key = jax.random.key(config.seed + 2)
    fingerprint = None if checkpoint is None else {"corpus": corpus_fingerprint(corpus)}
    steps, train_losses, eval_losses = [], [], []
    start = time.perf_counter()
    for step in range(start_step, stop_step):
        tokens = sample_batch(corpus.train, config.batch, config.seq_len, config.seed, step)
        loss = float(train_step(model, optimizer, tokens, jax.random.fold_in(base_key, step)))
        if progress is not None:
            progress(step, loss)
        if (step + 1) % config.eval_every == 0 or step + 1 == stop_step:
            steps.append(step + 1)
            train_losses.append(loss)
            eval_losses.append(evaluate(model, valid))
            if checkpoint is not None:
                # The config is written with the weights it describes, never before them (a
                # run stopped before its first save must not relabel an older checkpoint). An
                # older run's config goes first: stopped between the two writes, the weights
                # have no config, which resume refuses, instead of another run's.
                recorded = json.dumps(dataclasses.asdict(config) | fingerprint, indent=2)
                config_path(checkpoint).unlink(missing_ok=True)
                save_state((model, optimizer), checkpoint)
                partial = config_path(checkpoint).with_suffix(".partial")
                partial.write_text(recorded)
                os.replace(partial, config_path(checkpoint))  # whole or not at all
    seconds = time.perf_counter() - start
    return model, optimizer, History(steps, train_losses, eval_losses, seconds)


def resume(
    config: LMConfig, corpus: TextSplit, checkpoint: str | Path, method: Method = "reversible"
) -> tuple[ReversibleTransformer, nnx.Optimizer, int]:
    """``(model, optimizer, step)`` restored from :func:`train_lm`'s ``checkpoint`` file;
    ``step`` (the optimiser's update count) is where training continues, on ``corpus``.

    Raises:
      ValueError: ``config`` differs from the checkpoint's recorded config in a setting the
        trajectory depends on (:data:`TRAJECTORY_FIELDS`; e.g. ``steps``, which sets the
        learning-rate schedule), ``corpus`` is not the text the checkpoint was trained on
        (:func:`corpus_fingerprint`), or the checkpoint has no recorded config.
    """
    recorded = config_path(checkpoint)
    if not recorded.exists():
        raise ValueError(f"resume: {checkpoint} has no recorded config ({recorded} is missing)")
    saved = json.loads(recorded.read_text())
    differ = {
        name: (saved.get(name), getattr(config, name))
        for name in TRAJECTORY_FIELDS
        if saved.get(name) != getattr(config, name)
    }
    now = corpus_fingerprint(corpus)
    if saved.get("corpus") != now:
        was = saved.get("corpus", "not recorded")
        if isinstance(was, dict):  # sizes say more than digests
            was = f"{was.get('train')}+{was.get('valid')} bytes, sha256 {was.get('sha256')}"
        differ["corpus"] = (was, f"{now['train']}+{now['valid']} bytes, sha256 {now['sha256']}")
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"resume: {checkpoint} was trained with different settings ({details}); a "
            "continuation must use the same ones to be the same run"
        )
    model = make_model(config, method)
    optimizer = make_optimizer(model, config)
    restore_state((model, optimizer), checkpoint)
    return model, optimizer, int(optimizer.step[...])


__all__ = [
    "VOCAB_SIZE",
    "History",
    "LMConfig",
    "corpus_fingerprint",
    "eval_step",
    "evaluate",
    "functional_train_step",
    "make_model",
    "make_optimizer",
    "resume",
    "sample_batch",
    "train_lm",
    "train_step",
]
