"""The `rsd` command: a small dispatcher; each subcommand lives in its own module.

Errors a user can fix (bad input, invalid data, unreachable storage) print as one line
`error: ...` on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rsd_cli.data_cmd import add_data_parser
from rsd_cli.pipeline_cmd import add_pipeline_parsers
from rsd_cli.restore_cmd import add_restore_parser
from rsd_cli.serve_cmd import add_serve_parser

# Register subcommands here: each adds its parser and sets `func` (args -> exit code).
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_data_parser, add_pipeline_parsers, add_restore_parser, add_serve_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsd",
        description="Restoration Score Distillation: one-step generators learnt from corrupted data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
