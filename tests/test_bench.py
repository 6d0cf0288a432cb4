"""``python -m revjax bench``: part of a suite, results elsewhere, failures reported."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from revjax import bench

README = Path(__file__).resolve().parents[1] / "README.md"
sys.path.insert(0, str(README.parent))  # the benchmarks package
GEMMS = f"gemm_count_{jax.default_backend()}.json"


def test_only_runs_the_named_scripts_into_out_and_leaves_the_readme(tmp_path, capsys, monkeypatch):
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed == [f"count_gemms.py --out {tmp_path}"]  # no plots.py / report.py refresh
    readme = README.read_text()
    # The scripts run through Popen; subprocess.run would be the refresh, which rewrites the
    # plots in benchmarks/results and the README (identically when in sync, so unseen there).
    ran = []
    real_run = bench.subprocess.run
    monkeypatch.setattr(
        bench.subprocess,
        "run",
        lambda command, *a, **k: ran.append(command) or real_run(command, *a, **k),
    )
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path)]) == 0
    assert not any(Path(str(part)).name in ("plots.py", "report.py") for c in ran for part in c)
    record = json.loads((tmp_path / GEMMS).read_text())
    assert record["env"]["backend"] == jax.default_backend()
    # What the README's scan summary argues from: reconstruction needs one matmul more per
    # layer than checkpointing (compile-only counts, deterministic).
    counts = record["matmuls_per_layer"]
    assert counts["reversible"] > counts["checkpoint"] > 0, counts
    assert README.read_text() == readme
    assert not list(tmp_path.glob("bench_suite_*.json"))  # a partial run records no total


@pytest.mark.parametrize("code", [-9, 3])
def test_a_failed_refresh_fails_the_run_even_when_a_signal_killed_it(code, monkeypatch):
    """The README refresh (plots.py, report.py) killed by a signal returns a negative code,
    which ``max`` over the codes took for success."""
    monkeypatch.setattr(bench, "_run_all", lambda commands, timeout, jobs: [])
    codes = iter([0, code])  # plots.py succeeds, report.py does not
    monkeypatch.setattr(
        bench.subprocess,
        "run",
        lambda command, *a, **k: subprocess.CompletedProcess(command, next(codes)),
    )
    assert bench.main(["--only", "count_gemms.py"]) == 1


def test_help_is_plain_text_with_every_option_explained(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text
    assert re.search(r"--size \{cpu,gpu\} cpu: .* \(default: cpu\)", text), text
    for option in ("--list", "--force", "--only", "--out", "--timeout"):
        # The option, its metavar(s), then help text (an option without help is followed by
        # the next option or by the end of the usage line, never by a lowercase word).
        pattern = rf"{option}(?: [A-Z]+| \[[A-Z]+ \.\.\.\])* [a-z]"
        assert re.search(pattern, text), (option, text)


def test_unknown_scripts_are_refused(capsys):
    assert bench.main(["--only", "nope.py"]) == 2
    assert "['nope.py'] not in the cpu suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--timeout", "-5"])
    assert "--timeout must be > 0 seconds, got -5.0" in capsys.readouterr().err


def test_an_unusable_out_is_refused_before_any_script_runs(tmp_path, capsys, monkeypatch):
    """Each script used to do its whole run and then fail to write (NotADirectoryError)."""
    monkeypatch.setattr(bench, "_run_all", lambda *a: pytest.fail("a script was started"))
    afile = tmp_path / "afile"
    afile.write_text("")
    for out, message in [
        (afile, f"--out {afile}: {afile} exists and is not a directory"),
        (afile / "sub", f"{afile} is a file, so the directory {afile / 'sub'} cannot be"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--only", "count_gemms.py", "--out", str(out)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_failing_script_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    suite = [["count_gemms.py", "--no-such-flag"], ["count_gemms.py"]]
    monkeypatch.setitem(bench.SUITES, "cpu", suite)
    assert bench.main(["--out", str(tmp_path), "--timeout", "300"]) == 1
    err = capsys.readouterr().err
    assert "count_gemms.py --no-such-flag" in err and "exit 2" in err
    assert (tmp_path / GEMMS).exists()  # the second script still ran


def test_a_fractional_timeout_is_reported_as_given(tmp_path, capsys, monkeypatch):
    """``--timeout 0.5`` was reported as "timed out after 0 s" (formatted with ``.0f``)."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "report.py").write_text("")
    (tmp_path / "benchmarks" / "slow.py").write_text("import time\ntime.sleep(30)\n")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setitem(bench.SUITES, "cpu", [["slow.py"]])
    assert bench.main(["--out", str(tmp_path), "--timeout", "0.5"]) == 1
    assert "timed out after 0.5 s" in capsys.readouterr().err


def test_a_script_past_its_timeout_is_killed_with_its_children(tmp_path, capsys, monkeypatch):
    """The script starts a child that would outlive it; the timeout kills the whole group."""
    marker, pid_file = tmp_path / "child_survived", tmp_path / "child.pid"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "report.py").write_text("")
    child = tmp_path / "child.py"
    child.write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"time.sleep(30)\nopen({str(marker)!r}, 'w').close()\n"
    )
    (tmp_path / "benchmarks" / "slow.py").write_text(
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child)!r}])\n"
        f"while not os.path.exists({str(pid_file)!r}):\n    time.sleep(0.05)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # bench looks for ROOT/benchmarks/<script>
    monkeypatch.setitem(bench.SUITES, "cpu", [["slow.py"]])
    assert bench.main(["--out", str(tmp_path), "--timeout", "5"]) == 1
    assert "timed out after 5 s" in capsys.readouterr().err
    assert pid_file.exists(), "the child never started, so the test proves nothing"
    pid = int(pid_file.read_text())

    def running() -> bool:  # a zombie (killed, not yet reaped) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(), f"child {pid} outlived the timed-out script"
    assert not marker.exists()


def test_the_gpu_suite_counts_gemms_and_names_only_existing_scripts(tmp_path, capsys):
    """The GPU suite measures the matmul counts its scan summary quotes (on the GPU's HLO), and
    every script either suite names exists."""
    assert bench.main(["--size", "gpu", "--only", "count_gemms.py", "--out", str(tmp_path),
                       "--list"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines() == [f"count_gemms.py --out {tmp_path}"]
    for suite in bench.SUITES.values():
        for name, *_ in suite:
            assert (bench.ROOT / "benchmarks" / name).is_file(), name


def test_the_environment_records_the_matmul_precision():
    """GPU float32 matmuls round TF32-like at JAX's default precision, so every result says
    which precision was in effect (None: JAX's default)."""
    from benchmarks.common import environment

    env = environment()
    assert json.loads(json.dumps(env)) == env  # stored as JSON as it is
    with jax.default_matmul_precision("bfloat16"):
        assert environment()["default_matmul_precision"] == "bfloat16"
    previous = jax.config.jax_default_matmul_precision  # "highest" under tests/conftest.py
    try:
        jax.config.update("jax_default_matmul_precision", None)
        assert environment()["default_matmul_precision"] is None
        jax.config.update("jax_default_matmul_precision", "highest")
        assert environment()["default_matmul_precision"] == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


def test_the_environment_records_the_commit_measured(tmp_path, monkeypatch):
    """A result names the code it measured: the checkout's HEAD (``+dirty`` when revjax/ or
    benchmarks/ has uncommitted changes); a copy without git (a device machine's) takes
    REVJAX_COMMIT, and without it records None rather than a guess."""
    import subprocess

    head = subprocess.run(
        ["git", "-C", str(bench.ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert bench.source_commit() in (head, f"{head}+dirty")
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # not a git checkout
    monkeypatch.delenv(bench.COMMIT_ENV, raising=False)
    assert bench.source_commit() is None
    monkeypatch.setenv(bench.COMMIT_ENV, "abc1234")
    assert bench.source_commit() == "abc1234"
    assert bench.environment()["commit"] == "abc1234"


def test_the_commit_is_dirty_for_code_changes_only_and_leaves_the_index_alone(
    tmp_path, monkeypatch
):
    """Results written by a suite's first script made every later one record ``+dirty`` for
    unchanged code; a new, untracked module did not count; and ``git status`` rewrote the
    user's ``.git/index`` (its optional refresh)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    for path in ("revjax/a.py", "benchmarks/b.py", "benchmarks/results/r.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    head = git("rev-parse", "--short", "HEAD").strip()
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.source_commit() == head
    (tmp_path / "benchmarks/results/r.json").write_text("2\n")  # a result: not the code
    (tmp_path / "benchmarks/results/new.json").write_text("3\n")
    index = tmp_path / ".git" / "index"
    os.utime(tmp_path / "revjax/a.py", ns=(1, 1))  # same content, stale stat: git would refresh
    before = index.stat().st_mtime_ns
    assert bench.source_commit() == head
    assert index.stat().st_mtime_ns == before
    (tmp_path / "revjax/new.py").write_text("new\n")  # untracked code: dirty
    assert bench.source_commit() == f"{head}+dirty"
    (tmp_path / "revjax/new.py").unlink()
    (tmp_path / "benchmarks/b.py").write_text("2\n")  # changed code: dirty
    assert bench.source_commit() == f"{head}+dirty"


# Every benchmark rewrites its JSON after each unit of work, marked incomplete until the end, so
# a run stopped by a timeout keeps what it measured (benchmarks.common.ResultFile).


class Stop(Exception):
    """Stands for the timeout that kills a benchmark mid-run."""


def _stop_after(n: int, fn):
    calls = []

    def wrapped(*args, **kwargs):
        if len(calls) == n:
            raise Stop
        calls.append(args)
        return fn(*args, **kwargs)

    return wrapped


def test_bench_moonwalk_keeps_the_rows_of_a_stopped_run(tmp_path, monkeypatch):
    from benchmarks import bench_moonwalk, report

    def measure(network, depth, size, timed):
        return [{"network": network, "depth": depth, "method": m, "params": 1, "ms": None,
                 "temp_mib": depth / 4, "footprint_mib": depth, "grad_error": 0.0,
                 "drift": None} for m in ("backprop", "moonwalk")]  # fmt: skip

    runs = []
    speedup = {"depth": 6, "moonwalk": 1.0, "forward": 9.0, "speedup": 9.0, "repeats": 10}
    monkeypatch.setattr(bench_moonwalk, "speedups", lambda n: runs.append(n) or [speedup])
    monkeypatch.setattr(bench_moonwalk, "measure", _stop_after(2, measure))
    with pytest.raises(Stop):
        bench_moonwalk.main(["--size", "gpu", "--force", "--out", str(tmp_path)])
    name = f"moonwalk_gpu_{jax.default_backend()}.json"
    partial = json.loads((tmp_path / name).read_text())
    assert not partial["complete"] and len(partial["rows"]) == 4
    # The speed-up is measured first, so a run stopped during the rows keeps it.
    assert partial["moonwalk_vs_forward_mode"] == [speedup]
    text = report.render_moonwalk(partial, name)
    assert text.startswith("**Partial run**") and "| 12 |" in text
    assert "L = 6: 1.0 ms vs 9.0 ms, 9x faster" in text

    monkeypatch.setattr(bench_moonwalk, "measure", measure)
    done = bench_moonwalk.main(["--size", "gpu", "--force", "--out", str(tmp_path)])
    assert done["complete"] and json.loads((tmp_path / name).read_text())["complete"]
    assert len(done["rows"]) == 2 * 2 * len(bench_moonwalk.DEPTHS)
    # The speed-up over exact forward mode is measured at the GPU size too (once it was only
    # on a CPU), on the small network, median of 10 runs there.
    assert runs == [10, 10] and done["speedup_network"] == {"batch": 16, "width": 8, "hidden": 16}


def test_bench_activations_keeps_the_rows_of_a_stopped_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from benchmarks import bench_activations, report

    memory = lambda fn, params, x: SimpleNamespace(temp_mib=10.0)
    monkeypatch.setattr(bench_activations, "compiled_memory", _stop_after(2, memory))
    with pytest.raises(Stop):
        bench_activations.main(["--out", str(tmp_path)])
    name = f"activations_{jax.default_backend()}.json"
    partial = json.loads((tmp_path / name).read_text())
    assert not partial["complete"] and len(partial["rows"]) == 2
    assert partial["derivative_recovery"] == []
    assert report.render_activation_times(partial, name).startswith("**Partial run**")
    # The prose that needs every variant says the run is partial instead of failing.
    block = report._render_block(report.render_activation_memory, partial, name)
    assert block.startswith("**Partial run**") and name in block

    monkeypatch.setattr(bench_activations, "compiled_memory", memory)
    monkeypatch.setattr(bench_activations, "derivative_recovery", lambda: [])
    assert bench_activations.main(["--out", str(tmp_path)])["complete"]
    assert len(json.loads((tmp_path / name).read_text())["rows"]) == len(bench_activations.VARIANTS)


def test_bench_scan_keeps_the_depths_of_a_stopped_run(tmp_path, monkeypatch):
    from benchmarks import bench_scan, report

    tiny = {"rows": 4, "width": 4, "hidden": 8, "depths": [8, 16], "repeats": 1}
    monkeypatch.setitem(bench_scan.SIZES, "cpu", tiny)
    monkeypatch.setattr(bench_scan, "init_mlp_stack", _stop_after(1, bench_scan.init_mlp_stack))
    with pytest.raises(Stop):
        bench_scan.run("cpu", tmp_path)
    name = f"scan_cpu_{jax.default_backend()}.json"
    partial = json.loads((tmp_path / name).read_text())
    assert not partial["complete"]
    assert {r["depth"] for r in partial["rows"]} == {8} and len(partial["rows"]) == 4
    assert report.render_scan(partial, name).startswith("**Partial run**")


def test_bench_moonwalk_rows_compare_every_method_with_backprop():
    """``measure`` compiles each method once and takes memory and gradient from it; backprop
    runs first and is the reference, so its own error is 0 and the exact methods' is tiny."""
    from benchmarks import bench_moonwalk
    from revjax import moonwalk as mw

    size = {"batch": 4, "width": 2, "hidden": 4, "forward": True}
    rows = bench_moonwalk.measure("revnet", 2, size, timed=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == list(mw.METHODS)
    assert by["backprop"]["grad_error"] == 0.0
    exact = ("revbackprop", "moonwalk", "mixed_moonwalk", "forward")
    assert all(by[m]["grad_error"] < 1e-5 for m in exact), rows
    assert by["projected_forward"]["grad_error"] > 1e-2  # 16 random tangents: an estimate
    assert all(r["footprint_mib"] > 0 and r["ms"] is None for r in rows)
    assert by["moonwalk"]["drift"] is not None and by["backprop"]["drift"] is None


def test_run_notebooks_runs_them_concurrently_and_says_so(tmp_path, monkeypatch, capsys):
    """``--jobs 2`` keeps the rows in notebook order, records ``jobs``, and the README's
    sentence says each time is an upper bound; ``--jobs 0`` is refused."""
    import threading

    from benchmarks import report, run_notebooks

    running, overlap = set(), []
    lock = threading.Lock()

    def fake_run(path):
        with lock:
            running.add(path.name)
            overlap.append(len(running))
        time.sleep(0.2)
        with lock:
            running.discard(path.name)
        return float(len(path.name))

    monkeypatch.setattr(run_notebooks, "run_notebook", fake_run)
    run_notebooks.main(["--out", str(tmp_path), "--jobs", "2"])
    name = f"notebooks_{jax.default_backend()}.json"
    payload = json.loads((tmp_path / name).read_text())
    names = [r["notebook"] for r in payload["rows"]]
    assert names == sorted(names) and len(names) >= 2
    assert all(r["seconds"] == len(r["notebook"]) for r in payload["rows"])
    assert payload["jobs"] == 2 and max(overlap) == 2
    assert "2 notebooks at a time (so each time is an upper bound" in report.render_notebooks(
        payload, name
    )
    assert "at a time" not in report.render_notebooks(payload | {"jobs": 1}, name)
    beside = payload | {"jobs": 1, "env": payload["env"] | {"concurrent_jobs": 2}}
    assert ", beside 1 other benchmark (so each time is an upper bound" in (
        report.render_notebooks(beside, name)
    )
    alone = payload | {"jobs": 1, "env": payload["env"] | {"concurrent_jobs": 1}}
    assert "upper bound" not in report.render_notebooks(alone, name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_notebooks.main(["--out", str(tmp_path), "--jobs", "0"])
    assert exit_info.value.code == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_scripts_that_time_nothing_run_two_at_a_time_and_the_timed_ones_alone(
    tmp_path, monkeypatch
):
    """The untimed scripts overlap each other, a timed script overlaps none, the suite's total
    is its wall time (less than the sum), and the record and README say what ran together."""
    from benchmarks import report

    log = tmp_path / "log.txt"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "report.py").write_text("")
    for name, partner in (("a.py", "b.py"), ("b.py", "a.py"), ("timed.py", None)):
        # a.py and b.py each wait (up to 60 s) until the other has started: run one after
        # the other they would not overlap, however loaded the machine, and the test fails.
        barrier = (
            f"open({str(tmp_path / name)!r} + '.started', 'w').close()\n"
            f"while not os.path.exists({str(tmp_path / str(partner))!r} + '.started') "
            "and time.time() - start < 60:\n"
            "    time.sleep(0.05)\n"
            if partner
            else ""
        )
        (tmp_path / "benchmarks" / name).write_text(
            "import os, time\n"
            "start = time.time()\n"
            f"{barrier}"
            "time.sleep(1.0)\n"
            f"with open({str(log)!r}, 'a') as f:\n"
            f"    jobs = os.environ[{bench.CONCURRENT_ENV!r}]\n"
            f"    f.write(f'{name} {{start}} {{time.time()}} {{jobs}}\\n')\n"
        )
    monkeypatch.setattr(sys, "path", [*sys.path])  # bench._record prepends ROOT (tmp_path)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setitem(bench.SUITES, "cpu", [["a.py"], ["timed.py"], ["b.py"]])
    monkeypatch.setitem(bench.SHARED, "cpu", {"a.py", "b.py"})
    out = tmp_path / "out"
    assert bench.main(["--out", str(out)]) == 0
    lines = [line.split() for line in log.open()]
    spans = {n: (float(s), float(e)) for n, s, e, _ in lines}
    assert {n: jobs for n, *_, jobs in lines} == {"a.py": "2", "b.py": "2", "timed.py": "1"}
    overlap = lambda p, q: spans[p][0] < spans[q][1] and spans[q][0] < spans[p][1]
    assert overlap("a.py", "b.py")
    assert not overlap("timed.py", "a.py") and not overlap("timed.py", "b.py")
    record = json.loads(next(out.glob("bench_suite_cpu_*.json")).read_text())
    commands = [t["command"] for t in record["scripts"]]
    assert commands == [f"{n} --out {out}" for n in ("a.py", "timed.py", "b.py")]  # suite order
    assert record["concurrent"] == [f"a.py --out {out}", f"b.py --out {out}"]
    assert record["total_seconds"] < sum(t["seconds"] for t in record["scripts"]) - 0.5
    text = report.render_bench_suite(record, "bench_suite_cpu_cpu.json")
    assert f"the 2 scripts that time nothing (`a.py --out {out}` and `b.py --out {out}`)" in text
    assert "ran 2 at a time, the others alone" in text


def test_a_shared_script_run_alone_records_that_it_ran_alone(tmp_path, monkeypatch):
    """``--only`` one of the scripts that share the machine: it ran alone, but its record said
    ``concurrent_jobs`` 2."""
    log = tmp_path / "log.txt"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "report.py").write_text("")
    for name in ("a.py", "b.py"):
        (tmp_path / "benchmarks" / name).write_text(
            f"import os\nopen({str(log)!r}, 'a').write("
            f"'{name} ' + os.environ[{bench.CONCURRENT_ENV!r}] + '\\n')\n"
        )
    monkeypatch.setattr(sys, "path", [*sys.path])  # bench._record prepends ROOT (tmp_path)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setitem(bench.SUITES, "cpu", [["a.py"], ["b.py"]])
    monkeypatch.setitem(bench.SHARED, "cpu", {"a.py", "b.py"})
    assert bench.main(["--only", "a.py", "--out", str(tmp_path / "out")]) == 0
    assert log.read_text().split() == ["a.py", "1"]
    log.unlink()
    assert bench.main(["--out", str(tmp_path / "out")]) == 0
    assert sorted(log.read_text().splitlines()) == ["a.py 2", "b.py 2"]


def test_shared_scripts_start_longest_first_by_the_last_recorded_run(tmp_path):
    """The last full run's per-script seconds order the shared phase, longest first; a script
    it never timed starts first, ties keep the suite's order, and a run with no usable record
    keeps the suite's order."""
    command = lambda name: ["python", f"/x/benchmarks/{name}", "--out", "d"]
    suite = [command(n) for n in ("short.py", "new.py", "long.py", "mid.py", "mid2.py")]
    record = {"scripts": [{"command": "short.py", "seconds": 1.0},
                          {"command": "long.py --size cpu", "seconds": 90.0},
                          {"command": "mid.py", "seconds": 10.0},
                          {"command": "mid2.py", "seconds": 10.0}]}  # fmt: skip
    (tmp_path / "bench_suite_cpu_cpu.json").write_text(json.dumps(record))
    (tmp_path / "bench_suite_gpu_gpu.json").write_text(json.dumps({"scripts": []}))
    seconds = bench._last_seconds("cpu", tmp_path)
    assert seconds == {"short.py": 1.0, "long.py": 90.0, "mid.py": 10.0, "mid2.py": 10.0}
    ordered = [Path(c[1]).name for c in bench.longest_first(suite, seconds)]
    assert ordered == ["new.py", "long.py", "mid.py", "mid2.py", "short.py"]
    (tmp_path / "bench_suite_cpu_cpu.json").write_text("{not json")
    assert bench._last_seconds("cpu", tmp_path) == {}
    assert bench.longest_first(suite, {}) == suite


def test_the_readme_names_the_cpu_suite_and_the_scripts_that_share_the_machine():
    """The Quick start's account of `make bench` lists each command of the CPU suite, and the
    scripts it says run two at a time are exactly :data:`revjax.bench.SHARED`."""
    text = " ".join(README.read_text().split())
    for entry in bench.SUITES["cpu"]:
        assert f"`{' '.join(entry)}`" in text, entry
    sentence = text.split("The CPU scripts that time nothing (", 1)[1].split(")", 1)[0]
    assert set(re.findall(r"`([\w.]+)`", sentence)) == bench.SHARED["cpu"]


SCRIPTS = [
    "bench_activations", "bench_moonwalk", "bench_revnet", "bench_scan", "bench_transformer",
    "count_gemms", "memory_depth", "numerics_cpu", "numerics_depth", "run_notebooks", "train_lm",
]  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_refuses_an_unusable_out_before_measuring(name, tmp_path, capsys):
    """A file as --out used to fail at the first write, after the script's work (minutes for
    train_lm and run_notebooks), with a traceback; now argparse refuses it at once."""
    import importlib

    script = importlib.import_module(f"benchmarks.{name}")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out", str(afile / "sub")])
    assert exit_info.value.code == 2
    assert f"argument --out: {afile} is a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        (int, "2.5", "expected an integer, got '2.5'"),
        (int, "1e3", "expected an integer, got '1e3'"),
        (float, "fast", "expected a number, got 'fast'"),
        (int, "0", "must be finite and > 0, got 0"),
        (float, "nan", "must be finite and > 0, got nan"),
    ],
)
def test_positive_options_say_what_they_expected(kind, text, message):
    from benchmarks.common import positive

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        positive(kind)(text)
    assert positive(kind)("3") == 3


SIZED_SCRIPTS = ["bench_moonwalk", "bench_scan", "bench_transformer", "numerics_depth"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the refusal is for a CPU backend")
@pytest.mark.parametrize("name", SIZED_SCRIPTS)
def test_a_script_refuses_its_gpu_size_on_a_cpu_without_force(name, tmp_path, capsys, monkeypatch):
    """``--size gpu`` on a CPU used to start the GPU size (batch 8192, width 1024); like
    ``python -m revjax bench --size gpu`` it is now a usage error unless ``--force`` is given.
    bench_transformer learns the backend from its probe process, so it refuses after that."""
    import importlib

    script = importlib.import_module(f"benchmarks.{name}")

    def started(*args, **kwargs):  # the first result file: measuring has begun
        raise AssertionError(f"{name} began measuring the GPU size on a CPU")

    monkeypatch.setattr(script, "ResultFile", started)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--size", "gpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--size gpu is sized for a GPU or TPU and JAX sees only a CPU" in err
    assert "--force" in err
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_force_without_the_gpu_size_is_refused(capsys):
    """``--force`` forces the GPU sizes onto a CPU; with ``--size cpu`` it was accepted and
    did nothing."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--force", "--list"])
    assert exit_info.value.code == 2
    assert "--force applies to --size gpu only, got --size cpu" in capsys.readouterr().err


def test_force_reaches_the_scripts_that_take_a_size(tmp_path, capsys):
    """``bench --size gpu --force`` passes ``--force`` on to each sized script (which checks its
    size itself), and only to those: count_gemms has no ``--size`` and no ``--force``."""
    only = ["bench_scan.py", "count_gemms.py", "bench_transformer.py"]
    assert bench.main(["--size", "gpu", "--force", "--list", "--only", *only,
                       "--out", str(tmp_path)]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"bench_scan.py --size gpu --dtype float32 --force --out {tmp_path}",
        f"bench_scan.py --size gpu --dtype bfloat16 --force --out {tmp_path}",
        f"count_gemms.py --out {tmp_path}",
        f"bench_transformer.py --size gpu --force --out {tmp_path}",
    ]
    import importlib

    for name in SIZED_SCRIPTS:  # each script takes the option it is given
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(f"benchmarks.{name}").main(["--help"])
        assert exit_info.value.code == 0
        assert "--force" in capsys.readouterr().out, name
