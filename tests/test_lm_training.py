"""Tests of revjax.models.lm_training: the byte-level LM run and its checkpoints."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from revjax.data import load_stdlib_text, unigram_entropy
from revjax.models.lm_training import LMConfig, resume, sample_batch, train_lm


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_text(300_000)


def test_reversible_and_twin_loss_curves_agree_and_learn(corpus):
    config = LMConfig(depth=3, dim=32, batch=16, steps=200, lr=1e-2, eval_every=25)
    histories = {m: train_lm(config, corpus, m)[2] for m in ("reversible", "backprop")}
    rev, twin = histories["reversible"], histories["backprop"]
    assert rev.steps == twin.steps == [25, 50, 75, 100, 125, 150, 175, 200]
    for a, b in ((rev.train_loss, twin.train_loss), (rev.eval_loss, twin.eval_loss)):
        # Issue criterion: within 1% at every logged step (same seed, float32). That alone would
        # pass wrong dropout masks (a changed key per step moved the curves by at most 1.6e-2
        # train, 4.8e-3 eval), so also 1e-4, notebook 04's bound: measured 3.8e-7 (float32
        # reconstruction round-off through 200 steps).
        gap = np.max([abs(x - y) / y for x, y in zip(a, b, strict=True)])
        assert gap <= 1e-4, gap  # NaN fails; implies the 1%
    # "Well below" the best context-free loss: at least 20% below the unigram entropy.
    entropy = unigram_entropy(corpus.valid)
    assert rev.eval_loss[-1] <= 0.8 * entropy, (rev.eval_loss, entropy)
    assert rev.eval_loss[-1] < rev.eval_loss[0]


def test_resume_from_checkpoint_continues_the_same_run(corpus, tmp_path):
    config = LMConfig(depth=2, dim=16, heads=2, seq_len=32, batch=8, steps=20, eval_every=10)
    _, _, whole = train_lm(config, corpus)
    path = tmp_path / "lm.msgpack"
    train_lm(config, corpus, stop_step=10, checkpoint=path)
    model, optimizer, step = resume(config, corpus, path)
    assert step == 10
    _, _, second_half = train_lm(config, corpus, start_step=10, model=model, optimizer=optimizer)
    assert second_half.steps == [20]
    # Same parameters, optimiser moments and batches: the resumed run is the uninterrupted one
    # (up to XLA's run-to-run float32 determinism on CPU, which is exact here).
    np.testing.assert_allclose(second_half.eval_loss, whole.eval_loss[-1:], rtol=1e-6)
    np.testing.assert_allclose(second_half.train_loss, whole.train_loss[-1:], rtol=1e-6)


def test_the_recorded_config_describes_the_saved_weights(corpus, tmp_path):
    """A run with other settings that stops before its first save must not relabel an older
    checkpoint (the config was written at the start of every run)."""
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=4, steps=4, eval_every=2)
    path = tmp_path / "lm.msgpack"
    train_lm(config, corpus, stop_step=2, checkpoint=path)
    other = dataclasses.replace(config, lr=5e-2)

    def interrupt(step, loss):  # the run is stopped after its first step, before any save
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lm(other, corpus, checkpoint=path, progress=interrupt)
    assert resume(config, corpus, path)[2] == 2
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.003, now 0\.05"):
        resume(other, corpus, path)


def test_script_resumes_from_its_checkpoint(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import report
    from benchmarks import train_lm as script

    tiny = ["--depth", "1", "--dim", "16", "--heads", "2", "--seq-len", "16", "--batch", "4"]
    tiny += ["--eval-every", "2", "--eval-batches", "1", "--max-bytes", "60000"]
    config = LMConfig(
        depth=1, dim=16, heads=2, seq_len=16, batch=4, steps=6, eval_every=2, eval_batches=1
    )
    path, text = tmp_path / "ckpt.msgpack", load_stdlib_text(60000)
    # An interrupted 6-step run: stopped after step 4, checkpointed with its config.
    train_lm(config, text, stop_step=4, checkpoint=path)
    resumed = script.main(
        [*tiny, "--steps", "6", "--resume-from", str(path), "--out", str(tmp_path)]
    )
    # The resumed reversible run starts at the checkpoint's step 4; the twin runs from 0.
    assert resumed["runs"]["reversible"]["steps"] == [6]
    assert resumed["runs"]["backprop"]["steps"] == [2, 4, 6]
    assert resumed["max_relative_gap"]["eval_loss"] <= 0.01
    # The README table pairs the curves by step, not by position.
    table = report.render_train_lm(resumed, "train_lm.json")
    rev_eval = resumed["runs"]["reversible"]["eval_loss"][0]
    assert "| 2 | - |" in table and "| 6 | " in table and f"{rev_eval:.4f}" in table

    # Different settings (here steps, which sets the learning-rate schedule) are refused.
    with pytest.raises(SystemExit):
        script.main([*tiny, "--steps", "8", "--resume-from", str(path), "--out", str(tmp_path)])
    assert "steps: checkpoint 6, now 8" in capsys.readouterr().err
    # A checkpoint at the last step leaves nothing to train: a message, not an IndexError.
    model, optimizer, _ = resume(config, text, path)
    train_lm(config, text, start_step=4, model=model, optimizer=optimizer, checkpoint=path)
    with pytest.raises(SystemExit):
        script.main([*tiny, "--steps", "6", "--resume-from", str(path), "--out", str(tmp_path)])
    assert "nothing left to train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([*tiny[:4], "--heads", "3", "--steps", "2", "--out", str(tmp_path)])
    assert "--dim 16 is not divisible by --heads 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("steps", 0), ("eval_every", 0), ("heads", 3), ("dropout", 1.0)],
        # Accepted before, failing later inside NumPy, Flax or optax (or training on nonsense).
        *[("seed", -1), ("seed", 1.5), ("warmup", -1), ("warmup", 2.5), ("lr", float("inf"))],
        *[("lr", 0.0), ("weight_decay", -0.1), ("weight_decay", float("nan"))],
        # JAX's keys need seed + 2 to fit int64: 2**63 - 1 failed with an OverflowError; and
        # 32 bits without x64: 2**32 - 2 seeded its base key with key(2**32), that is key(0).
        *[("seed", 2**32 - 2), ("seed", 2**32), ("seed", 2**63 - 1)],
    ],
)
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=f"LMConfig: .*{field}"):
        LMConfig(dim=16, **{field: value})


def test_numpy_settings_are_stored_as_python_numbers():
    """``steps=np.int64(50)`` was kept as is: ``json.dumps`` of the config then failed after
    the weights were saved, leaving another run's config beside them."""
    import json

    config = LMConfig(steps=np.int64(50), seed=np.int32(3), lr=np.float32(1e-3), dim=16, heads=2)
    assert type(config.steps) is int and type(config.seed) is int and type(config.lr) is float
    assert type(LMConfig(dim=16, heads=2, lr=jnp.float32(1e-3)).lr) is float  # a JAX scalar
    json.dumps(dataclasses.asdict(config))


def test_an_older_config_is_gone_before_the_weights_are_overwritten(corpus, tmp_path, monkeypatch):
    """Stopped between saving the weights and writing their config, the checkpoint must not be
    left with another run's config (resume would accept the pair)."""
    from revjax.models import lm_training

    checkpoint = tmp_path / "lm.msgpack"
    config_path = lm_training.config_path(checkpoint)
    config_path.write_text('{"steps": 999}')  # another run's

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_training, "save_state", stopped)
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=2, steps=1)
    with pytest.raises(KeyboardInterrupt):
        train_lm(config, corpus, checkpoint=checkpoint)
    assert not config_path.exists()
    with pytest.raises(ValueError, match="has no recorded config"):
        resume(config, corpus, checkpoint)


def test_train_lm_refuses_an_empty_range(corpus):
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=4, steps=4)
    with pytest.raises(ValueError, match="nothing to train from step 4 to 4"):
        train_lm(config, corpus, start_step=4)


def test_train_lm_refuses_a_split_shorter_than_one_window_before_building_a_model(corpus):
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=len(corpus.valid), batch=4, steps=4)
    with pytest.raises(ValueError, match=r"valid split has \d+ bytes, fewer than one window"):
        train_lm(config, corpus, model="not built: the check comes first")


def test_batches_are_windows_of_the_corpus_and_seeded(corpus):
    a = sample_batch(corpus.train, 4, 16, seed=0, step=3)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(a, sample_batch(corpus.train, 4, 16, seed=0, step=3))
    assert not np.array_equal(a, sample_batch(corpus.train, 4, 16, seed=0, step=4))
    text = corpus.train.tobytes()
    assert all(bytes(row.astype(np.uint8).tobytes()) in text for row in a)
    with pytest.raises(ValueError, match="shorter than"):
        sample_batch(corpus.train[:10], 1, 16, seed=0, step=0)
    for batch in (0, -1):  # NumPy's "need at least one array to stack", or its negative-size error
        with pytest.raises(ValueError, match="sample_batch: batch must be a positive int"):
            sample_batch(corpus.train, batch, 16, seed=0, step=0)


def test_every_window_can_be_drawn_including_the_last():
    """The upper bound of the start was one short: the last window (and so the corpus's last
    byte) was never drawn, and a corpus of exactly one window was refused."""
    corpus = np.arange(10, dtype=np.uint8)  # windows of 9 bytes start at 0 and 1
    starts = {int(row[0]) for step in range(200) for row in sample_batch(corpus, 4, 8, 0, step)}
    assert starts == {0, 1}
    one_window = sample_batch(np.arange(9, dtype=np.uint8), 3, 8, seed=0, step=0)
    np.testing.assert_array_equal(one_window, np.tile(np.arange(9, dtype=np.int32), (3, 1)))
    with pytest.raises(ValueError, match="8 bytes is shorter than one window of 9"):
        sample_batch(np.arange(8, dtype=np.uint8), 1, 8, seed=0, step=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # It said "max_bytes must be >= 1000" for 0, and for 1000 to 36864 "raise max_bytes or
        # lower block_bytes": the script has no --block-bytes, and 1000 was not enough.
        (["--max-bytes", "0"], "--max-bytes 0 leaves no validation text"),
        (["--max-bytes", "1000"], "use --max-bytes 36865 or more"),
        (["--max-bytes", "36864"], "use --max-bytes 36865 or more"),
        # Config errors named LMConfig's fields, not the script's options.
        (["--eval-batches", "0"], "error: --eval-batches must be a positive int, got 0"),
        (["--seed", str(2**63 - 1)], f"error: --seed must be < 2**32 - 2, got {2**63 - 1}"),
        # These two said "LMConfig: dim=30 is not divisible by heads=4" and "LMConfig: dropout".
        (["--dim", "30", "--heads", "4"], "error: --dim 30 is not divisible by --heads 4"),
        (["--dropout", "1.0"], "error: --dropout rate must lie in [0, 1), got 1.0"),
        (["--checkpoint", "/no/such/dir/c.msgpack"], "directory /no/such/dir does not exist"),
        # 40960 bytes hold a valid split of 4096: the window did not fit, found after the bar.
        (["--max-bytes", "40960", "--seq-len", "5000"], "--seq-len 5000: the valid split"),
    ],
)
def test_script_refuses_bad_data_and_checkpoint_paths_before_training(args, message, capsys):
    """Each used to fail with a traceback, the checkpoint one after training to the first
    logged step."""
    from benchmarks import train_lm as script

    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_script_curve_gap_reports_a_diverged_curve_as_nan():
    """max() over [0.1, nan] is 0.1: a curve that diverged mid-run once read as a small gap."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.train_lm import curve_gap

    twin = {"steps": [1, 2, 3], "loss": [2.0, 1.0, 0.5]}
    close = {"steps": [1, 2, 3], "loss": [2.2, 1.0, 0.5]}
    diverged = {"steps": [1, 2, 3], "loss": [2.2, float("nan"), 0.5]}
    assert curve_gap(close, twin, "loss") == pytest.approx(0.1)
    assert np.isnan(curve_gap(diverged, twin, "loss"))


def test_script_reports_a_nan_gap_as_nan():
    """The summary line took max() over both curves' gaps, which keeps a NaN only in first
    place: a diverged eval curve (gap NaN after a finite train gap) printed "gap 0.00e+00"."""
    from benchmarks.train_lm import largest_gap

    assert np.isnan(largest_gap([0.0, float("nan")]))
    assert np.isnan(largest_gap([float("nan"), 0.0]))
    assert largest_gap([1e-7, 3e-7]) == 3e-7


def test_resume_refuses_another_corpus(corpus, tmp_path):
    """The checkpoint recorded only LMConfig: resumed on other text (the script's --max-bytes),
    the run silently trained its second part on different data."""
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=4, steps=4, eval_every=2)
    path = tmp_path / "lm.msgpack"
    train_lm(config, corpus, stop_step=2, checkpoint=path)
    assert resume(config, corpus, path)[2] == 2
    other = load_stdlib_text(60_000)
    with pytest.raises(ValueError, match=r"corpus: checkpoint .*bytes, sha256 .* now .*bytes"):
        resume(config, other, path)
    # The same sizes with other bytes are refused too (the digest, not only the lengths).
    changed = type(corpus)(corpus.train.copy(), corpus.valid)
    changed.train[0] ^= 1
    with pytest.raises(ValueError, match="corpus: checkpoint"):
        resume(config, changed, path)


def test_train_lm_refuses_a_start_step_its_optimizer_is_not_at(corpus, tmp_path):
    """A resumed optimizer with the default start_step=0 ran the schedule past its end (and
    logged wrong steps); start_step > 0 with a new optimizer started the schedule at 0."""
    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=4, steps=4, eval_every=2)
    model, optimizer, _ = train_lm(config, corpus, stop_step=2)
    with pytest.raises(ValueError, match="start_step=0 but the given optimizer has made 2"):
        train_lm(config, corpus, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="start_step=2 but a new optimiser starts at 0"):
        train_lm(config, corpus, start_step=2)
    history = train_lm(config, corpus, start_step=2, model=model, optimizer=optimizer)[2]
    assert history.steps == [4]


def test_train_lm_refuses_a_model_that_is_not_configs_or_an_optimizer_without_its_model(
    corpus, tmp_path
):
    """An optimizer without its model drove a fresh random model with the old moments (eval
    loss 5.90 against 5.86 uninterrupted); a model of other sizes was trained and checkpointed
    under config's, which resume then could not restore; method= was ignored for a given
    model."""
    from revjax.models.lm_training import make_model

    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=2, steps=4, eval_every=2)
    _, optimizer, _ = train_lm(config, corpus, stop_step=2)
    with pytest.raises(ValueError, match="optimizer= was given without its model="):
        train_lm(config, corpus, start_step=2, optimizer=optimizer)
    bigger = make_model(dataclasses.replace(config, depth=2, dim=32))
    with pytest.raises(ValueError, match=r"are not those config \(depth=1, dim=16, heads=2"):
        train_lm(config, corpus, model=bigger, checkpoint=tmp_path / "c.msgpack")
    assert not (tmp_path / "c.msgpack").exists()
    with pytest.raises(ValueError, match=r"are not those config"):  # same shapes, 4 heads
        train_lm(config, corpus, model=make_model(dataclasses.replace(config, heads=4)))
    with pytest.raises(ValueError, match=r"method='reversible' but .* method='backprop'"):
        train_lm(config, corpus, model=make_model(config, "backprop"))


def test_train_lm_trains_a_model_handed_over_in_eval_mode_with_dropout(corpus):
    """A model in eval mode trained without dropout until evaluate() switched it back to
    training mode: its run differed from the same model's in training mode."""
    from revjax.models.lm_training import make_model

    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=2, steps=2, dropout=0.3)
    as_built = train_lm(config, corpus, model=make_model(config))[2]
    evaluated = make_model(config)
    evaluated.eval()
    after_eval = train_lm(config, corpus, model=evaluated)[2]
    assert after_eval.train_loss == as_built.train_loss
    assert after_eval.eval_loss == as_built.eval_loss


def test_script_refuses_a_checkpoint_whose_weights_are_gone(corpus, tmp_path, capsys):
    """A recorded config without its weights file ended in a FileNotFoundError traceback."""
    from benchmarks import train_lm as script

    config = LMConfig(depth=1, dim=16, heads=2, seq_len=16, batch=2, steps=4, eval_every=2)
    path = tmp_path / "c.msgpack"
    train_lm(config, corpus, stop_step=2, checkpoint=path)
    path.unlink()
    args = ["--depth", "1", "--dim", "16", "--heads", "2", "--seq-len", "16", "--batch", "2",
            "--steps", "4", "--eval-every", "2", "--max-bytes", "300000"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        script.main([*args, "--resume-from", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "No such file or directory" in capsys.readouterr().err
