"""benchmarks/bench_transformer.py: the deepest-depth search and the isolated GPU code path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_transformer import SIZES, deepest, deepest_fitting, in_child


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
    row = in_child("smoke", ["row", "reversible", "2"])
    assert row["method"] == "reversible" and row["depth"] == 2, row
    assert row["total"] >= row["temp"] > 0
    assert row["env"]["backend"] and row["budget_bytes"] > 0
    bad = in_child("smoke", ["nonsense", "reversible"])
    assert "unknown task 'nonsense'" in bad["failed"]
