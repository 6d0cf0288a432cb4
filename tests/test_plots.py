"""benchmarks/plots.py draws a PNG for every result it knows, from the committed JSON."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest

from benchmarks import plots


def test_plots_are_drawn_from_the_results(tmp_path):
    written = plots.main(["--out", str(tmp_path)])
    expected = [name for name in plots.PLOTS if (plots.RESULTS / name).exists()]
    assert len(expected) >= 4  # train_lm, transformer (cpu), moonwalk, scan (gpu) at least
    assert sorted(p.name for p in written) == sorted(Path(n).stem + ".png" for n in expected)
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_every_image_in_the_readme_exists():
    import re

    root = Path(__file__).resolve().parents[1]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (root / "README.md").read_text())
    assert len(images) >= 6
    for image in images:
        assert (root / image).is_file(), image


def test_gpu_results_are_plotted_like_cpu_ones_and_partial_runs_say_so(tmp_path, monkeypatch):
    """Every CPU-size result with a plot has its GPU-size twin plotted too; a result whose run
    stopped early (``complete`` false) is drawn with "PARTIAL RUN" in its title."""
    import json

    for name in plots.PLOTS:
        if name.endswith("_cpu_cpu.json"):
            assert name.replace("_cpu_cpu.json", "_gpu_gpu.json") in plots.PLOTS, name
    payload = json.loads((plots.RESULTS / "moonwalk_cpu_cpu.json").read_text())
    payload["env"] |= {"backend": "gpu", "device": "NVIDIA H100 80GB HBM3"}
    payload["rows"] = [r for r in payload["rows"] if r["depth"] <= 12]  # stopped at L = 12
    payload["complete"] = False
    (tmp_path / "moonwalk_gpu_gpu.json").write_text(json.dumps(payload))
    titles = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: titles.append(fig.axes[0].get_title())
                        or close(fig))  # fmt: skip
    written = plots.main(["--results", str(tmp_path), "--out", str(tmp_path)])
    assert [p.name for p in written] == ["moonwalk_gpu_gpu.png"]
    assert titles == [
        f"moonwalk_gpu_gpu (PARTIAL RUN, NVIDIA H100 80GB HBM3, {payload['env']['date']})"
    ]


def test_a_missing_results_folder_is_an_error_not_an_empty_run(tmp_path, capsys):
    """It used to exit 0 having drawn and said nothing."""
    with pytest.raises(SystemExit) as exit_info:
        plots.main(["--results", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_bad_out_or_an_unreadable_result_is_said_in_one_line(tmp_path, capsys):
    """A path below a file raised NotADirectoryError from mkdir, and one malformed result JSON
    a JSONDecodeError that stopped every other plot."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stop:
        plots.main(["--out", str(tmp_path / "file" / "sub")])
    assert stop.value.code == 2 and "is a file" in capsys.readouterr().err
    results = tmp_path / "results"
    results.mkdir()
    names = [n for n in plots.PLOTS if (plots.RESULTS / n).exists()]
    (results / names[0]).write_text("{not json")
    (results / names[1]).write_text((plots.RESULTS / names[1]).read_text())
    (results / names[2]).write_text('{"env": {"device": "cpu", "date": "today"}}')  # no rows
    with pytest.raises(SystemExit, match=f"not a result JSON, not plotted:\n  .*{names[0]}"):
        plots.main(["--results", str(results), "--out", str(tmp_path / "png")])
    assert [p.name for p in (tmp_path / "png").iterdir()] == [Path(names[1]).stem + ".png"]


def test_a_result_without_rows_draws_no_blank_png(tmp_path, capsys):
    """A run stopped before its first row was drawn as an empty PNG (and a matplotlib warning)."""
    import json

    payload = json.loads((plots.RESULTS / "moonwalk_cpu_cpu.json").read_text())
    payload["rows"], payload["complete"] = [], False
    (tmp_path / "moonwalk_cpu_cpu.json").write_text(json.dumps(payload))
    assert plots.main(["--results", str(tmp_path), "--out", str(tmp_path)]) == []
    assert not list(tmp_path.glob("*.png"))
    assert "skipped" in capsys.readouterr().out
