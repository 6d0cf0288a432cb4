"""benchmarks/bench_transformer.py: the deepest-depth search and the isolated GPU code path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
    assert "out of memory" in text
    assert (
        "reversible 7, backprop 7 blocks; checkpoint: search failed (timeout after 600 s)" in text
    )
    assert "600 s blocks" not in text
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


def test_the_gpu_size_fits_backprop_in_an_h100():
    """Plain backprop holds every block's float32 attention scores: at the GPU size its
    compiled step is ~58 GiB at L = 8 but ~84 GiB at L = 12, more than an 80 GB H100 has. The
    footprint is compiled on this machine (CPU), nothing allocated."""
    from benchmarks.bench_transformer import compiled_bytes

    size = SIZES["gpu"]
    assert max(size["depths"]) == 8
    total = compiled_bytes(size, max(size["depths"]), "backprop")["total"]
    assert 50 * 2**30 < total < 64 * 2**30, total / 2**30
    # The depth it replaced: L = 12 does not fit 80 GB (the README quotes about 84 GiB).
    too_deep = compiled_bytes(size, 12, "backprop")["total"]
    assert 80 * 2**30 < too_deep < 88 * 2**30, too_deep / 2**30


def test_budget_s_cuts_child_timeouts_and_stops_in_time(tmp_path, monkeypatch):
    """With ``--budget-s`` every child's timeout is cut to the time left (less a reserve for
    writing), and when too little is left the run stops, keeping its rows, marked incomplete.
    A fake clock advances by each fake child's run time (100 s, or its whole timeout)."""
    import json

    from benchmarks import bench_transformer as bench

    now, calls = [0.0], []
    env = {"backend": "gpu", "device": "fake", "jax": "0", "date": "today"}

    def fake_child(size_name, task, budget_gib, timeout):
        calls.append((task[0], now[0], timeout))
        now[0] += min(100.0, timeout)
        if task[0] == "probe":
            return {"env": env, "budget_bytes": 2**30}
        return {"temp": 1, "total": 2, "ms": 1.0, "tokens_per_s": 1.0, "peak_bytes": 3}

    monkeypatch.setattr(bench, "in_child", fake_child)
    monkeypatch.setattr(bench, "_clock", lambda: now[0])
    payload = bench.main(["--size", "smoke", "--out", str(tmp_path), "--budget-s", "350"])
    assert [(kind, start, timeout) for kind, start, timeout in calls] == [
        ("probe", 0.0, 300),  # its usual limit: 340 s are left
        ("row", 100.0, 240.0),
        ("row", 200.0, 140.0),
        ("row", 300.0, 40.0),  # then 0 s left (less the reserve): no more children
    ]
    assert all(start + timeout <= 350 - bench.RESERVE_S for _, start, timeout in calls)
    written = json.loads((tmp_path / "transformer_smoke_gpu.json").read_text())
    assert written["rows"] == payload["rows"] and len(written["rows"]) == 3
    assert not written["complete"] and not payload["complete"]
    assert "--budget-s 350" in written["stopped"] and written["deepest_depth"] == {}
    # Without a budget every child gets its usual limit.
    assert bench.Deadline(None).timeout("deepest") == bench.CHILD_TIMEOUT_S["deepest"]


def test_a_run_stopped_by_its_budget_exits_with_status_1():
    """The script's exit status: 1 when the budget stopped it (``complete`` false)."""
    from benchmarks import bench_transformer as bench

    assert bench.exit_status({"complete": False, "rows": []}) == 1
    assert bench.exit_status({"complete": True, "rows": []}) == 0
    assert bench.exit_status(None) == 0  # a child process's task


def test_a_budget_too_small_for_any_measurement_is_a_usage_error(tmp_path, capsys):
    """Below RESERVE_S + MIN_CHILD_S (30 s) no child could ever start: refused at once (it used
    to start the run and fail in the probe)."""
    from benchmarks import bench_transformer as bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--size", "smoke", "--budget-s", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--budget-s must be at least 30 seconds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
