"""Offline datasets: everything here is generated or shipped inside an installed package."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A train/test split: inputs float32 ``(n, features)``, labels int32 ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, shipped with sklearn).

    Pixels are standardised with the training set's per-pixel mean and std (std floored at 1e-3
    for the always-blank border pixels). The split is a seeded permutation.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction}")
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
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), np.maximum(x[train].std(0), 1e-3)
    standardise = lambda a: ((a - mean) / std).astype(np.float32)
    return Split(standardise(x[train]), y[train], standardise(x[test]), y[test])
