"""Command-line parsing with Flynn's docopt usage texts shown on errors and `--help`."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad command line: print the command's usage and exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse that shows Flynn's docopt usage text instead of its own."""

    def __init__(self, usage: str, **kw: object) -> None:
        super().__init__(add_help=False, usage=argparse.SUPPRESS, **kw)  # type: ignore[arg-type]
        self.flynn_usage = usage
        self.add_argument("-h", "--help", action="store_true")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\n\n{self.flynn_usage}")

    def parse(self, argv: list[str], intermixed: bool = False) -> argparse.Namespace:
        """`intermixed`: options may come between positionals (`image import --name=x FILE`)."""
        try:
            args = self.parse_intermixed_args(argv) if intermixed else self.parse_args(argv)
        except UsageError:
            # `flynn-host stop --help`: missing arguments must not hide the usage asked for
            if "-h" not in argv and "--help" not in argv:
                raise
            args = argparse.Namespace(help=True)
        if args.help:
            print(self.flynn_usage, end="")
            raise SystemExit(0)
        return args
