"""How the CLI prints, matching the 2015 Go CLI: listings through a tabwriter (Go's
`text/tabwriter` with minwidth 1, padding 2, space padding) on stdout, progress and success
messages on stderr (Go's `log` without timestamps), Go's `%q` quoting, durations and times
the way Go and Docker's `units.HumanDuration` print them, and yes/no prompts."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable
from typing import Any, TextIO


class CommandError(Exception):
    """A command failed; the message is printed on stderr and flynn exits 1."""


class Exit(Exception):
    """End flynn with `status` and nothing printed (a job's own exit status, `flynn run`)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def log(msg: str) -> None:
    """A progress or success message (Go: `log.Printf`), on stderr."""
    print(msg, file=sys.stderr, flush=True)


def go_quote(s: str) -> str:
    """Go's `%q` of a string (close enough: JSON's escaping of a string is Go's for the
    printable ASCII and control characters a user types)."""
    return json.dumps(s, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# tabwriter


class TabWriter:
    """Rows of cells, aligned when flushed as Go's tabwriter aligns tab-terminated cells.

    Every cell but a row's last is padded to its column's width (the widest cell of the
    column's block of consecutive rows, plus 2); the last cell is printed as it is.
    """

    def __init__(self, out: TextIO | None = None, minwidth: int = 1, padding: int = 2) -> None:
        self.out = out
        self.minwidth = minwidth
        self.padding = padding
        self.rows: list[list[str]] = []

    def row(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        lines: list[str] = []
        self._format([], 0, len(self.rows), lines)
        return "".join(lines)

    def _format(self, widths: list[int], line0: int, line1: int, out: list[str]) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(self.rows[this]) - 1:
                this += 1
                continue
            # rows [line0, this) have no cell in this column: they are done
            self._write(widths, line0, this, out)
            line0 = this
            width = self.minwidth
            while this < line1 and column < len(self.rows[this]) - 1:
                width = max(width, len(self.rows[this][column]) + self.padding)
                this += 1
            self._format([*widths, width], line0, this, out)
            line0 = this
        self._write(widths, line0, line1, out)

    def _write(self, widths: list[int], line0: int, line1: int, out: list[str]) -> None:
        for row in self.rows[line0:line1]:
            text = []
            for j, cell in enumerate(row):
                text.append(cell.ljust(widths[j]) if j < len(widths) else cell)
            out.append("".join(text) + "\n")

    def flush(self) -> None:
        out = self.out or sys.stdout
        out.write(self.render())
        out.flush()
        self.rows = []

    def __enter__(self) -> TabWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


# --------------------------------------------------------------------------------------------
# times


def parse_time(value: str | None) -> dt.datetime | None:
    """A Go `time.Time` JSON value (RFC 3339, optional fraction) as an aware datetime."""
    if not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # fromisoformat takes at most 6 fractional digits; Go sends up to 9
    head, dot, rest = text.partition(".")
    if dot:
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = head + "." + digits[:6].ljust(6, "0") + rest
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed


def go_time_string(value: str | None) -> str:
    """What Go's `fmt` prints for a *time.Time decoded from JSON:
    `2015-05-06 21:58:12.751741 +0000 UTC` (nothing for a missing time)."""
    t = parse_time(value)
    if t is None:
        return value or "<nil>"
    frac = ""
    if t.microsecond:
        frac = ("." + f"{t.microsecond:06d}").rstrip("0")
    offset = t.utcoffset() or dt.timedelta(0)
    total = int(offset.total_seconds())
    sign = "-" if total < 0 else "+"
    hh, mm = divmod(abs(total) // 60, 60)
    numeric = f"{sign}{hh:02d}{mm:02d}"
    zone = "UTC" if total == 0 else numeric
    return f"{t:%Y-%m-%d %H:%M:%S}{frac} {numeric} {zone}"


def human_duration(seconds: float) -> str:
    """Docker's `units.HumanDuration`, which the Go CLI uses for ages."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 46:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 3:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def human_time(value: str | None, now: dt.datetime | None = None) -> str:
    """`<duration> ago`, or nothing for a missing time (Go CLI's `humanTime`)."""
    t = parse_time(value)
    if t is None:
        return ""
    now = now or dt.datetime.now(dt.UTC)
    return human_duration((now - t).total_seconds()) + " ago"


# --------------------------------------------------------------------------------------------
# prompts


def prompt_yes_no(msg: str) -> bool:
    """Ask on stdout, read `yes`/`y` or `no`/`n` from stdin; end of input means no (the Go
    CLI would ask forever)."""
    sys.stdout.write(msg + " (yes/no): ")
    sys.stdout.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            sys.stdout.write("\n")
            return False
        answer = line.strip()
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False
        sys.stdout.write("Please type 'yes' or 'no': ")
        sys.stdout.flush()


def sorted_items(mapping: dict[str, Any] | None) -> Iterable[tuple[str, Any]]:
    """A map's items in key order (Go ranges over maps in random order; sorted is stable)."""
    return sorted((mapping or {}).items())
