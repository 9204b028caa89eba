"""The ``powerfast`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="powerfast",
        description="Sample from the power distribution p(x)^alpha of a language model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from powerfast import toy

    toy_parser = commands.add_parser("toy", help="the paper's PLAN/GUESS toy: exact values and Monte Carlo estimates")
    toy.add_arguments(toy_parser)
    toy_parser.set_defaults(handler=toy.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
