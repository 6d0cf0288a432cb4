"""data: offline digits split."""

from pathlib import Path

import numpy as np
import pytest

from revjax.data import load_digits, load_stdlib_text, unigram_entropy


def test_digits_split_is_disjoint_standardised_and_seeded():
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert set(np.unique(a.y_train)) == set(range(10))
    assert np.abs(a.x_train.mean(0)).max() < 1e-4  # standardised with training statistics
    # Unit spread where the raw spread is at least one grey level; below, the floor of 1 keeps
    # the raw spread (blank pixels stay 0).
    spread = a.x_train.std(0)  # the raw spread divided by max(raw spread, 1)
    assert spread.max() <= 1.0 + 1e-3
    from sklearn.datasets import load_digits as sk_load_digits

    images = sk_load_digits().data
    order = np.random.default_rng(0).permutation(len(images))
    raw_std = images[order[359:]].std(0)
    np.testing.assert_allclose(spread[raw_std >= 1], 1.0, atol=1e-3)
    np.testing.assert_allclose(spread[raw_std < 1], raw_std[raw_std < 1], atol=1e-3)
    # A partition of scikit-learn's images: standardising is one injective affine map per
    # pixel, so a picture in both parts (or in neither) would change the count of distinct rows.
    both = np.concatenate([a.x_train, a.x_test])
    distinct = len(np.unique(sk_load_digits().data, axis=0))
    assert len(both) == 1797 and len(np.unique(both, axis=0)) == distinct
    assert not np.array_equal(load_digits(seed=1).y_test, a.y_test)


@pytest.mark.parametrize("seed", [0, 5, 6, 7, 10, 14, 15])
def test_digits_test_features_are_on_the_training_scale(seed):
    """A pixel with ink in one image only has training std 0 when that image is in the test
    split (seeds 5, 6, 7, 10, 14, 15): the std was floored at 1e-3, so the test image's pixel
    became 1000 while no training feature passed 38. Now both stay within 15 (measured 14.9)."""
    data = load_digits(seed=seed)
    assert np.abs(data.x_test).max() <= 15 and np.abs(data.x_train).max() <= 15


def test_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)
    with pytest.raises(ValueError, match="leaves 0 of 1797 images for testing"):
        load_digits(test_fraction=1e-4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: load_digits(test_fraction="0.2"), r"test_fraction must be in \(0, 1\), got '0.2'"),
        (lambda: load_digits(seed=-1), "seed must be an int >= 0, got -1"),
        (lambda: load_digits(seed=1.5), "seed must be an int >= 0, got 1.5"),
        (lambda: load_stdlib_text(5000.0), "max_bytes must be an int >= 1000, got 5000.0"),
        (lambda: load_stdlib_text(float("nan")), "max_bytes must be an int >= 1000, got nan"),
        (lambda: unigram_entropy(np.array([1, 2, 300])), r"in \[0, vocab_size=256\), .*\[1, 300\]"),
        (lambda: unigram_entropy(np.array([-1, 2])), r"ids in \[0, vocab_size=256\)"),
        (lambda: unigram_entropy(np.array([0.5, 2.0])), "got dtype float64"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(call, message):
    """Each failed with a NumPy or slicing message (seed=-1, max_bytes=5000.0), or, for ids
    beyond the vocabulary, silently widened it; found by a bad-input audit."""
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("block_bytes", [0, -5, 2.5])
def test_stdlib_text_refuses_a_bad_block_size(block_bytes):
    """0 divided by zero (and then blamed "fewer than 10 blocks of 0"); -5 split on nonsense."""
    with pytest.raises(ValueError, match="load_stdlib_text: block_bytes must be a positive int"):
        load_stdlib_text(20_000, block_bytes=block_bytes)


def test_stdlib_text_too_short_for_its_blocks_gives_advice_that_can_work():
    """Asking for more text than the standard library holds said "raise max_bytes", which
    cannot help there; only a smaller block does."""
    with pytest.raises(ValueError, match=r"the standard library holds only these \d+ bytes"):
        load_stdlib_text(10**12, block_bytes=10**6)
    with pytest.raises(ValueError, match="raise max_bytes or lower block_bytes"):
        load_stdlib_text(5_000, modules=("typing",), block_bytes=1000)


def test_stdlib_text_is_disjoint_interleaved_and_bounded():
    from revjax.data import unigram_entropy

    split = load_stdlib_text(100_000, valid_fraction=0.1, block_bytes=1000)
    assert split.train.dtype == np.uint8
    assert len(split.train) + len(split.valid) == 100_000
    assert len(split.valid) == 10_000  # every 10th block of 1000 bytes
    assert b"def " in split.train.tobytes() and b"def " in split.valid.tobytes()
    # Bytes of text: an entropy between that of a constant (0) and uniform bytes (log 256).
    assert 2.0 < unigram_entropy(split.train) < np.log(256)
    assert unigram_entropy(np.zeros(10, np.uint8)) == 0.0
    only = load_stdlib_text(5_000, modules=("typing",), block_bytes=100)
    # Built by hand: typing.py's first 5000 bytes, every 10th block of 100 held out.
    import sysconfig

    raw = (Path(sysconfig.get_paths()["stdlib"]) / "typing.py").read_bytes()[:5_000]
    blocks = [raw[i : i + 100] for i in range(0, 5_000, 100)]
    assert only.valid.tobytes() == b"".join(blocks[9::10])
    assert only.train.tobytes() == b"".join(b for i, b in enumerate(blocks) if i % 10 != 9)
    with pytest.raises(ValueError, match="no stdlib modules named"):
        load_stdlib_text(5_000, modules=("no_such_module",))
    # One name as a string is one module (it was read as the names "t", "y", "p", ...).
    one = load_stdlib_text(5_000, modules="typing", block_bytes=100)
    assert one.train.tobytes() == only.train.tobytes()
    with pytest.raises(ValueError, match=r"no stdlib modules named \['no_such_module'\]"):
        load_stdlib_text(5_000, modules="no_such_module")
    with pytest.raises(ValueError, match="valid_fraction"):
        load_stdlib_text(5_000, valid_fraction=0.0)
    with pytest.raises(ValueError, match="valid_fraction"):
        load_stdlib_text(5_000, valid_fraction=0.9)  # would leave no training data
    with pytest.raises(ValueError, match="validation part would be empty"):
        load_stdlib_text(5_000, block_bytes=4096)
    with pytest.raises(ValueError, match="no tokens"):
        unigram_entropy(np.zeros(0, np.uint8))


def test_stdlib_text_leaves_out_build_generated_modules():
    """_sysconfigdata* records the machine's install paths: in the corpus it would make the
    benchmark's data depend on where Python is installed."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    generated = sorted(root.glob("_sysconfigdata*.py"))
    if not generated:
        pytest.skip("this Python has no _sysconfigdata module in its stdlib directory")
    corpus = load_stdlib_text(2_000_000)  # past every underscore module in sorted order
    marker = generated[0].read_bytes()[:40]  # its header comment
    assert all(marker not in part.tobytes() for part in (corpus.train, corpus.valid))
