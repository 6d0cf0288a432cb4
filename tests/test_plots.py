"""benchmarks/plots.py draws a PNG for every result it knows, from the committed JSON."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
