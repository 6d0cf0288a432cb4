"""data: offline digits split."""

import numpy as np
import pytest

from revjax.data import load_digits


def test_digits_split_is_disjoint_standardised_and_seeded():
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert set(np.unique(a.y_train)) == set(range(10))
    assert np.abs(a.x_train.mean(0)).max() < 1e-4  # standardised with training statistics
    assert not np.array_equal(load_digits(seed=1).y_test, a.y_test)


def test_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)
