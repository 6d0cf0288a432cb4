"""benchmarks/memory_depth.py measures the right computations: all six methods give backprop's
gradient (so its memory table compares like with like)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import memory_depth as bench
from revjax.diagnostics import relative_error
from revjax.models.mlp import init_mlp_stack


@pytest.mark.parametrize("depth", [8, 12])  # 12: groups of k = 3, not a power of two
def test_every_method_computes_the_backprop_gradient(depth):
    params = init_mlp_stack(jax.random.key(0), depth, bench.WIDTH, bench.HIDDEN)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = tuple(jax.random.normal(k, (16, bench.WIDTH)) for k in (k1, k2))
    reference = jax.jit(bench.gradient("backprop", depth))(params, x)
    for method in bench.METHODS[1:]:
        grads = jax.jit(bench.gradient(method, depth))(params, x)
        # float32 round-off of reconstruction / recomputation over <= 12 layers.
        assert float(relative_error(grads, reference)) <= 1e-5, method


@pytest.mark.parametrize("method", ["checkpoint", "sqrt(L) nested checkpointing", "reversible"])
def test_deepest_is_the_last_depth_within_the_budget(method):
    budget = 48 * 2**20  # small enough that every depth compiled here is cheap
    depth = bench.deepest(method, budget)
    if method in bench.SQUARE_DEPTHS:
        k = math.isqrt(depth)
        assert k * k == depth, "k ~ sqrt(L) methods are searched over perfect squares"
        deeper = (k + 1) ** 2
    else:
        deeper = depth + 1
    assert depth > 8
    assert bench.memory(method, depth).footprint_bytes <= budget
    assert bench.memory(method, deeper).footprint_bytes > budget


def test_footprint_counts_parameters_and_gradients():
    """The reversible gradient's footprint grows by exactly a layer's parameters and gradients
    per layer: its temps are flat, so what bounds its depth is the parameters."""
    grow = (
        bench.memory("reversible", 256).footprint_bytes
        - bench.memory("reversible", 128).footprint_bytes
    )
    assert grow == 128 * 2 * bench.param_bytes_per_layer()


def test_a_stopped_run_keeps_its_rows_and_renders_as_partial(tmp_path, monkeypatch):
    """The JSON is rewritten after every row and search (complete only at the end), and the
    README renderer shows a partial file with "-" for what it lacks."""
    import json
    from types import SimpleNamespace

    from benchmarks import report

    def memory(method, depth):  # affine footprints, no compile
        if (method, depth) == ("reversible", 16):
            raise KeyboardInterrupt  # the timeout strikes mid-depth
        return SimpleNamespace(temp_mib=depth / 8, footprint_bytes=2**20 * (1 + depth))

    monkeypatch.setattr(bench, "memory", memory)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(tmp_path)])
    name = f"memory_depth_{jax.default_backend()}.json"
    partial = json.loads((tmp_path / name).read_text())
    assert not partial["complete"] and partial["deepest_depth"] == {}
    assert [(r["method"], r["depth"]) for r in partial["rows"][-3:]] == [
        (m, 16) for m in bench.METHODS[:3]
    ]
    text = report.render_memory_depth(partial, name)
    assert text.startswith("**Partial run**")
    assert "| 16 | 2.00 | 2.00 | 2.00 | - | - | - |" in text
    assert "Deepest stack" not in text  # no search ran
    partial["deepest_depth"] = {"checkpoint": 100}  # a search done, backprop's not
    assert "| checkpoint | 100 | - | - |" in report.render_memory_depth(partial, name)


def test_resume_measures_only_what_the_stopped_run_lacks(tmp_path, monkeypatch):
    """``--resume`` keeps the stopped run's rows and searches and computes only the rest: every
    (method, depth) row once, every search once, the earlier run's environment recorded."""
    import json
    from types import SimpleNamespace

    calls, stop = [], [True]

    def memory(method, depth):
        calls.append((method, depth))
        if (method, depth) == ("reversible", 16) and stop:
            stop.pop()
            raise KeyboardInterrupt  # the first run's time limit strikes mid-depth
        return SimpleNamespace(temp_mib=depth / 8, footprint_bytes=2**20 * (1 + depth))

    monkeypatch.setattr(bench, "memory", memory)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--out", str(tmp_path)])
    first = len(calls)
    name = tmp_path / f"memory_depth_{jax.default_backend()}.json"
    stopped = json.loads(name.read_text())
    monkeypatch.setattr(bench, "deepest", lambda method, budget: calls.append(method) or 7)
    bench.main(["--out", str(tmp_path), "--resume"])
    resumed = json.loads(name.read_text())
    pairs = [(r["method"], r["depth"]) for r in resumed["rows"]]
    assert sorted(pairs) == sorted((m, d) for d in bench.DEPTHS for m in bench.METHODS)
    assert calls[first] == ("reversible", 16)  # where the stopped run was cut off
    assert len(calls) - first == len(pairs) - len(stopped["rows"]) + len(bench.METHODS)
    assert resumed["complete"] and resumed["deepest_depth"] == dict.fromkeys(bench.METHODS, 7)
    assert resumed["resumed_from"] == stopped["env"]
    calls.clear()
    with pytest.raises(SystemExit, match="is complete; there is nothing to resume"):
        bench.main(["--out", str(tmp_path), "--resume"])
    assert calls == [] and json.loads(name.read_text()) == resumed  # left as it was


def test_resume_refuses_a_run_of_another_budget(tmp_path, monkeypatch, capsys):
    """Resuming a run measured against another budget would mix two measurements."""
    from types import SimpleNamespace

    # --budget-gib is the budget where the device reports no limit (a CPU); on a GPU the
    # device's limit would make both runs' budgets equal.
    monkeypatch.setattr(bench, "budget_bytes", lambda gib: int(gib * 2**30))

    fake = lambda method, depth: SimpleNamespace(temp_mib=1.0, footprint_bytes=2**20 * depth)
    monkeypatch.setattr(bench, "memory", fake)
    monkeypatch.setattr(bench, "deepest", lambda method, budget: 7)
    bench.main(["--out", str(tmp_path), "--budget-gib", "1"])
    stopped = tmp_path / f"memory_depth_{jax.default_backend()}.json"
    text = stopped.read_text()
    assert '"complete": true' in text
    stopped.write_text(text.replace('"complete": true', '"complete": false'))  # cut short
    with pytest.raises(SystemExit, match="budget"):
        bench.main(["--out", str(tmp_path), "--budget-gib", "2", "--resume"])
    with pytest.raises(SystemExit, match="--resume needs a memory_depth result"):
        bench.main(["--out", str(tmp_path / "empty"), "--resume"])


@pytest.mark.parametrize("budget", ["inf", "nan", "0", "-1"])
def test_a_budget_that_is_not_finite_and_positive_is_refused_at_parse_time(
    budget, tmp_path, capsys
):
    """``--budget-gib inf`` passed the parser and crashed in the measuring with an
    OverflowError (infinity to int)."""
    with pytest.raises(SystemExit) as stop:
        bench.main(["--budget-gib", budget, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "must be finite and > 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
