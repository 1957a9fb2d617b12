"""`flynn`: the client of the controller API.

The controller does not exist yet in this project, so the only command is `version`; every
other command says so plainly and exits non-zero rather than pretending to work.
"""

from __future__ import annotations

import sys

from flynn_host import __version__

USAGE = """\
usage: flynn [-a <app>] [-c <cluster>] <command> [<args>...]

Commands available in this version:
    version    show flynn version

The controller commands (create, apps, scale, ps, log, run, ...) come with the controller.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 1
    if argv[0] in ("version", "--version"):
        print(__version__)
        return 0
    print(
        f"flynn: '{argv[0]}' needs a Flynn controller, which this version does not include yet.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
