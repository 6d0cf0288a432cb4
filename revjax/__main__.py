"""Command line: ``python -m revjax {demo,compare,bench} [options]``."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "train a reversible digits classifier three ways and compare them",
    "compare": "gradient error, memory and time of every method on one network",
    "bench": "run the benchmarks into benchmarks/results/ and refresh the README (checkout only)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        asked = not argv or argv[0] in {"-h", "--help"}
        out = sys.stdout if asked else sys.stderr  # usage errors go to stderr, like argparse's
        if not asked:
            print(f"error: unknown command {argv[0]!r}", file=out)
        print("usage: python -m revjax {" + ",".join(COMMANDS) + "} [options]", file=out)
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}", file=out)
        return 0 if asked else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from revjax.demo import main as demo_main

        demo_main(rest)
        return 0
    if command == "compare":
        from revjax.compare import main as compare_main

        return compare_main(rest)
    from revjax.bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
