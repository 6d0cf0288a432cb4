"""The README's Python example runs, and its results section matches benchmarks/results/."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    """The blocks run in order in one namespace, as a reader would run them."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "README lost its python examples"
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_results_are_generated_from_json():
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --- no hand-typed measurements -----------------------------------------------------------------
# Every measured number in the README comes from benchmarks/results/ through a renderer of
# benchmarks/report.py (between <!-- results:NAME --> markers) or is stated as the bound a test
# asserts. Outside the generated blocks, fenced code and inline code expressions, prose and
# tables must not contain measured-looking numbers.

_GENERATED = re.compile(r"<!-- results:(\w+) -->\n.*?<!-- /results:\1 -->", re.S)
_FENCED = re.compile(r"```.*?```", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_CODE_SPAN = re.compile(r"`[^`]+`")
_MEASURED = re.compile(
    r"""
      (?<![\w.])(?!1e[-+]?\d)\d+(?:\.\d+)?e[-+]?\d+\b  # scientific notation, except 1e-N
    | (?<![\w.])\d+\.\d+                              # decimals: 0.22, 98.1
    | \d+(?:\.\d+)?\s?%                                # percentages: 2%, 98.1%
    | \d+(?:\.\d+)?\s?(?:[KMGT]i?B|bytes|dB|ms|s)\b    # quantities: 6.5 MiB, 57 dB, 16 s
    | \d+(?:\.\d+)?\s?(?:seconds?|minutes?|hours?|percent|tokens/s)\b  # spelled-out units
    | \d+(?:\.\d+)?\s?×                               # factors written with ×
    | \d+(?:\.\d+)?x\b                                 # factors: 0.25x, 72x faster
    | \d+\s+times\b                                    # 13 to 50 times better
    | (?<![\w./])1/\d+\b                               # ratios: 1/53
    | ~\s?\d                                           # approximations: ~200
    """,
    re.X,
)
# Powers of ten (1e-5) are tolerances the tests assert, never printed measurements. Phrases
# below contain numbers that are configuration or asserted bounds, not measurements.
_ALLOWED = {
    "Python >= 3.11": "the supported Python versions",
    "arXiv 2402.14212": "a paper identifier",
    "arXiv 2407.15545": "a paper identifier",
    "0.5/sqrt(": "the weight scale of the test networks (configuration)",
    "at least 95%": "the accuracy bar tests/test_revnet.py asserts",
    "within 1%": "tests/test_revnet.py and tests/test_lm_training.py assert it",
    "at least 20%": "tests/test_lm_training.py asserts it",
    "within 5%": "tests/test_transformer.py asserts it",
    "more than 4x": "tests/test_transformer.py asserts it",
    "within 3x": "tests/test_moonwalk_gradients.py asserts it (projected forward gradient)",
    "at most 1/4": "tests/test_moonwalk_gradients.py and tests/test_sharding.py assert it (memory)",
    "4 times wider": "hidden / width of the memory_depth.py network (configuration)",
    "exceeds 90%": "the memory budget of numerics_depth.py (configuration)",
}


def _is_code(span: str) -> bool:
    """Inline code that is an expression or a name (``abs(gamma) + 0.01``, ``k = 4``,
    ``<= 1e-5``), not a bare number dressed as code (``2.9e-6``, ``105 bytes``)."""
    return span[:1].isalpha() or span[:1] in "_.<>=" or any(c in span for c in "()=<>")


def prose(markdown: str) -> str:
    """The README without generated result blocks, fenced code, comments, inline code and the
    allowed phrases. Tables are kept: a hand-typed results table is flagged like prose."""
    text = _COMMENT.sub("", _FENCED.sub("", _GENERATED.sub("", markdown)))
    text = _CODE_SPAN.sub(lambda m: "" if _is_code(m.group(0)[1:-1]) else m.group(0), text)
    for phrase in _ALLOWED:
        text = text.replace(phrase, "")
    return text


def measured_numbers(markdown: str) -> list[str]:
    """Each measured-looking number in the prose, with some context."""
    text = prose(markdown)
    return [
        " ".join(text[max(m.start() - 30, 0) : m.end() + 30].split())
        for m in _MEASURED.finditer(text)
    ]


def test_readme_prose_has_no_hand_typed_measurements():
    found = measured_numbers((ROOT / "README.md").read_text())
    assert not found, (
        "measured numbers typed by hand in README.md (render them from benchmarks/results/ "
        "in benchmarks/report.py, or state the bound a test asserts):\n" + "\n".join(found)
    )


def test_every_allowed_phrase_is_still_in_the_readme():
    """A stale allow-list entry would silently allow a measurement later."""
    text = (ROOT / "README.md").read_text()
    assert [phrase for phrase in _ALLOWED if phrase not in text] == []


@pytest.mark.parametrize(
    "text",
    [
        "the gradient error is 0.22 without anchors and 2.9e-6 with k = 4",
        "the error with it: 6.6e-5 at L = 16",
        "needs 1/53 of plain backprop's gradient temp memory",
        "falls from 57 dB after one step to -28 dB",
        "mixed Moonwalk needs 6.5 MiB against backprop's 56.3 MiB",
        "it trains to 98.1% test accuracy, about 16 s for both",
        "2 to 6% slower than per-layer checkpointing",
        "a float32 stream is 13 to 50 times better",
        "max |x| ~ 200 at L = 64 and ~3e7 at L = 256",
        "52.5 MiB with activations.gelu (0.25x)",
        "with highest precision it is 2e-7 to 3e-7",
        "| 8 | 26.25 | 2.94 |",  # a hand-typed results table
        "the error is `2.9e-6`",  # a number dressed as code
        "it took 16 seconds, the suite 3 minutes, at 5000 tokens/s",
        "reversible is 1.8 × faster",
    ],
)
def test_measured_numbers_are_detected(text):
    assert measured_numbers(text)


@pytest.mark.parametrize(
    "text",
    [
        "the tests bound it at 1e-5; gradients equal backprop to `<= 1e-6`",
        "halves 64 wide, 4 blocks, batch 512, L = 16, depth 4 and 32",
        "<!-- results:x -->\nthe error is 2.9e-6 (measured)\n<!-- /results:x -->",
        "```python\nscale = 0.5  # 2.9e-6\n```",
        "on the 8x8 digits, with the layer's `slope 0.1` and `abs(gamma) + 0.01`",
        "(Python >= 3.11; it needs at most 1/4 of the memory)",
    ],
)
def test_configuration_and_bounds_are_not_flagged(text):
    assert not measured_numbers(text)


def test_every_renderer_has_a_marker_in_the_readme():
    """A result file without a README block would be rendered nowhere."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import RENDERERS

    markers = set(re.findall(r"<!-- results:(\w+) -->", (ROOT / "README.md").read_text()))
    assert markers == set(RENDERERS)


KEEP_A_CHANGELOG_ORDER = ["Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"]


def test_changelog_follows_keep_a_changelog():
    """An Unreleased section first, then dated releases; in each, every change type at most
    once and in the format's order."""
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.split(r"^## ", text, flags=re.M)[1:]
    assert releases[0].startswith("[Unreleased]")
    for release in releases[1:]:
        assert re.match(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}-\d{2}\n", release), release[:40]
    for release in releases:
        kinds = re.findall(r"^### (\w+)$", release, flags=re.M)
        assert kinds, release[:40]
        assert set(kinds) <= set(KEEP_A_CHANGELOG_ORDER), kinds
        assert kinds == sorted(set(kinds), key=KEEP_A_CHANGELOG_ORDER.index), kinds
