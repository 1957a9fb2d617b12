"""What the aggregator, the hosts that ship to it and the controller that reads from it share:
a log message, a host's cursor, the names of streams and the limits (docs/logaggregator.md)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

SERVICE = "logaggregator"
DEFAULT_API_PORT = 5000
DEFAULT_SYSLOG_PORT = 3000
STATUS_PATH = "/.well-known/status"

# the largest RFC 5424 message accepted in one RFC 6587 frame (longer ones close the connection)
MAX_MESSAGE = 64 * 1024
# the last messages kept per app, and at most these many bytes of message text per app
BUFFER_MESSAGES = 10_000
BUFFER_BYTES = 32 * 1024 * 1024
# the most `lines` a reader can ask for (Flynn's 0-10000)
MAX_LINES = 10_000

STDOUT, STDERR, INIT = "stdout", "stderr", "init"
STREAMS = (STDOUT, STDERR, INIT)
# RFC 5424 MSGID <-> stream, as Flynn's host log mux writes them
STREAM_BY_MSGID = {"ID1": STDOUT, "ID2": STDERR, "ID3": INIT}
MSGID_BY_STREAM = {v: k for k, v in STREAM_BY_MSGID.items()}
# facility 23 (local7), severity 6 (info)
PRI = 23 * 8 + 6

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch as Go's RFC3339Nano in UTC: trailing zeros of the fraction
    dropped, no fraction when it is zero."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = (_EPOCH + dt.timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%S")
    if not frac:
        return base + "Z"
    return f"{base}.{frac:09d}".rstrip("0") + "Z"


_base_cache: dict[str, int] = {}


def parse_time(s: str) -> int:
    """An RFC 3339 timestamp (up to 9 fraction digits, `Z` or an offset) as nanoseconds since
    the epoch. ValueError if it is not one."""
    if len(s) < 20 or s[10] != "T":
        raise ValueError(f"bad timestamp {s!r}")
    rest = s[19:]
    frac_ns = 0
    if rest[:1] == ".":
        i = 1
        while i < len(rest) and rest[i].isdigit():
            i += 1
        digits = rest[1:i]
        if not 1 <= len(digits) <= 9:
            raise ValueError(f"bad timestamp {s!r}")
        frac_ns = int(digits.ljust(9, "0"))
        rest = rest[i:]
    key = s[:19] + rest
    secs = _base_cache.get(key)
    if secs is None:
        if rest in ("Z", "z"):
            rest = "+00:00"
        if len(rest) != 6 or rest[0] not in "+-":
            raise ValueError(f"bad timestamp {s!r}")
        when = dt.datetime.fromisoformat(s[:19] + rest)
        secs = (when - _EPOCH) // dt.timedelta(seconds=1)
        if len(_base_cache) > 4096:  # one entry per second of log: keep it small
            _base_cache.clear()
        _base_cache[key] = secs
    return secs * 1_000_000_000 + frac_ns


@dataclass(frozen=True, order=True)
class Cursor:
    """A host's position in its own log: the newest (time, seq) the aggregator accepted from it.
    A message at or before it is a duplicate. Flynn's `{"time","seq"}`."""

    time: int  # nanoseconds since the epoch
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {"time": format_time(self.time), "seq": self.seq}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cursor:
        return cls(parse_time(str(d["time"])), int(d["seq"]))


SOURCE_APP = "app"


class Message:
    """One log line of a job. `seq` is the sending host's sequence number (0: none); `time` is
    nanoseconds since the epoch; `source` is who wrote it: `app` (a job's output, the default),
    or a platform component writing about the app (`controller`: deploy progress)."""

    __slots__ = (
        "app_id", "host_id", "job_id", "process_type", "stream", "time", "seq", "msg", "source"
    )  # fmt: skip

    def __init__(
        self,
        app_id: str,
        host_id: str,
        job_id: str,
        process_type: str,
        stream: str,
        time: int,
        seq: int,
        msg: str,
        source: str = SOURCE_APP,
    ) -> None:
        self.app_id = app_id
        self.host_id = host_id
        self.job_id = job_id
        self.process_type = process_type
        self.stream = stream
        self.time = time
        self.seq = seq
        self.msg = msg
        self.source = source

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "Message(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def to_json(self) -> dict[str, Any]:
        """The API's JSON (Flynn's logaggregator Message)."""
        return {
            "host_id": self.host_id,
            "job_id": self.job_id,
            "msg": self.msg,
            "process_type": self.process_type,
            "source": self.source,
            "stream": self.stream,
            "timestamp": format_time(self.time),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], app_id: str = "") -> Message:
        return cls(
            app_id=str(d.get("app_id", app_id)),
            host_id=str(d.get("host_id", "")),
            job_id=str(d.get("job_id", "")),
            process_type=str(d.get("process_type", "")),
            stream=str(d.get("stream", STDOUT)),
            time=parse_time(str(d["timestamp"])),
            seq=int(d.get("seq", 0)),
            msg=str(d.get("msg", "")),
            source=str(d.get("source") or SOURCE_APP),
        )
