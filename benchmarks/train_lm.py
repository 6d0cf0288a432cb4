"""Byte-level language model on the Python standard library's source: reversible vs twin.

Trains :class:`revjax.models.transformer.ReversibleTransformer` with AdamW twice from the same
seed, once reversible (``revjax.nnx.Stack``, no stored activations) and once as its plain
backprop twin, and records both loss curves, their largest relative difference, and the
corpus's unigram entropy (the loss of the best context-free model). Shows a progress bar.

    python benchmarks/train_lm.py                       # CPU size, ~2 minutes on 2 cores
    python benchmarks/train_lm.py --steps 2000 --dim 256 --depth 12 --out DIR
    python benchmarks/train_lm.py --checkpoint ckpt.msgpack     # saved at every logged step
    python benchmarks/train_lm.py --resume-from ckpt.msgpack    # continues at its step (same
                                                                # settings, else refused)

Writes ``train_lm_<backend>.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_argument, environment, write_json
from revjax._validate import output_path_problem
from revjax.data import load_stdlib_text, unigram_entropy
from revjax.models.lm_training import LMConfig, resume, train_lm

METHODS = ("reversible", "backprop")


def largest_gap(gaps) -> float:
    """The largest of ``gaps``, NaN if any is NaN (``max`` keeps a NaN only in first place)."""
    gaps = list(gaps)
    return float("nan") if any(math.isnan(g) for g in gaps) else max(gaps)


def least_text() -> int:
    """The fewest bytes for which :func:`load_stdlib_text` (at its default block size and
    validation fraction, as used here) has a validation split: one byte into the first
    held-out block."""
    defaults = inspect.signature(load_stdlib_text).parameters
    every = round(1 / defaults["valid_fraction"].default)
    return (every - 1) * defaults["block_bytes"].default + 1


def as_option(message: str) -> str:
    """An ``LMConfig`` error in the words of this command line: ``LMConfig: eval_batches
    must ...`` becomes ``--eval-batches must ...``, ``LMConfig: dim=30 is not divisible by
    heads=4`` becomes ``--dim 30 is not divisible by --heads 4``, ``LMConfig: dropout rate
    ...`` becomes ``--dropout rate ...``."""
    prefix = "LMConfig: "
    if not message.startswith(prefix):
        return message
    body = message[len(prefix) :]
    for field in dataclasses.fields(LMConfig):
        option = "--" + field.name.replace("_", "-")
        body = re.sub(rf"(?<![\w-]){field.name}=", f"{option} ", body)
        body = re.sub(rf"^{field.name}(?= )", option, body)
    return body


def curve_gap(a: dict, b: dict, key: str) -> float:
    """Largest ``|a - b| / |b|`` of ``key`` over the steps both histories logged."""
    b_at = dict(zip(b["steps"], b[key], strict=True))
    gaps = [
        abs(x - b_at[s]) / abs(b_at[s])
        for s, x in zip(a["steps"], a[key], strict=True)
        if s in b_at
    ]
    # A NaN gap (a diverged curve) is the answer, not a value for max() to skip.
    return float("nan") if not gaps or any(math.isnan(g) for g in gaps) else max(gaps)


def progress_bar(total: int, label: str):
    """A tqdm bar when tqdm is installed (the ``bench`` extra), else a line every 10%."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=label, unit="step", leave=True)

        def update(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if bar.n == total:
                bar.close()

        return update

    def report(step: int, loss: float) -> None:
        if (step + 1) % max(1, total // 10) == 0:
            print(f"{label}: step {step + 1}/{total} loss {loss:.3f}", flush=True)

    return report


#: Help text of each :class:`LMConfig` field's option.
CONFIG_HELP = {
    "depth": "reversible blocks",
    "dim": "model width",
    "heads": "attention heads (must divide --dim)",
    "seq_len": "context length in bytes",
    "batch": "sequences per step",
    "steps": "training steps",
    "lr": "peak AdamW learning rate (warm-up, then cosine decay to 0)",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear warm-up steps",
    "dropout": "dropout rate in attention and MLP",
    "eval_every": "steps between held-out evaluations",
    "eval_batches": "held-out batches per evaluation",
    "seed": "seed of the initialisation, the batches and the dropout masks",
}


def main(argv: list[str] | None = None) -> dict:
    defaults = LMConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(LMConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"{CONFIG_HELP[field.name]} (default: {default})",
        )
    parser.add_argument(
        "--max-bytes", type=int, default=500_000,
        help="bytes of the standard library's source to train and evaluate on (default: 500000)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="save the reversible model and optimiser here at every logged step (and its "
        "config beside it, as CHECKPOINT.config.json)",
    )
    parser.add_argument(
        "--resume-from", type=Path, help="continue the reversible run from this checkpoint"
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    problem = None if args.checkpoint is None else output_path_problem(args.checkpoint)
    if problem is not None:  # else training runs to the first logged step, then fails
        parser.error(f"--checkpoint {args.checkpoint}: {problem}")
    try:
        config = LMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LMConfig)})
    except ValueError as err:  # "LMConfig: eval_batches ..." names the option, --eval-batches
        parser.error(as_option(str(err)))
    if args.max_bytes < least_text():  # else no validation split (load_stdlib_text's blocks)
        parser.error(
            f"--max-bytes {args.max_bytes} leaves no validation text (load_stdlib_text holds "
            f"out whole blocks of its text); use --max-bytes {least_text()} or more"
        )
    corpus = load_stdlib_text(args.max_bytes)
    try:
        for name, split in (("train", corpus.train), ("valid", corpus.valid)):
            if len(split) < config.seq_len + 1:  # else it fails once the first bar is drawn
                raise ValueError(
                    f"--seq-len {config.seq_len}: the {name} split of --max-bytes "
                    f"{args.max_bytes} has {len(split)} bytes, fewer than one window of "
                    f"{config.seq_len + 1}; use a shorter --seq-len or a larger --max-bytes"
                )
        resumed = None
        if args.resume_from is not None:
            resumed = resume(config, corpus, args.resume_from, "reversible")
            if resumed[2] >= config.steps:
                raise ValueError(
                    f"{args.resume_from} is at step {resumed[2]}, the run's last (--steps "
                    f"{config.steps}): nothing left to train"
                )
    except (ValueError, FileNotFoundError) as err:  # a config whose weights file is gone
        parser.error(str(err))

    runs = {}
    for method in METHODS:
        state, start = {}, 0
        if method == "reversible" and resumed is not None:
            model, optimizer, start = resumed
            state = {"model": model, "optimizer": optimizer}
        _, _, history = train_lm(
            config,
            corpus,
            method,
            start_step=start,
            checkpoint=args.checkpoint if method == "reversible" else None,
            progress=progress_bar(config.steps - start, method),
            **state,
        )
        runs[method] = history._asdict()

    rev, twin = runs["reversible"], runs["backprop"]
    payload = {
        "config": dataclasses.asdict(config) | {"max_bytes": args.max_bytes},
        "corpus_bytes": {"train": len(corpus.train), "valid": len(corpus.valid)},
        "unigram_entropy_valid": unigram_entropy(corpus.valid),
        "runs": runs,
        "max_relative_gap": {
            "train_loss": curve_gap(rev, twin, "train_loss"),
            "eval_loss": curve_gap(rev, twin, "eval_loss"),
        },
        "env": environment(),
    }
    import jax

    path = write_json(f"train_lm_{jax.default_backend()}.json", payload, args.out)
    print(
        f"final eval loss: reversible {rev['eval_loss'][-1]:.4f}, twin {twin['eval_loss'][-1]:.4f} "
        f"nats/byte (unigram entropy {payload['unigram_entropy_valid']:.4f}); largest relative "
        f"gap {largest_gap(payload['max_relative_gap'].values()):.2e}; wrote {path}"
    )
    return payload


if __name__ == "__main__":
    main()
