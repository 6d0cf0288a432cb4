"""``python -m revjax bench``: part of a suite, results elsewhere, failures reported."""

from __future__ import annotations

import json

from revjax import bench


def test_only_runs_the_named_scripts_into_out_and_leaves_the_readme(tmp_path, capsys):
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert listed == [f"count_gemms.py --out {tmp_path}"]  # no plots.py / report.py refresh
    assert bench.main(["--only", "count_gemms.py", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gemm_count_cpu.json").read_text())
    assert record["env"]["backend"] == "cpu"
    assert not list(tmp_path.glob("bench_suite_*.json"))  # a partial run records no total


def test_unknown_scripts_are_refused(capsys):
    assert bench.main(["--only", "nope.py"]) == 2
    assert "['nope.py'] not in the cpu suite" in capsys.readouterr().err


def test_a_failing_script_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    suite = [["count_gemms.py", "--no-such-flag"], ["count_gemms.py"]]
    monkeypatch.setitem(bench.SUITES, "cpu", suite)
    assert bench.main(["--out", str(tmp_path), "--timeout", "300"]) == 1
    err = capsys.readouterr().err
    assert "count_gemms.py --no-such-flag" in err and "exit 2" in err
    assert (tmp_path / "gemm_count_cpu.json").exists()  # the second script still ran
