"""The demo trains all three methods to the same accuracy and reports flat reversible memory."""

import json
import re

import pytest

from revjax.__main__ import main
from revjax.demo import run


def test_demo_table(capsys, tmp_path):
    rows = run(depth=4, deep=32, epochs=4, json_path=tmp_path / "demo.json")
    out = capsys.readouterr().out
    assert "epoch  4/4" in out and "| method |" in out
    by = {r["method"]: r for r in rows}
    assert set(by) == {"backprop", "checkpoint", "reversible"}
    # Same init, same data order: reversible training tracks backprop up to round-off.
    for method in ("checkpoint", "reversible"):
        assert by[method]["test_acc"] == pytest.approx(by["backprop"]["test_acc"], abs=0.01)
    assert by["backprop"]["test_acc"] > 0.9
    assert by["reversible"]["grad_err"] <= 1e-5
    assert by["checkpoint"]["grad_err"] <= 1e-6  # the same arithmetic, recomputed
    # Reversible temp memory is flat in depth (within 5%); backprop's grows.
    assert by["reversible"]["temp_deep"] <= 1.05 * by["reversible"]["temp_shallow"]
    assert by["backprop"]["temp_deep"] > 4 * by["backprop"]["temp_shallow"]
    # Checkpointing stores one stream per layer: between the two.
    assert by["reversible"]["temp_deep"] < by["checkpoint"]["temp_deep"]
    assert by["checkpoint"]["temp_deep"] < by["backprop"]["temp_deep"]
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["rows"] == rows and record["seconds"] > 0
    # Where and with what, as every benchmark result records it (it had no date or versions).
    assert {"date", "device", "jax", "jaxlib", "flax", "python", "cpu_count"} <= set(record["env"])


def test_cli_usage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "compare", "bench"))
    assert main(["nonsense"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'nonsense'" in captured.err and captured.out == ""
    # Subcommand help: plain text (no reST backticks) and every option's default.
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text
    for option in ("--depth", "--deep", "--epochs", "--seed"):
        assert re.search(rf"{option} \S+ [^-]*\(default: \d+\)", text), (option, text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--depth", "-1"], "--depth must be >= 1, got -1"),
        (["--deep", "0"], "--deep must be >= 1, got 0"),
        # Both crashed with a traceback (NumPy's generator, then jax.random.key) and exit 1.
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--seed", str(2**70)], f"--seed must be in [0, 2**32), got {2**70}"),
        (["--json", "/no/such/dir/demo.json"], "directory /no/such/dir does not exist"),
        # A directory passed the old check and failed after the training (IsADirectoryError).
        (["--json", "/"], "--json /: / is a directory; name a file"),
    ],
)
def test_demo_refuses_bad_arguments_before_training(args, message, capsys):
    from revjax.demo import main as demo_main

    with pytest.raises(SystemExit) as exit_info:
        demo_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # Crashed with UnboundLocalError after building everything.
        ({"epochs": 0}, r"demo\.run: epochs must be a positive int, got 0"),
        # Trained nothing and printed the untrained accuracy (0.134) for every method.
        ({"batch": 5000}, r"demo\.run: batch=5000 is larger than the training set \(1438 "),
        ({"depth": 0}, r"demo\.run: depth must be a positive int, got 0"),  # named init_mlp
        ({"lr": -1.0}, r"demo\.run: lr must be finite and > 0, got -1\.0"),  # was accepted
    ],
)
def test_run_refuses_bad_arguments_by_name(kwargs, message, capsys):
    with pytest.raises(ValueError, match=message):
        run(**kwargs)
    assert "test acc" not in capsys.readouterr().out  # no table for a run that did not train
