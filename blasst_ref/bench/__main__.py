"""``python -m blasst_ref.bench <subcommand> [options]``; ``--help`` lists the subcommands.

Each subcommand lives in its own module of this package (see :data:`SUBCOMMANDS`) and
registers its own argparse subparser, so that adding ``graph`` or ``int8`` touches nothing
else. Tables go to stdout, progress bars to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import SUBCOMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blasst_ref.bench",
        description="Benchmarks of blasst_ref. Every table names the machine it ran on; "
                    "compare numbers only within one run (docs/DESIGN.md §4).",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
