"""compare: every method's gradient agrees with backprop; memory ordering; CLI output."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import jax
import pytest

from revjax.__main__ import main as cli
from revjax.compare import PROJECTED_TANGENTS, anchor_interval_for, compare, render
from revjax.precision import LowPrecisionStreamWarning


def by_method(rows):
    return {row["method"].split(" ")[0]: row for row in rows}


def test_mlp_methods_agree_and_reversible_uses_least_memory():
    rows = by_method(compare("mlp", 16, repeats=1))
    assert set(rows) == {
        "backprop", "checkpoint", "reversible", "anchored", "moonwalk", "mixed_moonwalk",
        "projected_forward", "forward",
    }  # fmt: skip
    assert rows["backprop"]["grad_error"] == 0.0
    # Exact forward mode needs one JVP per parameter: listed, not run, with the reason.
    assert rows["forward"]["grad_error"] is None and rows["forward"]["ms"] is None
    assert "267264 JVPs" in rows["forward"]["note"]
    # The projected forward gradient is unbiased with E||g_hat - g||^2 = (P + 1) ||g||^2 / k
    # for k Gaussian tangents, so its relative error is about sqrt((P + 1) / k) = 129 here.
    expected = ((267264 + 1) / PROJECTED_TANGENTS) ** 0.5
    assert expected / 2 < rows["projected_forward"]["grad_error"] < 2 * expected
    # float32, 16 layers: reconstruction / vijp round-off; measured 1e-7 to 1e-6.
    for name in ("checkpoint", "reversible", "anchored", "moonwalk", "mixed_moonwalk"):
        assert rows[name]["grad_error"] <= 1e-5, (name, rows[name])
    assert rows["reversible"]["temp_mib"] < rows["checkpoint"]["temp_mib"]
    assert rows["checkpoint"]["temp_mib"] < rows["backprop"]["temp_mib"]
    assert all(row["ms"] > 0 for name, row in rows.items() if name != "forward")


def test_exact_forward_mode_runs_when_small_and_is_refused_by_name_when_not():
    rows = by_method(compare("mlp", 1, repeats=1, methods=["forward"]))
    assert set(rows) == {"backprop", "forward"}
    assert rows["forward"]["grad_error"] <= 1e-5  # measured 1.6e-7
    with pytest.raises(ValueError, match=r"forward for mlp at L = 16: not run: 267264 param"):
        compare("mlp", 16, methods=["forward"])


def test_revnet_and_transformer_and_bf16():
    revnet = by_method(compare("revnet", 4, repeats=1))
    run = {name for name, row in revnet.items() if row["grad_error"] is not None}
    assert run == {"backprop", "checkpoint", "reversible", "across_stages"}
    assert "outside the invertible stack" in revnet["mixed_moonwalk"]["note"]
    assert revnet["checkpoint"]["grad_error"] <= 1e-6
    assert revnet["checkpoint"]["temp_mib"] < revnet["backprop"]["temp_mib"]
    assert revnet["reversible"]["grad_error"] <= 1e-5
    assert revnet["across_stages"]["grad_error"] <= 1e-5
    assert revnet["reversible"]["temp_mib"] < revnet["backprop"]["temp_mib"]
    transformer = by_method(compare("transformer", 4, repeats=1, methods=["reversible"]))
    assert set(transformer) == {"backprop", "reversible"}
    assert transformer["reversible"]["grad_error"] <= 1e-5
    with warnings.catch_warnings():  # bf16 streams on purpose: compare silences the warning
        warnings.simplefilter("error", LowPrecisionStreamWarning)
        bf16 = by_method(compare("mlp", 8, "bfloat16", repeats=1, methods=["reversible"]))
    # Everything in bfloat16 (8 mantissa bits), compared with float32 backprop: backprop's own
    # rounding and the reconstruction's are both visible (~1e-2) but bounded.
    assert 1e-4 < bf16["backprop"]["grad_error"] < 0.1
    assert 1e-4 < bf16["reversible"]["grad_error"] < 0.1
    tf16 = by_method(compare("transformer", 2, "bfloat16", repeats=1, methods=["reversible"]))
    # Against bf16 backprop's own error: the MLP's reconstruction adds little (measured 8.0e-3
    # vs 7.5e-3). The transformer's stream is bf16 too (its parameters' dtype), and the
    # attention blocks' reconstruction error compounds in it (measured 5.4e-2 vs 1.2e-2: a
    # bf16 stream's drift, README "Numerics"); 10x still refuses a broken reconstruction (~1).
    assert bf16["reversible"]["grad_error"] <= 2 * bf16["backprop"]["grad_error"], bf16
    assert tf16["reversible"]["grad_error"] <= 10 * tf16["backprop"]["grad_error"], tf16


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        compare("resnet", 4)
    with pytest.raises(ValueError, match="unknown dtype"):
        compare("mlp", 4, "float16")
    with pytest.raises(ValueError, match="depth must be a positive int"):
        compare("mlp", 0)
    with pytest.raises(ValueError, match=r"unknown methods \['magic'\]"):
        compare("mlp", 4, methods=["magic"])
    with pytest.raises(ValueError, match="non-empty list"):
        compare("mlp", 4, methods=[])
    with pytest.raises(ValueError, match="non-empty list"):
        compare("mlp", 4, methods="reversible")
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        compare("mlp", 4, repeats=0)
    # revnet offers across_stages, not anchored; the list named methods revnet does not run.
    with pytest.raises(
        ValueError, match=r"\['anchored'\] for revnet; choose from \[(.*)\]"
    ) as info:
        compare("revnet", 2, methods=["anchored"])
    offered = re.search(r"choose from \[(.*?)\]", str(info.value)).group(1)
    assert "'across_stages'" in offered and "moonwalk" not in offered, offered
    assert "moonwalk" in str(info.value).split("]")[-1]  # listed as not run, apart
    # The mlp offers exact forward mode but does not run it at L = 4 (too many parameters):
    # "not run here", with a pointer to the reason, not "not offered".
    with pytest.raises(ValueError, match=r"\(not run here: forward; name one for the reason\)"):
        compare("mlp", 4, methods=["magic"])


def test_method_selection_by_short_or_full_label():
    rows = compare("mlp", 4, repeats=1, methods=["anchored", "anchored (k=2)", "reversible"])
    # Duplicates collapse; backprop (the reference) always runs first.
    assert [row["method"] for row in rows] == ["backprop", "anchored (k=2)", "reversible"]


def test_anchor_interval():
    assert [anchor_interval_for(d) for d in (1, 7, 16, 24, 64)] == [1, 1, 4, 4, 8]


@pytest.mark.parametrize(("model", "depth"), [("mlp", 7), ("mlp", 1), ("transformer", 3)])
def test_anchors_every_layer_are_not_offered_as_a_method(model, depth):
    """At a prime depth (or below 4) k = 1: "anchored (k=1)" stored every layer's input, a
    second checkpoint row. It is listed as not run, with the reason."""
    with pytest.raises(ValueError, match=rf"anchored for {model} at L = {depth}: not run: L ="):
        compare(model, depth, methods=["anchored"])


def test_cli_table_and_json(capsys):
    assert cli(["compare", "--model", "mlp", "--depth", "4", "--repeats", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["model"] == "mlp" and len(record["rows"]) == 8
    # Where and with what it was measured, as every result JSON says (it had the backend only).
    assert {"date", "device", "jax", "flax"} <= set(record["env"])
    assert record["rows"][-1]["method"] == "forward" and record["rows"][-1]["ms"] is None
    # "name": the short name --methods takes (a label like "anchored (k=2)" needed stripping).
    names = [row["name"] for row in record["rows"]]
    assert names == ["backprop", "checkpoint", "reversible", "anchored", "moonwalk",
                     "mixed_moonwalk", "projected_forward", "forward"], names  # fmt: skip
    assert cli(["compare", "--depth", "4", "--repeats", "1", "--methods", "reversible"]) == 0
    out = capsys.readouterr().out
    assert "grad error vs f32 backprop" in out and "reversible" in out
    assert cli(["compare", "--depth", "2", "--repeats", "1", "--methods", "projected_forward"]) == 0
    assert "forward: not run" not in capsys.readouterr().out  # only the chosen methods
    assert cli(["compare", "--depth", "2", "--repeats", "1", "--methods", "backprop"]) == 0
    assert cli(["compare", "--depth", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "forward: not run: 33408 parameters" in out
    # k would be 1 at L = 2: listed with the reason, not run as a copy of checkpointing.
    assert "anchored: not run: L = 2 has no divisor between 2 and sqrt(L)" in out
    # rich is in the bench extra `make test` installs, so the table is rich's, not the Markdown
    # fallback (tested below); without the extra this test fails rather than silently skipping.
    assert "┃" in out
    assert cli(["compare", "--methods", "magic"]) == 2
    err = capsys.readouterr().err
    assert "unknown methods" in err and len(err.splitlines()) == 1


def test_bench_lists_every_benchmark(capsys):
    assert cli(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    scripts = Path(__file__).resolve().parents[1] / "benchmarks"
    helpers = {"common.py", "__init__.py"}
    for script in sorted(p.name for p in scripts.glob("*.py") if p.name not in helpers):
        assert script in listed, f"{script} is not run by python -m revjax bench"
    assert listed.strip().splitlines()[-1] == "report.py"  # the README is refreshed last
    assert cli(["bench", "--size", "gpu", "--list"]) == 0
    assert "--size gpu" in capsys.readouterr().out
    if jax.default_backend() == "cpu":
        assert cli(["bench", "--size", "gpu"]) == 2
        assert "needs a GPU" in capsys.readouterr().err


def test_markdown_fallback_lists_methods_not_run_after_the_table(monkeypatch):
    """Without rich: a Markdown table with "-" cells, and the notes after a blank line (so a
    Markdown renderer does not read them as table rows)."""
    monkeypatch.setitem(sys.modules, "rich.console", None)  # import now raises ImportError
    rows = [
        {"method": "backprop", "grad_error": 0.0, "temp_mib": 1.0, "ms": 2.0, "note": ""},
        {"method": "forward", "grad_error": None, "temp_mib": None, "ms": None,
         "note": "not run: too many parameters"},
    ]  # fmt: skip
    text = render(rows, "title")
    table, notes = text.split("\n\n")[1:]
    assert table.splitlines()[-1].startswith("| forward | - | - | -")
    assert notes == "forward: not run: too many parameters"
    # Methods skipped for the same reason share one line (revnet printed one reason 4 times).
    same = {"grad_error": None, "temp_mib": None, "ms": None, "note": "not offered for revnet"}
    rows += [{"method": "moonwalk", **same}, {"method": "mixed_moonwalk", **same}]
    notes = render(rows, "title").split("\n\n")[2]
    assert notes.splitlines() == [
        "forward: not run: too many parameters",
        "moonwalk, mixed_moonwalk: not offered for revnet",
    ]


def test_json_output_is_strict_when_a_method_diverges(capsys, monkeypatch):
    """A NaN error (a diverged bf16 run) is written as null: strict parsers reject NaN."""
    import revjax.compare as compare_module

    diverged = [{"method": "reversible", "grad_error": float("nan"), "ms": float("inf")}]
    monkeypatch.setattr(compare_module, "compare", lambda *a, **k: diverged)
    assert cli(["compare", "--depth", "2", "--json"]) == 0

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    record = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert record["rows"] == [{"method": "reversible", "grad_error": None, "ms": None}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "foo"], "argument --model: invalid choice: 'foo'"),
        (["--dtype", "x"], "argument --dtype: invalid choice: 'x'"),
        (["--depth", "abc"], "argument --depth: invalid int value: 'abc'"),
        (["--methods"], "argument --methods: expected at least one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, message, capsys):
    """README: bad options exit 2 "with a one-line message"; argparse printed its usage first."""
    with pytest.raises(SystemExit) as info:
        cli(["compare", *args])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: compare: {message}")
    assert lines[0].endswith("(see python -m revjax compare --help)")


def test_cli_help_states_defaults_and_method_names(capsys):
    with pytest.raises(SystemExit):
        cli(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: mlp)", "(default: 16)", "(default: float32)", "(default: 10)"):
        assert default in text
    # Per model (it once listed anchored for every model and not revnet's across_stages).
    assert "mlp: moonwalk, mixed_moonwalk, forward, projected_forward" in text
    assert "revnet: across_stages" in text and "mlp and transformer: anchored" in text


def test_running_out_of_memory_is_one_line_not_a_traceback(capsys, monkeypatch):
    """A depth too large for the device (``--depth 1000000000`` tried to allocate 512 GB) ended
    in XLA's traceback; the CLI now names the model and depth and suggests a smaller one."""
    import revjax.compare as compare_module

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 5 bytes.")

    monkeypatch.setattr(compare_module, "compare", exhausted)
    assert cli(["compare", "--depth", "7"]) == 1
    err = capsys.readouterr().err
    assert "error: compare: mlp at L = 7 ran out of cpu memory (RESOURCE_EXHAUSTED" in err
    assert "try a smaller --depth" in err and "Traceback" not in err

    def cpu_out_of_memory(*args, **kwargs):  # how XLA:CPU words it
        raise jax.errors.JaxRuntimeError("INTERNAL: Out of memory allocating 512000000000 bytes.")

    monkeypatch.setattr(compare_module, "compare", cpu_out_of_memory)
    assert cli(["compare", "--depth", "7"]) == 1
    assert "(INTERNAL: Out of memory allocating" in capsys.readouterr().err

    # Any other runtime error still shows its traceback.
    def internal(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(compare_module, "compare", internal)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        cli(["compare", "--depth", "7"])
