"""benchmarks/bench_transformer.py: the deepest-depth search and the isolated GPU code path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_transformer import SIZES, deepest, in_child
from benchmarks.common import deepest_fitting


def counting(total_at):
    calls = []

    def fn(depth):
        calls.append(depth)
        return total_at(depth)

    return fn, calls


def test_deepest_fitting_finds_the_boundary_from_any_guess():
    affine = lambda d: 100 + 7 * d  # depth 100 is the last with 100 + 7 d <= 800
    for guess in (0, 1, 3, 99, 100, 101, 640, 10_000):
        fn, calls = counting(affine)
        assert deepest_fitting(fn, 800, 10_000, guess) == 100, guess
        assert len(calls) <= 2 * 14 + 2, (guess, calls)  # galloping + bisection: O(log)
    fn, calls = counting(affine)
    assert deepest_fitting(fn, 800, 10_000, 100) == 100
    assert sorted(calls) == [100, 101]  # an exact guess costs two evaluations
    assert deepest_fitting(affine, 10**9, 64, 5) == 64  # capped at max_depth
    assert deepest_fitting(affine, 50, 64, 5) == 0  # nothing fits


def test_deepest_from_two_compiled_depths_matches_a_full_bisection():
    """The affine guess from two measured depths; checked against plain bisection on the
    real compiled sizes of the smoke model (compile-only, in this process)."""
    size = SIZES["smoke"]
    from benchmarks.bench_transformer import compiled_bytes

    totals = {d: compiled_bytes(size, d, "backprop")["total"] for d in size["depths"]}
    budget = totals[max(totals)] + 5 * (totals[2] - totals[1]) + 1  # fits about 7 blocks
    found = deepest(size, "backprop", budget, totals)
    assert compiled_bytes(size, found, "backprop")["total"] <= budget
    assert compiled_bytes(size, found + 1, "backprop")["total"] > budget


def test_rows_run_in_a_child_process_and_failures_come_back_as_rows():
    row = in_child("smoke", ["row", "reversible", "2"], 4.0, 300)
    assert row["method"] == "reversible" and row["depth"] == 2, row
    assert row["total"] >= row["temp"] > 0
    assert row["env"]["backend"] and row["budget_bytes"] > 0
    bad = in_child("smoke", ["nonsense", "reversible"], 4.0, 300)
    assert "unknown task 'nonsense'" in bad["failed"]


def test_gpu_orchestration_records_failures_as_rows_and_renders(tmp_path, monkeypatch):
    """The isolated (GPU-size) path with fake child processes: one row out of memory, one not
    run, one deepest search failed. The JSON keeps every row and renders without error."""
    from benchmarks import bench_transformer as bench
    from benchmarks import plots, report

    env = {"backend": "gpu", "device": "fake", "jax": "0", "date": "today"}

    def fake_child(size_name, task, budget_gib, timeout):
        if task[0] == "probe":
            return {"env": env, "budget_bytes": 2**30}
        if task[0] == "deepest":
            return {"failed": "timeout after 600 s"} if task[1] == "checkpoint" else {"deepest": 7}
        method, depth = task[1], int(task[2])
        if method == "backprop" and depth == 2:
            return {"failed": "out of memory"}
        row = {"temp": 1000 * depth, "total": 2000 * depth, "env": env, "budget_bytes": 1}
        if method == "checkpoint" and depth == 2:
            return row | {"not_run": "compiled footprint exceeds the memory budget"}
        return row | {"ms": 1.0, "tokens_per_s": 32.0, "peak_bytes": 3000}

    monkeypatch.setattr(bench, "in_child", fake_child)
    payload = bench.main(["--size", "smoke", "--out", str(tmp_path)])
    assert payload["complete"] and payload["budget_bytes"] == 2**30
    assert [p.name for p in tmp_path.iterdir()] == ["transformer_smoke_gpu.json"]
    rows = {(r["method"], r["depth"]): r for r in payload["rows"]}
    assert rows[("backprop", 2)] == {"method": "backprop", "depth": 2, "failed": "out of memory"}
    assert "env" not in rows[("reversible", 1)]
    assert payload["deepest_depth"] == {
        "reversible": 7, "backprop": 7, "checkpoint": "timeout after 600 s"
    }  # fmt: skip
    text = report.render_transformer(payload, "transformer_smoke_gpu.json")
    assert "out of memory" in text and "checkpoint: timeout after 600 s" in text
    assert "reversible 1.0x deeper than backprop" in text
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots.plot_transformer(payload, ax)  # rows without temp are skipped, not a KeyError
    plt.close(fig)


def test_gpu_rows_are_timed_only_when_their_footprint_fits(monkeypatch):
    """``run_row``'s GPU branch, forced on CPU: timed within the budget, else marked not run."""
    from benchmarks import bench_transformer as bench

    monkeypatch.setattr(bench.jax, "default_backend", lambda: "gpu")
    size = SIZES["smoke"]
    timed = bench.run_row(size, 1, "reversible", budget=2**40)
    assert timed["ms"] > 0 and timed["tokens_per_s"] > 0
    skipped = bench.run_row(size, 1, "reversible", budget=1)
    assert "ms" not in skipped and "exceeds the memory budget" in skipped["not_run"]
