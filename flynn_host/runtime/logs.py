"""A job's output log: one JSON entry per line of container output, in a file that rotates once.

The shim writes it (`LogWriter`) as the container produces output; the daemon and the shim read it
(`read_entries`) to replay logs to `flynn log` and attach clients. An entry is
`{"n": seq, "t": time, "s": "stdout"|"stderr", "m": text}` plus `"p": true` when the text did
not end with a newline (so a replay can put the bytes back together exactly). Sequence numbers
increase across rotation, which lets a reader resume with `since` without duplicates. When the
file grows past `max_bytes` it becomes `<path>.1` (replacing the previous one), so at most about
twice `max_bytes` is kept per job. Stdlib only: the shim imports this and must start fast.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

STREAMS = ("stdout", "stderr")

# A line longer than this is cut into partial entries: a program that never prints a newline
# must not make the shim buffer without bound, and entries stay small enough to replay.
MAX_LINE = 64 * 1024

# How far back `LogWriter` looks for the last sequence number; an entry is at most MAX_LINE
# bytes of text, and JSON escaping can make that up to six times longer.
_TAIL_LIMIT = 8 * MAX_LINE

Entry = dict[str, Any]


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_entry(entry: Entry) -> bytes:
    """An entry as one line of the log file (and of the shim's log feed), newline included.

    Written out by hand because it runs for every line of output: several times faster than
    `json.dumps(ensure_ascii=False)`, with the same result (`encode_basestring` is the string
    encoder json itself uses).
    """
    n, t, s, m = int(entry["n"]), entry["t"], entry["s"], entry["m"]
    partial = ',"p":true' if entry.get("p") else ""
    t, s, m = encode_basestring(t), encode_basestring(s), encode_basestring(m)
    return f'{{"n":{n},"t":{t},"s":{s},"m":{m}{partial}}}\n'.encode()


def _cut(data: bytes | bytearray, limit: int) -> int:
    """Where to cut `data` at most `limit` bytes in without splitting a UTF-8 character."""
    cut = limit
    # back up over continuation bytes (0b10xxxxxx), at most three of them
    while cut > limit - 3 and cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def _last_seq(path: str) -> int:
    """The sequence number of the last complete entry in `path`, or 0."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - _TAIL_LIMIT)
            f.seek(start)
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    if start > 0:
        lines = lines[1:]  # the first line is probably cut in the middle
    for line in reversed(lines):
        entry = _parse(line)
        if entry is not None:
            return entry["n"]
    return 0


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _parse(line: bytes) -> Entry | None:
    """An entry from one line of a log file, or None for a torn or foreign line."""
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("n"), int):
        return None
    return entry


class LogWriter:
    """Turns output chunks into log entries, appending each to the file as soon as it is whole.

    `listeners` are called with every entry after it has reached the file, so a reader that
    reads the file and then subscribes (without yielding in between) sees every entry once.
    """

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.listeners: list[Callable[[Entry], None]] = []
        self.seq = _last_seq(path) or _last_seq(path + ".1")
        self._pending: dict[str, bytearray] = {s: bytearray() for s in STREAMS}
        self._file = self._open()
        self._size = self._file.seek(0, os.SEEK_END)
        if self._size and not self._ends_with_newline():
            # a writer died mid-entry: end the torn line so the next entry stays readable
            self._size += self._file.write(b"\n")

    def _open(self) -> io.FileIO:
        # unbuffered: every entry reaches the OS as soon as it is written; created 0600, as a
        # job's output often shows its secrets (rotation renames it, keeping the mode)
        return open(self.path, "ab", buffering=0, opener=_private)  # noqa: SIM115 (kept open)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def write(self, stream: str, data: bytes) -> None:
        """Log a chunk of `stream` output; a trailing partial line waits for its newline."""
        pending = self._pending[stream]
        pending += data
        *lines, rest = pending.split(b"\n")
        entries: list[Entry] = []
        now = _timestamp()  # the lines of one chunk arrived together
        for line in lines:
            tail = self._cut_long(stream, line, entries, now)
            entries.append(self._entry(stream, tail, False, now))
        pending[:] = self._cut_long(stream, rest, entries, now)
        self._append(entries)

    def _cut_long(
        self, stream: str, text: bytes | bytearray, entries: list[Entry], now: str
    ) -> bytes | bytearray:
        """Move MAX_LINE pieces of `text` into `entries` as partial entries; return the rest."""
        while len(text) > MAX_LINE:
            cut = _cut(text, MAX_LINE)
            entries.append(self._entry(stream, text[:cut], True, now))
            text = text[cut:]
        return text

    def flush_partial(self) -> None:
        """Log any buffered incomplete lines now, as partial entries."""
        entries = []
        now = _timestamp()
        for stream, pending in self._pending.items():
            if pending:
                entries.append(self._entry(stream, bytes(pending), True, now))
                pending.clear()
        self._append(entries)

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush_partial()
        self._file.close()

    def _entry(self, stream: str, text: bytes | bytearray, partial: bool, now: str) -> Entry:
        self.seq += 1
        entry: Entry = {
            "n": self.seq,
            "t": now,
            "s": stream,
            "m": text.decode("utf-8", errors="replace"),
        }
        if partial:
            entry["p"] = True
        return entry

    def _append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        buf = bytearray()
        for entry in entries:
            buf += encode_entry(entry)
            if self._size + len(buf) > self.max_bytes:
                self._write(buf)
                buf.clear()
                self._rotate()
        self._write(buf)
        for entry in entries:
            for listener in list(self.listeners):
                listener(entry)

    def _write(self, buf: bytearray) -> None:
        view = memoryview(buf)
        while view:
            n = self._file.write(view)
            view = view[n:]
            self._size += n

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path + ".1")
        self._file = self._open()
        self._size = 0


def _read_file(path: str) -> list[Entry]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [e for e in map(_parse, data.split(b"\n")) if e is not None]


def read_entries(
    path: str,
    since: int = 0,
    lines: int | None = None,
    streams: set[str] | None = None,
) -> list[Entry]:
    """Entries with seq > `since` from `<path>.1` and `path`, oldest first.

    `streams` keeps only those streams; `lines` keeps only the last that many entries (after
    filtering; None means all). A torn last line (a writer mid-entry) is skipped.
    """
    for _ in range(3):
        older = _read_file(path + ".1")
        newer = _read_file(path)
        # The writer may have rotated between the two reads; then `newer` starts well after
        # `older` ends and the entries in between are in the new `.1`: read again.
        if not (older and newer) or newer[0]["n"] <= older[-1]["n"] + 1:
            break
    keep: deque[Entry] | list[Entry] = deque(maxlen=max(lines, 0)) if lines is not None else []
    for entry in older + newer:
        if entry["n"] > since and (streams is None or entry.get("s") in streams):
            keep.append(entry)
    return list(keep)


def format_entry(entry: Entry) -> bytes:
    """The output bytes an entry stands for: its text, plus a newline unless it was partial."""
    text = entry.get("m", "")
    return (text if entry.get("p") else text + "\n").encode()


def remove_logs(path: str) -> None:
    """Delete a job's log and its rotated predecessor, if present."""
    for name in (path, path + ".1"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
