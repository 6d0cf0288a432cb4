"""Command line: ``python -m revjax demo [options]``."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "train a reversible digits classifier three ways and compare them"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m revjax {" + ",".join(COMMANDS) + "} [options]")
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    if argv[0] == "demo":
        from revjax.demo import main as demo_main

        demo_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
