"""Offline datasets: everything here is generated or shipped inside an installed package."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from revjax._validate import positive_int, real_scalar


class Split(NamedTuple):
    """A train/test split: inputs float32 ``(n, features)``, labels int32 ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, shipped with sklearn).

    Pixels are standardised with the training set's per-pixel mean and std, the std floored at
    1 (one grey level of the 0-16 scale): a pixel with ink in almost no training image has a
    std near 0, and dividing by it turned a test image's ink there into outliers of up to
    1000 (seeds 5, 6, 7, 10, 14, 15 of 0-19, with the old floor 1e-3). With the floor every
    feature of every split lies within 15 of 0 for those seeds. The split is a seeded
    permutation.
    """
    fraction = real_scalar(test_fraction)
    if fraction is None or not 0.0 < fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"load_digits: seed must be an int >= 0, got {seed!r}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "revjax.data.load_digits needs scikit-learn: "
            "pip install 'revjax[test]' or 'revjax[bench]'"
        ) from err
    digits = sk_load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    if not 0 < n_test < len(x):
        raise ValueError(
            f"load_digits: test_fraction={test_fraction} leaves {n_test} of {len(x)} images for "
            "testing; both parts must be non-empty"
        )
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), np.maximum(x[train].std(0), 1.0)
    standardise = lambda a: ((a - mean) / std).astype(np.float32)
    return Split(standardise(x[train]), y[train], standardise(x[test]), y[test])


class TextSplit(NamedTuple):
    """A byte-level corpus split into training and validation parts (uint8 arrays)."""

    train: np.ndarray
    valid: np.ndarray


def load_stdlib_text(
    max_bytes: int = 2_000_000,
    valid_fraction: float = 0.1,
    modules: str | tuple[str, ...] = (),
    block_bytes: int = 4096,
) -> TextSplit:
    """A byte-level text corpus from the Python standard library's own ``.py`` source files.

    Files of the top-level stdlib directory (``Lib/``, without subpackages or tests) are read in
    sorted name order and concatenated (each followed by a newline) until ``max_bytes``. The
    bytes are cut into blocks of ``block_bytes``; every ``round(1 / valid_fraction)``-th block
    is validation data (so the fraction is ``1 / round(1 / valid_fraction)``, e.g. 1/3 for
    0.3), the rest training data: disjoint, from the same mix of files, both non-empty.
    ``modules`` restricts the corpus to the named modules (e.g. ``("typing", "argparse")``; a
    single name may be given as a string, ``"typing"``).
    Modules generated when Python is built or installed (``_sysconfigdata*``, which records the
    install paths, and ``sitecustomize``) are left out, so the result depends on the Python
    version (and on any patches a distribution applies to the stdlib), not on where it is
    installed.

    Raises:
      ValueError: ``valid_fraction`` outside ``(0, 0.5]``, ``max_bytes`` below 1000, a
        ``block_bytes`` that is not a positive int, a name in ``modules`` that is no top-level
        stdlib module, or too few bytes for one validation block.
    """
    import sysconfig
    from pathlib import Path

    fraction = real_scalar(valid_fraction)
    if fraction is None or not 0.0 < fraction <= 0.5:
        raise ValueError(
            f"load_stdlib_text: valid_fraction must be in (0, 0.5], got {valid_fraction!r}"
        )
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral):
        raise ValueError(f"load_stdlib_text: max_bytes must be an int >= 1000, got {max_bytes!r}")
    if max_bytes < 1000:
        raise ValueError(f"load_stdlib_text: max_bytes must be >= 1000, got {max_bytes}")
    block_bytes = positive_int(block_bytes, "block_bytes", "load_stdlib_text")
    root = Path(sysconfig.get_paths()["stdlib"])
    generated = lambda p: p.stem.startswith("_sysconfigdata") or p.stem == "sitecustomize"
    files = sorted(p for p in root.glob("*.py") if not generated(p))
    if isinstance(modules, str):  # one name, not a sequence of one-letter names
        modules = (modules,)
    if modules:
        files = [p for p in files if p.stem in modules]
        missing = sorted(set(modules) - {p.stem for p in files})
        if missing:
            raise ValueError(f"load_stdlib_text: no stdlib modules named {missing} in {root}")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
    # Interleaved blocks, so both parts sample the same mix of files.
    every = round(1 / valid_fraction)
    is_valid = (np.arange(len(corpus)) // block_bytes) % every == every - 1
    if not is_valid.any():
        raise ValueError(
            f"load_stdlib_text: {len(corpus)} bytes make fewer than {every} blocks of "
            f"{block_bytes}, so the validation part would be empty; "
            + (
                "raise max_bytes or lower block_bytes"
                if len(corpus) == max_bytes
                else f"the standard library holds only these {len(corpus)} bytes: lower block_bytes"
            )
        )
    return TextSplit(corpus[~is_valid].copy(), corpus[is_valid].copy())


def unigram_entropy(tokens: np.ndarray, vocab_size: int = 256) -> float:
    """Entropy ``-sum_b p_b log p_b`` (nats) of the empirical distribution of ``tokens``: the
    loss of the best model that ignores context.

    Raises:
      ValueError: no tokens, or tokens that are not integer ids in ``[0, vocab_size)`` (a
        larger id would silently widen the vocabulary).
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise ValueError("unigram_entropy: no tokens")
    if tokens.dtype.kind not in "iu" or tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(
            f"unigram_entropy: tokens must be integer ids in [0, vocab_size={vocab_size}), got "
            f"dtype {tokens.dtype}, range [{tokens.min()}, {tokens.max()}]"
        )
    counts = np.bincount(tokens.ravel(), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


__all__ = [
    "Split",
    "TextSplit",
    "load_digits",
    "load_stdlib_text",
    "unigram_entropy",
]
