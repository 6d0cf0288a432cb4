"""``python -m revjax bench``: part of a suite, results elsewhere, failures reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import pytest

from revjax import bench

README = Path(__file__).resolve().parents[1] / "README.md"
GEMMS = f"gemm_count_{jax.default_backend()}.json"


def test_only_runs_the_named_scripts_into_out_and_leaves_the_readme(tmp_path, capsys):
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed == [f"count_gemms.py --out {tmp_path}"]  # no plots.py / report.py refresh
    readme = README.read_text()
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / GEMMS).read_text())
    assert record["env"]["backend"] == jax.default_backend()
    assert README.read_text() == readme
    assert not list(tmp_path.glob("bench_suite_*.json"))  # a partial run records no total


def test_unknown_scripts_are_refused(capsys):
    assert bench.main(["--only", "nope.py"]) == 2
    assert "['nope.py'] not in the cpu suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--timeout", "-5"])
    assert "--timeout must be > 0 seconds, got -5.0" in capsys.readouterr().err


def test_a_failing_script_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    suite = [["count_gemms.py", "--no-such-flag"], ["count_gemms.py"]]
    monkeypatch.setitem(bench.SUITES, "cpu", suite)
    assert bench.main(["--out", str(tmp_path), "--timeout", "300"]) == 1
    err = capsys.readouterr().err
    assert "count_gemms.py --no-such-flag" in err and "exit 2" in err
    assert (tmp_path / GEMMS).exists()  # the second script still ran


def test_a_script_past_its_timeout_is_killed_with_its_children(tmp_path, capsys, monkeypatch):
    """The script starts a child that would outlive it; the timeout kills the whole group."""
    marker = tmp_path / "child_survived"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "report.py").write_text("")
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(4)\nopen({str(marker)!r}, 'w').close()\n")
    (tmp_path / "benchmarks" / "slow.py").write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child)!r}])\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(bench, "ROOT", tmp_path)  # bench looks for ROOT/benchmarks/<script>
    monkeypatch.setitem(bench.SUITES, "cpu", [["slow.py"]])
    assert bench.main(["--out", str(tmp_path), "--timeout", "1"]) == 1
    assert "timed out after 1 s" in capsys.readouterr().err
    time.sleep(5)  # past the moment the orphaned child would have written the marker
    assert not marker.exists()
