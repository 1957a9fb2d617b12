"""The wire format between a host's log shipper and the aggregator, both ways in one module:
RFC 5424 messages in RFC 6587 octet-counted frames (`<len> <message>`), as Flynn's host log mux
writes them.

    <190>1 2015-12-14T10:00:00.123456789Z <host> <app> <type>.<job> ID1 [flynn seq="42"] text

PRI 190 is facility 23 (local7), severity 6 (info); MSGID ID1/ID2/ID3 is stdout/stderr/init;
PROCID is `<process type>.<job id>` or just the job ID; the structured data element
`[flynn seq="N"]` carries the host's sequence number for cursors (`-` when there is none), and
`source="controller"` (or another component's name) marks a line a platform component wrote
about the app rather than the app's own output (`source` in the API; `app` when absent).
`FrameParser` is a streaming decoder with a fixed bound on what it holds.
"""

from __future__ import annotations

import re

from flynn_logaggregator.types import (
    MAX_MESSAGE,
    MSGID_BY_STREAM,
    PRI,
    SOURCE_APP,
    STDOUT,
    STREAM_BY_MSGID,
    Message,
    format_time,
    parse_time,
)

_MAX_LEN_DIGITS = len(str(MAX_MESSAGE))
_FLYNN_SD = re.compile(rb"\[flynn((?: [a-z]+=\"[^\"\\\\\]]*\")*)\]")
_SEQ = re.compile(rb' seq="(\d{1,20})"')
_SOURCE = re.compile(rb' source="([a-z][a-z0-9-]{0,31})"')


class FrameError(ValueError):
    """The byte stream is not RFC 6587 octet-counted frames within the size limit. `frames`:
    the complete frames that came before the bad one in the same `feed`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.frames: list[bytes] = []


class MessageError(ValueError):
    """A frame does not hold an RFC 5424 message the aggregator can use."""


def _nil(s: str) -> str:
    return s if s else "-"


def format_message(m: Message) -> bytes:
    """`m` as one RFC 6587 frame of an RFC 5424 message (the host side's encoder)."""
    procid = f"{m.process_type}.{m.job_id}" if m.process_type else m.job_id
    params = (f' seq="{m.seq}"' if m.seq else "") + (
        f' source="{m.source}"' if m.source != SOURCE_APP else ""
    )
    sd = f"[flynn{params}]" if params else "-"
    head = (
        f"<{PRI}>1 {format_time(m.time)} {_nil(m.host_id)} {_nil(m.app_id)} {_nil(procid)} "
        f"{MSGID_BY_STREAM.get(m.stream, 'ID1')} {sd} "
    ).encode()
    body = head + m.msg.encode("utf-8", "replace")
    return b"%d %s" % (len(body), body)


def _sd_end(rest: bytes) -> int:
    """The index just past the structured data at the start of `rest` (`-` or `[...]...`)."""
    if rest[:1] == b"-":
        return 1
    i, n = 0, len(rest)
    while i < n and rest[i : i + 1] == b"[":
        i += 1
        quoted = False
        while i < n:
            c = rest[i]
            if quoted:
                if c == 0x5C:  # backslash escapes the next byte
                    i += 1
                elif c == 0x22:
                    quoted = False
            elif c == 0x22:
                quoted = True
            elif c == 0x5D:
                break
            i += 1
        else:
            raise MessageError("unterminated structured data")
        i += 1
    if i == 0:
        raise MessageError("no structured data")
    return i


def parse_message(data: bytes) -> Message:
    """One RFC 5424 message (a frame's payload) as a Message."""
    parts = data.split(b" ", 6)
    if len(parts) < 7:
        if len(parts) == 6:  # no structured data and no message: tolerate "... MSGID -"
            parts.append(b"-")
        else:
            raise MessageError("too few header fields")
    pri_ver, ts, host, app, procid, msgid, rest = parts
    if not pri_ver.startswith(b"<") or not pri_ver.endswith(b">1"):
        raise MessageError(f"bad PRI/VERSION {pri_ver[:10]!r}")
    try:
        time = parse_time(ts.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(str(exc)) from None
    end = _sd_end(rest)
    seq, source = 0, SOURCE_APP
    if end > 1:
        sd = _FLYNN_SD.search(rest, 0, end)
        if sd:
            if m := _SEQ.search(sd.group(1)):
                seq = int(m.group(1))
            if m := _SOURCE.search(sd.group(1)):
                source = m.group(1).decode()
    text = rest[end + 1 :] if rest[end : end + 1] == b" " else rest[end:]
    if text.startswith(b"\xef\xbb\xbf"):  # RFC 5424's BOM before UTF-8 text
        text = text[3:]
    ptype, _, job = procid.decode("utf-8", "replace").partition(".")
    if not job:
        ptype, job = "", ptype
    return Message(
        app_id="" if app == b"-" else app.decode("utf-8", "replace"),
        host_id="" if host == b"-" else host.decode("utf-8", "replace"),
        job_id="" if job == "-" else job,
        process_type=ptype,
        stream=STREAM_BY_MSGID.get(msgid.decode("ascii", "replace"), STDOUT),
        time=time,
        seq=seq,
        msg=text.decode("utf-8", "replace"),
        source=source,
    )


class FrameParser:
    """Feed it bytes as they arrive; it returns the complete frames' payloads. It holds at most
    one incomplete frame (≤ max_message bytes plus its length prefix); anything that is not a
    frame, or a frame longer than `max_message`, raises FrameError (close the connection: the
    stream cannot be resynchronised). Newlines between frames are tolerated."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._digits = len(str(max_message))
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being read, -1 while reading a length

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except FrameError as exc:
            exc.frames = out
            self._buf.clear()
            raise
        return out

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        while pos < n:
            if self._need < 0:
                while pos < n and buf[pos] in (0x0A, 0x0D):
                    pos += 1
                if pos == n:
                    break
                sp = buf.find(b" ", pos, pos + self._digits + 1)
                if sp < 0:
                    if n - pos > self._digits or not bytes(buf[pos:n]).isdigit():
                        raise FrameError(f"bad frame length {bytes(buf[pos : pos + 12])!r}")
                    break
                digits = bytes(buf[pos:sp])
                if not digits.isdigit() or digits[:1] == b"0":
                    raise FrameError(f"bad frame length {bytes(buf[pos : pos + 12])!r}")
                length = int(digits)
                if length > self.max_message:
                    raise FrameError(f"frame of {length} bytes is over {self.max_message}")
                self._need = length
                pos = sp + 1
            if n - pos < self._need:
                break
            out.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = -1
        del buf[:pos]
