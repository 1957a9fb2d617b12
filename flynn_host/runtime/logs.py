"""A job's output log: one JSON entry per line of container output, in a file that rotates once.

The shim writes it (`LogWriter`) as the container produces output; the daemon and the shim read it
(`read_entries`) to replay logs to `flynn log` and attach clients; `LogReader` reads it forward a
chunk at a time from any entry (found by binary search), for readers that must keep up with a
busy job (the job manager's log feed, the log mux's shippers), and `tail_entries` its newest
entries. An entry is
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
from typing import Any, BinaryIO

STREAMS = ("stdout", "stderr")

# A line longer than this is cut into partial entries: a program that never prints a newline
# must not make the shim buffer without bound, and entries stay small enough to replay.
MAX_LINE = 64 * 1024

# How far back `LogWriter` looks for the last sequence number; an entry is at most MAX_LINE
# bytes of text, and JSON escaping can make that up to six times longer.
_TAIL_LIMIT = 8 * MAX_LINE

# reading a log forward: bytes per read, and the span below which a binary search for an entry
# gives way to reading forward
READ_CHUNK = 256 * 1024
SEARCH_SPAN = 64 * 1024

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


def _read_file(path: str, since: int = 0) -> list[Entry]:
    """The entries of one file (those after `since`, found by binary search, and maybe a few
    before)."""
    try:
        with open(path, "rb") as f:
            if since:
                _seek(f, since + 1)
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
        older = _read_file(path + ".1", since)
        newer = _read_file(path, since)
        # The writer may have rotated between the two reads; then `newer` starts well after
        # `older` ends and the entries in between are in the new `.1`: read again.
        if not (older and newer) or newer[0]["n"] <= older[-1]["n"] + 1:
            break
    keep: deque[Entry] | list[Entry] = deque(maxlen=max(lines, 0)) if lines is not None else []
    for entry in older + newer:
        if entry["n"] > since and (streams is None or entry.get("s") in streams):
            keep.append(entry)
    return list(keep)


def _first_n(f: BinaryIO) -> int | None:
    f.seek(0)
    entry = _parse(f.readline())
    return entry["n"] if entry else None


def _seek(f: BinaryIO, n: int) -> None:
    """Leave `f` at the start of a line at or before the first entry with job seq >= n."""
    lo, hi = 0, os.fstat(f.fileno()).st_size
    # invariant: the first line starting after `lo` comes before entry n (or lo is 0)
    while hi - lo > SEARCH_SPAN:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # the rest of the line `mid` falls in
        entry = _parse(f.readline())
        if entry is not None and entry["n"] < n:
            lo = mid
        else:
            hi = mid
    f.seek(lo)
    if lo:
        f.readline()


def _close(*files: BinaryIO | None) -> None:
    for f in files:
        if f is not None:
            f.close()


def _open(path: str) -> BinaryIO | None:
    try:
        return open(path, "rb")  # noqa: SIM115 (kept open by the reader)
    except FileNotFoundError:
        return None


class LogReader:
    """A job's log entries by seq, read forward in chunks from where the last read stopped
    (a reader that keeps up, the log mux's shippers, the job manager catching up): an entry is
    found by binary search (the files are in seq order), and the reader follows the file to
    its successor when the writer rotates it. An entry rotated out of both files is gone; the
    reader then goes on with the oldest one still there (the caller sees the jump in `n`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._tail = b""  # an incomplete last line, until its newline is written
        self._pending: deque[Entry] = deque()
        self._next = 0  # the n a read continuing where the last stopped asks for

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read(self, n: int, limit: int) -> list[Entry]:
        """Up to `limit` entries from `n` on, in order: the first is entry `n` unless that one
        is gone (rotated out), then the oldest after it. [] when there is none (yet)."""
        if self._f is None or n != self._next:
            self._locate(n)
        pending = self._pending
        while pending and pending[0]["n"] < n:
            pending.popleft()
        while len(pending) < limit and self._fill(n):
            pass
        out = [pending.popleft() for _ in range(min(limit, len(pending)))]
        if out:
            self._next = out[-1]["n"] + 1
        return out

    def _fill(self, n: int) -> bool:
        """Parse the next chunk into the pending entries; False at the end of what is there."""
        f = self._f
        if f is None:
            return False
        data = f.read(READ_CHUNK)
        if not data:
            if not self._rotated():
                return False
            # the file we read is `.1` now (or gone) and we read all of it: the next lines are
            # in the file that replaced it
            last = self._pending[-1]["n"] if self._pending else self._next - 1
            pending, was = list(self._pending), os.fstat(f.fileno()).st_ino
            self._locate(max(last + 1, n))
            self._pending.extend(pending)  # (_locate cleared them)
            return self._f is not None and os.fstat(self._f.fileno()).st_ino != was
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            entry = _parse(line)
            if entry is not None and entry["n"] >= n:
                self._pending.append(entry)
        return True

    def _rotated(self) -> bool:
        assert self._f is not None
        try:
            return os.stat(self.path).st_ino != os.fstat(self._f.fileno()).st_ino
        except FileNotFoundError:
            return True

    def _locate(self, n: int) -> None:
        """Open the file holding entry `n` (or the oldest after it) and seek to it."""
        self.close()
        self._tail = b""
        self._pending.clear()
        self._next = n
        for _ in range(5):
            cur, old = _open(self.path), _open(self.path + ".1")
            try:
                first_cur = _first_n(cur) if cur else None
                first_old = _first_n(old) if old else None
                # rotated between the two opens: the pair is not what it seems, look again
                consistent = not (
                    (cur and old and os.fstat(cur.fileno()).st_ino == os.fstat(old.fileno()).st_ino)
                    or (first_cur is not None and first_old is not None and first_old >= first_cur)
                )
            except BaseException:
                _close(cur, old)
                raise
            if not consistent:
                _close(cur, old)
                continue
            if first_cur is not None and (first_cur <= n or first_old is None):
                chosen, other = cur, old
            else:
                chosen, other = old, cur
            _close(other)
            self._f = chosen
            if chosen is not None:
                _seek(chosen, n)
            return
        # the file kept turning over under us: try again on the next read
        self._f = None


def tail_entries(path: str, limit: int, max_bytes: int) -> list[Entry]:
    """The newest `limit` entries of a job's log (`.1` too if need be), oldest first, reading
    at most about `max_bytes` from the end."""
    newest_first: list[Entry] = []
    budget = max_bytes
    for name in (path, path + ".1"):
        f = _open(name)
        if f is None:
            continue
        with f:
            end = f.seek(0, os.SEEK_END)
            carry = b""
            while end > 0 and len(newest_first) < limit and budget > 0:
                start = max(0, end - min(READ_CHUNK, budget))
                f.seek(start)
                data = f.read(end - start) + carry
                budget -= end - start
                end = start
                lines = data.split(b"\n")
                carry = lines.pop(0) if start > 0 else b""
                for line in reversed(lines):
                    entry = _parse(line)
                    if entry is not None:
                        newest_first.append(entry)
                        if len(newest_first) >= limit:
                            break
        if len(newest_first) >= limit or budget <= 0:
            break
    # a rotation while we read could repeat entries: keep one of each, in order
    return sorted({e["n"]: e for e in newest_first}.values(), key=lambda e: e["n"])


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
