"""benchmarks/report.py: renderers on results a GPU run may produce (synthetic JSON)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report

# Frozen copies of results (make bench and GPU runs rewrite benchmarks/results): the renderers
# are tested on fixed inputs whose measured facts (bitwise at L = 8, overflow at L = 256, ...)
# the assertions below rely on.
DATA = Path(__file__).with_name("data")
NUMERICS = "numerics_depth_cpu_cpu.json"
GPU_ENV = {"backend": "gpu", "device": "NVIDIA H100 80GB HBM3", "jax": "0.11.2", "date": "today"}


def _numerics(**exact_row) -> dict:
    """The committed CPU error-vs-depth result with every measured exact-mode row changed."""
    payload = json.loads((DATA / NUMERICS).read_text())
    for r in payload["rows"]:
        if r["method"] == "exact" and not r["overflow"]:
            r |= exact_row
    return payload


def test_the_numerics_summary_says_when_exact_mode_was_not_bitwise():
    """On a GPU exact mode's gradient need not be bitwise equal to backprop's at any depth; the
    summary then says so, with the largest error, instead of raising IndexError."""
    payload = _numerics(bitwise_equal=False, grad_rel_err=3e-7) | {"env": GPU_ENV}
    worst = next(r for r in payload["rows"] if r["method"] == "exact" and r["depth"] == 64)
    worst["grad_rel_err"] = 4.2e-6
    text = report.render_numerics_depth_summary(payload, "numerics_depth_gpu_gpu.json")
    assert "Exact mode was not bitwise equal to plain backprop at any depth on NVIDIA H100" in text
    assert "not at L = 8, L = 16, L = 32, L = 64 and L = 128" in text
    assert "(largest relative error 4.2e-6, at L = 64)" in text
    assert '"overflow" where its range cannot hold the stream (L = 256)' in text
    assert "bitwise exact whenever" not in text


def test_the_numerics_summary_names_the_depths_where_exact_mode_was_bitwise():
    payload = _numerics()
    deep = next(r for r in payload["rows"] if r["method"] == "exact" and r["depth"] == 128)
    deep |= {"bitwise_equal": False, "grad_rel_err": 1e-7}
    text = report.render_numerics_depth_summary(payload, NUMERICS)
    assert "bitwise exact at L = 8, L = 16, L = 32 and L = 64 but not at L = 128" in text
    # The committed (all bitwise) result keeps its sentence.
    complete = report.render_numerics_depth_summary(_numerics(), NUMERICS)
    assert "bitwise exact whenever its range can hold the stream (up to L = 128 here" in complete
    # A float32-stream error of exactly 0 is said, not silently left out of the ratio's span.
    assert "times better than a bf16 one up to L = 64 (its gradient bitwise exact at L = 8)" in (
        complete
    )


def test_a_diverged_run_renders_its_non_finite_values():
    """A run whose gradients diverge writes NaN errors (and a float32 stream that overflows an
    inf peak); ``_num`` raised ValueError on them and the summary indexed an empty list."""
    assert [report._num(x) for x in (float("inf"), float("nan"), 2.5e-3)] == [
        "inf",
        "nan",
        "2.5e-3",
    ]
    payload = _numerics()
    for r in payload["rows"]:
        if r["method"] in ("f32 stream", "bf16 stream"):
            r["grad_rel_err"] = float("nan")
        r["stream_peak"] = float("inf") if r["depth"] == 256 else r["stream_peak"]
    text = report.render_numerics_depth_summary(payload, NUMERICS)
    assert "~inf at L = 256" in text
    assert (
        "a float32 stream is already meaningless (relative error above 1, or not finite) at L = 8"
        in text
    )
    assert "meaningless (relative error above 1, or not finite) by L = 8" in text
    # NaN inside a range: max() skipped it by order, so a diverged anchored run read as kept.
    payload = _numerics(bitwise_equal=False, grad_rel_err=3e-7)
    for r in payload["rows"]:
        if ", k=" in r["method"] and r["depth"] == 128:
            r["grad_rel_err"] = float("nan")
        if r["method"] == "exact" and r["depth"] == 16:
            r["grad_rel_err"] = float("nan")
    text = report.render_numerics_depth_summary(payload, NUMERICS)
    assert "did not keep the float32-stream error finite (at L = 128 it was not)" in text
    assert "(largest relative error nan, at L = 16)" in text


def _results_with(tmp_path, monkeypatch, *names: str) -> Path:
    for name in names:
        shutil.copy(DATA / name, tmp_path / name)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    return tmp_path


def test_a_block_whose_result_file_is_missing_is_emptied(tmp_path, monkeypatch):
    """A block without its JSON was skipped, so --check passed whatever text stood in it (an
    edited number, or a table of results deleted since)."""
    _results_with(tmp_path, monkeypatch, "gemm_count_cpu.json")  # no scan_gpu_gpu.json
    readme = "<!-- results:scan -->\n| 8 | 26.25 | hand-edited |\n<!-- /results:scan -->\n"
    assert report.render_readme(readme) == "<!-- results:scan -->\n<!-- /results:scan -->\n"
    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text(readme)
    assert report.main(["--check"]) == 1


def test_the_scan_summary_prefers_gpu_matmul_counts(tmp_path, monkeypatch):
    """The GPU timings are explained by the GPU's HLO where count_gemms.py ran there; the
    CPU's counts are the fallback, and the text says which it used."""
    results = _results_with(
        tmp_path, monkeypatch, "scan_gpu_gpu.json", "scan_gpu_gpu_bfloat16.json",
        "gemm_count_cpu.json",
    )  # fmt: skip
    readme = "<!-- results:scan_summary -->\n<!-- /results:scan_summary -->\n"
    on_cpu = report.render_readme(readme)
    assert "counted on cpu by" in on_cpu and "`benchmarks/results/gemm_count_cpu.json`" in on_cpu
    gpu = {"benchmark": "count_gemms", "env": GPU_ENV,
           "matmuls_per_layer": {"checkpoint": 20, "reversible": 22}}  # fmt: skip
    (results / "gemm_count_gpu.json").write_text(json.dumps(gpu))
    on_gpu = report.render_readme(readme)
    assert "counted on gpu by" in on_gpu and "`benchmarks/results/gemm_count_gpu.json`" in on_gpu
    assert "22 matmuls per layer" in on_gpu and "against 20 for checkpointing" in on_gpu
    assert "gemm_count_cpu.json" not in on_gpu


def test_a_partial_file_is_marked_and_a_summary_it_cannot_feed_says_so(tmp_path, monkeypatch):
    """A run stopped early (``complete`` false): the blocks it feeds say "Partial run", and a
    summary needing rows it never measured says so instead of failing."""
    results = _results_with(
        tmp_path, monkeypatch, "scan_gpu_gpu.json", "scan_gpu_gpu_bfloat16.json",
        "gemm_count_cpu.json",
    )  # fmt: skip
    bf16 = json.loads((results / "scan_gpu_gpu_bfloat16.json").read_text())
    bf16["rows"] = [r for r in bf16["rows"] if r["depth"] == 8]  # stopped before L = 32
    bf16["complete"] = False
    (results / "scan_gpu_gpu_bfloat16.json").write_text(json.dumps(bf16))
    readme = "".join(f"<!-- results:{n} -->\n<!-- /results:{n} -->\n"
                     for n in ("scan", "scan_bf16", "scan_summary"))  # fmt: skip
    text = report.render_readme(readme)
    scan, bf16_block, summary = text.split("<!-- /results:")[:3]
    assert "Partial run" not in scan  # the float32 file is complete
    assert "**Partial run**" in bf16_block and "| reversible | 8 |" in bf16_block
    assert "| reversible | 32 |" not in bf16_block
    assert "**Partial run** (`benchmarks/results/scan_gpu_gpu_bfloat16.json` stopped" in summary


def test_the_numerics_table_explains_the_cpu_substitutions_instead_of_tagging_every_cell():
    """The CPU size checkpoints every reference on purpose and checks that this (and float32
    arrays for the bf16 weights) changes no bit: the table says so once; a reference
    checkpointed because backprop did not fit is still tagged cell by cell."""
    payload = json.loads((DATA / NUMERICS).read_text())
    assert all(payload["equivalence"]["bitwise_equal"].values())
    assert {r["reference"] for r in payload["rows"] if "reference" in r} == {"checkpoint"}
    text = report.render_numerics_depth(payload, NUMERICS)
    assert "(ref. checkpointed)" not in text
    assert "checked against the literal network at L = 32 by the script" in text
    unchecked = {k: v for k, v in payload.items() if k != "equivalence"}
    text = report.render_numerics_depth(unchecked, NUMERICS)
    assert "(ref. checkpointed)" in text and "literal network" not in text
    failed = json.loads(json.dumps(payload))
    failed["equivalence"]["bitwise_equal"]["exact"] = False
    assert "(ref. checkpointed)" in report.render_numerics_depth(failed, NUMERICS)
    # A size making one substitution only names that one.
    one = payload | {"size": payload["size"] | {"param_dtype": "bfloat16"}}
    text = report.render_numerics_depth(one, NUMERICS)
    assert "the reference is checkpointed per layer, which gives" in text
    assert "arrays" not in text


def test_the_activation_recovery_line_adds_float16_only_where_it_was_measured():
    """Results recorded before float16 was measured have float32 and bfloat16 rows only: the
    line leaves float16 out instead of raising; with float16 rows it states their worst case."""
    rows = [
        {"function": fn, "dtype": dtype, "max_error_far_from_minimum": far, "max_error": at}
        for fn in ("gelu_tanh", "silu")
        for dtype, far, at in (("float32", 1.5e-6, 1e-4), ("bfloat16", 7.8e-3, 1.5e-2))
    ]
    payload = {"env": GPU_ENV, "derivative_recovery": rows}
    old = report.render_activation_recovery(payload, "activations_cpu.json")
    assert "bfloat16 at most 7.8e-3 away from the minimum." in old and "; float16" not in old
    rows.append(
        {"function": "silu", "dtype": "float16", "max_error_far_from_minimum": 1.2e-3,
         "max_error": 7e-3}
    )  # fmt: skip
    new = report.render_activation_recovery(payload, "activations_cpu.json")
    assert "; float16 at most 1.2e-3 away from the minimum and 7.0e-3 at it" in new


def test_number_formatting_and_percent_changes_by_hand():
    """The helpers every README sentence goes through, against hand-written strings."""
    expected = {0.22: "0.22", 2.1: "2.1", 210.0: "210", 0.0996: "0.10", 2.9e-6: "2.9e-6",
                0.011: "1.1e-2", 3.1e7: "3.1e7", 0.0: "0"}  # fmt: skip
    assert {x: report._num(x) for x in expected} == expected
    assert report._percent_change([1.02, 1.06], "slower", "faster") == "2 to 6% slower"
    assert report._percent_change([0.95, 0.99], "slower", "faster") == "1 to 5% faster"
    assert report._percent_change([0.97, 1.02], "slower", "faster") == (
        "between 3% faster and 2% slower"
    )
    assert report._span([1.04, 1.0449]) == "1.0"
    assert report._series(["a", "b", "c"]) == "a, b and c"


def test_the_scan_summary_numbers_are_recomputed_from_the_json(tmp_path, monkeypatch):
    """Each number of the GPU scan summary, derived here independently of the renderer."""
    results = _results_with(
        tmp_path, monkeypatch, "scan_gpu_gpu.json", "scan_gpu_gpu_bfloat16.json",
        "gemm_count_cpu.json",
    )  # fmt: skip
    f32 = json.loads((results / "scan_gpu_gpu.json").read_text())
    bf16 = json.loads((results / "scan_gpu_gpu_bfloat16.json").read_text())
    counts = json.loads((results / "gemm_count_cpu.json").read_text())["matmuls_per_layer"]
    text = report.render_readme("<!-- results:scan_summary -->\n<!-- /results:scan_summary -->")
    text = " ".join(text.split())
    at = lambda p, method, depth: next(
        r for r in p["rows"] if r["method"] == method and r["depth"] == depth
    )
    deep = max(f32["config"]["depths"])
    f32_ratio = 1 / at(f32, "reversible", deep)["temp_ratio_to_backprop"]
    bf16_ratio = 1 / at(bf16, "reversible", deep)["temp_ratio_to_backprop"]
    assert f"needs 1/{f32_ratio:.0f} of plain backprop's" in text
    assert f"and 1/{bf16_ratio:.0f} in bfloat16" in text
    more = 100 * (counts["reversible"] - counts["checkpoint"]) / counts["checkpoint"]
    assert f"{more:.1f}% more matmul work" in text
    slower = [
        100 * (r["time_ratio_to_checkpoint"] - 1)
        for p in (f32, bf16)
        for r in p["rows"]
        if r["method"] == "reversible"
    ]
    assert all(s > 0 for s in slower)  # the committed GPU run: slower at every depth
    assert f"is {min(slower):.0f} to {max(slower):.0f}% slower than per-layer" in text
    stream_mib = 2 * f32["config"]["rows"] * f32["config"]["width"] * 4 / 2**20
    k = next(r["method"] for r in f32["rows"] if r["method"].startswith("reversible_k"))
    extra = at(f32, k, deep)["temp_mib"] - at(f32, "reversible", deep)["temp_mib"]
    assert f"add exactly {extra / stream_mib:.0f} streams ({extra:.0f} MiB in float32)" in text


def test_a_result_names_the_commit_it_measured_where_it_recorded_one():
    """Results recorded before ``env['commit']`` existed render as before."""
    assert report._where(GPU_ENV) == "NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2, today"
    with_commit = report._where(GPU_ENV | {"commit": "6c72cb6"})
    assert with_commit == "NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2, today, commit 6c72cb6"


def test_the_scan_summary_names_each_files_setup_when_they_differ(tmp_path, monkeypatch):
    """One label named both GPU files by the float32 file's device, jax and date: a bfloat16
    file from another run would have been attributed to the float32 one. Files of one run
    (minutes apart, same day) share the label; a different jax version gets its own."""
    results = _results_with(
        tmp_path, monkeypatch, "scan_gpu_gpu.json", "scan_gpu_gpu_bfloat16.json",
        "gemm_count_cpu.json",
    )  # fmt: skip
    readme = "<!-- results:scan_summary -->\n<!-- /results:scan_summary -->"
    together = " ".join(report.render_readme(readme).split())
    assert "(`benchmarks/results/scan_gpu_gpu.json`, `benchmarks/results/scan_gpu_gpu_bfloat16" in (
        together
    )
    assert "against plain backprop of the same bfloat16 network" in together
    bf16 = json.loads((results / "scan_gpu_gpu_bfloat16.json").read_text())
    bf16["env"]["jax"] = "0.12.0"
    (results / "scan_gpu_gpu_bfloat16.json").write_text(json.dumps(bf16))
    apart = " ".join(report.render_readme(readme).split())
    assert "; bfloat16 measured on NVIDIA H100 80GB HBM3 (gpu), jax 0.12.0" in apart
    assert "jax 0.11.2" in apart  # the float32 file keeps its own label


def test_the_revnet_memory_line_claims_no_growth_it_did_not_measure():
    """It said the fully invertible trunk's advantage "grows with the number of stages and the
    image size"; measured at 8x8 to 32x32 images and 2 to 4 stages, the two stayed equal."""
    rows = [
        {"variant": variant, "blocks_per_stage": 2, "bytes_per_input_pixel": value}
        for variant, value in (
            ("RevNet", 104.9),
            ("ResNet-like", 285.0),
            ("fully invertible", 104.9),
        )
    ]
    payload = {"rows": rows, "batch": 256, "env": GPU_ENV}
    text = report.render_revnet_memory(payload, "revnet_cpu.json")
    assert "grows" not in text and "XLA's peak does not change." in text


def test_the_moonwalk_gpu_block_gives_mixed_moonwalks_time_ratio_to_backprop():
    """Issue 4 asks for mixed Moonwalk's time as a multiple of backprop's: computed per network
    and depth from the rows' medians, and left out where nothing was timed (a CPU run)."""

    def row(network, depth, method, ms):
        return {"network": network, "depth": depth, "method": method, "temp_mib": 1.0,
                "ms": ms, "grad_error": 0.0}  # fmt: skip

    rows = [
        row("revnet", 6, "backprop", 2.0),
        row("revnet", 6, "mixed_moonwalk", 3.0),
        row("revnet", 60, "backprop", 10.0),
        row("revnet", 60, "mixed_moonwalk", 12.5),
        row("submersive", 6, "backprop", 1.0),
        row("submersive", 6, "mixed_moonwalk", 2.25),
    ]
    payload = {"size": {"batch": 4, "width": 8, "hidden": 16}, "env": GPU_ENV, "rows": rows}
    text = report.render_moonwalk(payload, "moonwalk_gpu_gpu.json")
    assert (
        "multiple of backprop's (same rows): revnet L = 6: 1.50x, L = 60: 1.25x; "
        "submersive L = 6: 2.25x." in text
    )
    for r in rows:
        r["ms"] = None
    assert "multiple of backprop" not in report.render_moonwalk(payload, "moonwalk_cpu_cpu.json")
