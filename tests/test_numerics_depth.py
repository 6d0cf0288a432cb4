"""benchmarks/numerics_depth.py: references that fit the memory budget, failure handling."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import numerics_depth as bench

TINY = {"batch": 4, "width": 8, "hidden": 16}


def test_failures_are_classified_and_other_errors_are_not():
    assert bench.failure(RuntimeError("INTERNAL: OverflowError: layer 3 left the range")) == (
        "overflow"
    )
    assert bench.failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")) == "oom"
    assert bench.failure(ValueError("shapes do not match")) is None


def test_stream_peak_sees_a_peak_in_the_middle_of_the_stack():
    """Exact mode's grid must hold every layer's stream, not just the output: a stack whose
    layer 0 adds 1000 and layer 1 subtracts it ends near the input but peaks at 1000."""
    import jax.numpy as jnp

    from revjax.coupling import additive_coupling

    shift = lambda p, v: jnp.broadcast_to(p, v.shape).astype(v.dtype)
    block = additive_coupling(shift, lambda p, v: jnp.zeros_like(v))
    params = (jnp.array([[1000.0], [-1000.0]]), jnp.zeros((2, 1)))
    x = (jnp.ones((2, 4)), jnp.ones((2, 4)))
    assert bench.stream_peak(block, params, x) == pytest.approx(1001.0)


def test_finest_exact_policy_guards_non_finite_peaks():
    assert bench.finest_exact_policy(math.inf) is None
    assert bench.finest_exact_policy(math.nan) is None
    assert bench.finest_exact_policy(2.0**30) is None  # beyond float32's 2^24 integer range
    assert bench.finest_exact_policy(100.0).fraction_bits == 24 - 8  # 2 * 100 < 2^8


def test_reference_falls_back_to_checkpointing_when_backprop_does_not_fit():
    block, params, x = bench.network(8, **TINY)
    plain, kind = bench.reference_step(block, params, x, bench.F32_STREAM, budget=None)
    assert kind == "backprop"
    remat, kind = bench.reference_step(block, params, x, bench.F32_STREAM, budget=1)
    assert kind == "checkpoint"
    error, _ = bench.agreement(remat(params, x), plain(params, x))
    assert float(error) <= 1e-6, float(error)  # the same operations, recomputed


def test_measure_with_a_tiny_budget_compares_against_checkpointed_references():
    """Every row says which reference it used; exact mode stays bitwise equal to it."""
    rows = bench.measure(8, TINY, timed=False, budget=1)
    assert {r["method"] for r in rows} == {"bf16 stream", "f32 stream", "exact"}
    assert all(r["reference"] == "checkpoint" for r in rows), rows
    exact = next(r for r in rows if r["method"] == "exact")
    assert exact["bitwise_equal"] and exact["grad_rel_err"] == 0.0
    assert all(r["stream_peak"] > 0 and not r["overflow"] for r in rows)


def test_anchored_rows_are_measured_only_at_depths_their_interval_divides(monkeypatch):
    """--depths 12 crashed: k = 8 and k = 16 do not divide 12 and the scan refuses them, so
    those rows are skipped; at L = 16, k = 8 divides and is measured (k = 16 stores no anchor).
    Only the anchored methods run, to keep the test short."""
    anchored = {k: v for k, v in bench.METHODS.items() if v and "checkpoint_every" in v}
    assert set(anchored) == {"f32 stream, k=16", "f32 stream, k=8"}
    monkeypatch.setattr(bench, "METHODS", anchored)
    assert bench.measure(12, TINY, timed=False) == []
    assert [r["method"] for r in bench.measure(16, TINY, timed=False)] == ["f32 stream, k=8"]


def test_append_merges_a_split_run_and_refuses_a_different_one(tmp_path, monkeypatch):
    """A run split across calls (the GPU's per-call time limit) ends as one JSON with every
    depth, complete only when every part completed; a different size is refused."""
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "depths": [2, 4]})
    name = f"numerics_depth_tiny_{jax.default_backend()}.json"
    bench.main(["--size", "tiny", "--depths", "4", "--out", str(tmp_path)])
    bench.main(["--size", "tiny", "--depths", "2", "--out", str(tmp_path), "--append"])
    merged = json.loads((tmp_path / name).read_text())
    assert merged["complete"] and merged["size"]["depths"] == [2, 4]
    assert [r["depth"] for r in merged["rows"]] == sorted(r["depth"] for r in merged["rows"])
    assert {r["depth"] for r in merged["rows"]} == {2, 4}
    assert "appended_to" in merged
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "width": 16, "depths": [2]})
    with pytest.raises(SystemExit, match="--append"):
        bench.main(["--size", "tiny", "--out", str(tmp_path), "--append"])


def _fake_measure(depth, size, timed, budget=None):
    """One row per depth, in the shape ``measure`` writes (no compile: fast)."""
    return [{"depth": depth, "method": "f32 stream", "stream_peak": 1.0, "fraction_bits": None,
             "reference": "backprop", "grad_rel_err": 1e-3, "bitwise_equal": False,
             "step_ms": None, "time_vs_bf16_backprop": None, "overflow": False}]  # fmt: skip


def test_append_without_an_earlier_run_is_refused(tmp_path, monkeypatch):
    """Else the appended part alone would be written as the whole, complete measurement."""
    monkeypatch.setattr(bench, "measure", _fake_measure)
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "depths": [2, 4]})
    missing = tmp_path / f"numerics_depth_tiny_{jax.default_backend()}.json"
    with pytest.raises(SystemExit, match="--append needs the earlier run's") as stop:
        bench.main(["--size", "tiny", "--depths", "4", "--out", str(tmp_path), "--append"])
    assert str(missing) in str(stop.value) and stop.value.code != 0
    assert not missing.exists()


@pytest.mark.parametrize(
    "broken",
    [
        {"size": {"batch": 2}, "env": {"device": "cpu", "date": "d"}, "rows": []},  # no depths
        {"size": {"depths": [2]}, "env": {"device": "cpu"}, "rows": []},  # no date
        {"size": {"depths": [2]}, "env": {"device": "cpu", "date": "d"}, "rows": [{"depth": 2}]},
        {"size": [2], "env": {"device": "cpu", "date": "d"}, "rows": []},  # size not a dict
        "directory",
    ],
)
def test_append_to_a_malformed_earlier_run_is_refused_in_one_line(tmp_path, monkeypatch, broken):
    """A field the merge reads that the earlier file lacks (or a directory at its path) gave a
    KeyError/IsADirectoryError traceback, some only after the measuring."""
    monkeypatch.setattr(bench, "measure", _fake_measure)
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "depths": [2, 4]})
    path = tmp_path / f"numerics_depth_tiny_{jax.default_backend()}.json"
    if broken == "directory":
        path.mkdir()
    else:
        path.write_text(json.dumps(broken))
    with pytest.raises(SystemExit, match="is not a numerics_depth result"):
        bench.main(["--size", "tiny", "--depths", "4", "--out", str(tmp_path), "--append"])


def test_append_completes_a_run_that_stopped_early(tmp_path, monkeypatch):
    """A run stopped after its first depth (the GPU's per-call time limit) is completed by
    appending the depths it missed: ``complete`` turns true exactly when every depth the runs
    set out to measure has its rows."""
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "depths": [2, 4, 8]})
    path = tmp_path / f"numerics_depth_tiny_{jax.default_backend()}.json"
    calls = []

    def stopped(depth, *args, **kwargs):  # the timeout strikes during the second depth
        calls.append(depth)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_measure(depth, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--size", "tiny", "--out", str(tmp_path)])
    first = json.loads(path.read_text())
    assert not first["complete"] and {r["depth"] for r in first["rows"]} == {2}
    monkeypatch.setattr(bench, "measure", _fake_measure)
    bench.main(["--size", "tiny", "--depths", "4", "--out", str(tmp_path), "--append"])
    second = json.loads(path.read_text())
    assert second["size"]["depths"] == [2, 4, 8]  # 8 is still wanted, though never measured
    assert not second["complete"] and {r["depth"] for r in second["rows"]} == {2, 4}
    bench.main(["--size", "tiny", "--depths", "8", "--out", str(tmp_path), "--append"])
    third = json.loads(path.read_text())
    assert third["complete"] and [r["depth"] for r in third["rows"]] == [2, 4, 8]
    # Re-measuring depths 2 and 4, stopped during 4: depth 4's earlier rows are still there
    # (they used to be dropped at the first save, so the stopped run lost them).
    calls.clear()
    monkeypatch.setattr(bench, "measure", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--size", "tiny", "--depths", "4", "2", "--out", str(tmp_path), "--append"])
    assert calls == [2, 4]
    fourth = json.loads(path.read_text())
    assert [r["depth"] for r in fourth["rows"]] == [2, 4, 8]


def test_the_cpu_substitutions_change_no_bit_of_any_gradient():
    """bf16 weights held in float32 arrays and checkpointed references (the CPU size's speed-
    ups) give every method's gradient and reference bit for bit as the literal network."""
    size = {**TINY, "param_dtype": "float32", "reference": "checkpoint"}
    params = bench.network(2, **size)[1]
    assert {a.dtype for a in jax.tree.leaves(params)} == {jax.numpy.dtype("float32")}
    literal = bench.network(2, **TINY)[1]
    assert all(
        bool((a == b.astype("float32")).all())
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(literal), strict=True)
    )
    check = bench.equivalence(bench.EQUIVALENCE_DEPTH, size)
    assert check == dict.fromkeys(bench.METHODS, True)  # every method ran, all equal


def test_reference_step_refuses_an_unknown_kind():
    block, params, x = bench.network(2, **TINY)
    with pytest.raises(ValueError, match="kind must be 'backprop' or 'checkpoint'"):
        bench.reference_step(block, params, x, bench.F32_STREAM, None, "remat")


def test_a_failed_equivalence_check_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "equivalence", lambda depth, size: {"f32 stream": False})
    monkeypatch.setattr(bench, "measure", _fake_measure)
    size = {**TINY, "depths": [2], "param_dtype": "float32", "reference": "checkpoint"}
    monkeypatch.setitem(bench.SIZES, "tiny", size)
    with pytest.raises(SystemExit, match="differ from the literal network's"):
        bench.main(["--size", "tiny", "--out", str(tmp_path)])
    monkeypatch.setattr(bench, "equivalence", lambda depth, size: {"f32 stream": True})
    bench.main(["--size", "tiny", "--out", str(tmp_path)])
    path = tmp_path / f"numerics_depth_tiny_{jax.default_backend()}.json"
    written = json.loads(path.read_text())
    assert written["equivalence"] == {"depth": 32, "bitwise_equal": {"f32 stream": True}}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a property of XLA's CPU compiler")
def test_xla_cpu_converts_the_whole_stack_to_write_one_bf16_slice():
    """Why the CPU size holds bf16 weights in float32 arrays: XLA:CPU compiles a scan's write
    of one layer's bf16 output into its stacked array as float32 conversions of the whole
    (L, ...) stack, every layer. If this fails, XLA writes bf16 slices in place and the
    substitution (module doc of numerics_depth.py) can go."""
    import jax.numpy as jnp
    from jax import lax

    def stacked(w):
        return lax.scan(lambda c, w_l: (c, (w_l.astype(jnp.float32) * 2).astype(w.dtype)), 0, w)[1]

    whole_stack_to_f32 = re.compile(r"= f32\[16,8,8\]\{[^}]*\} convert\(")
    for dtype, converted in ((jnp.bfloat16, True), (jnp.float32, False)):
        hlo = jax.jit(stacked).lower(jnp.ones((16, 8, 8), dtype)).compile().as_text()
        assert bool(whole_stack_to_f32.search(hlo)) == converted, dtype


def test_bad_depths_and_an_unreadable_earlier_run_are_refused(tmp_path, monkeypatch, capsys):
    """--depths 0 ran the L = 32 equivalence check, then failed deep in XLA; a corrupt earlier
    file for --append gave a JSONDecodeError or KeyError traceback."""
    for depths, message in (
        (["0"], "must be finite and > 0, got 0"),
        (["-1"], "must be finite and > 0, got -1"),
        ([], "expected at least one argument"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--depths", *depths, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert f"argument --depths: {message}" in capsys.readouterr().err
    monkeypatch.setattr(bench, "measure", _fake_measure)
    monkeypatch.setitem(bench.SIZES, "tiny", {**TINY, "depths": [2, 4]})
    earlier = tmp_path / f"numerics_depth_tiny_{jax.default_backend()}.json"
    for text in ("{not json", '{"rows": []}'):
        earlier.write_text(text)
        with pytest.raises(SystemExit, match="which is not a numerics_depth result"):
            bench.main(["--size", "tiny", "--depths", "4", "--out", str(tmp_path), "--append"])
