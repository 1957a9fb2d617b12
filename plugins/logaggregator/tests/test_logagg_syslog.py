"""The wire codec: RFC 6587 framing of RFC 5424 messages, both directions."""

from __future__ import annotations

import pytest
from flynn_logaggregator.syslog import (
    FrameError,
    FrameParser,
    MessageError,
    format_message,
    parse_message,
)
from flynn_logaggregator.types import Message, format_time, parse_time


def msg(seq: int = 1, **kw: object) -> Message:
    d: dict[str, object] = dict(app_id="app", host_id="host", job_id="job", process_type="web",
                                stream="stdout", time=1_450_087_200_123_456_789, seq=seq,
                                msg=f"hello {seq}")  # fmt: skip
    d.update(kw)
    return Message(**d)  # type: ignore[arg-type]


def test_round_trip_and_flynn_fields() -> None:
    m = msg(7, stream="stderr", msg='ünïcode [with] "quotes"')
    frame = format_message(m)
    length, _, payload = frame.partition(b" ")
    assert int(length) == len(payload)
    assert payload.startswith(
        b'<190>1 2015-12-14T10:00:00.123456789Z host app web.job ID2 [flynn seq="7"] '
    )
    assert parse_message(payload) == m


def test_a_source_other_than_the_app_travels_in_the_flynn_element() -> None:
    m = msg(0, source="controller", process_type="deploy")
    payload = format_message(m).partition(b" ")[2]
    assert b' deploy.job ID1 [flynn source="controller"] ' in payload
    assert parse_message(payload) == m and m.to_json()["source"] == "controller"
    both = format_message(msg(9, source="router")).partition(b" ")[2]
    assert b'[flynn seq="9" source="router"]' in both and parse_message(both).seq == 9
    # a host's lines say nothing of it: they are the app's own; a bad name is ignored
    assert parse_message(format_message(msg(3)).partition(b" ")[2]).source == "app"
    odd = b'<190>1 2015-12-14T10:00:00Z h a web.j ID1 [flynn seq="2" source="No Way"] t'
    assert parse_message(odd).source == "app" and parse_message(odd).seq == 2


@pytest.mark.parametrize("stream,msgid", [("stdout", "ID1"), ("stderr", "ID2"), ("init", "ID3")])
def test_streams(stream: str, msgid: str) -> None:
    payload = format_message(msg(stream=stream)).partition(b" ")[2]
    assert payload.split(b" ")[5] == msgid.encode()
    assert parse_message(payload).stream == stream


def test_procid_without_type_and_no_seq() -> None:
    m = parse_message(b"<190>1 2015-12-14T10:00:00Z h a job-9 ID1 - plain text")
    assert (m.job_id, m.process_type, m.seq, m.msg) == ("job-9", "", 0, "plain text")
    assert format_message(msg(seq=0, process_type="")).split(b" ")[7] == b"-"


def test_other_structured_data_and_offsets() -> None:
    m = parse_message(
        b'<190>1 2015-12-14T11:00:00.5+01:00 h a web.j ID1 [x@1 k="a\\]b"][flynn seq="3"] t'
    )
    assert (m.seq, m.msg, format_time(m.time)) == (3, "t", "2015-12-14T10:00:00.5Z")


def test_time_format_like_go() -> None:
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(1_500_000_000) == "1970-01-01T00:00:01.5Z"
    assert parse_time("2015-12-14T10:00:00.000000001Z") % 10**9 == 1
    with pytest.raises(ValueError):
        parse_time("yesterday")


@pytest.mark.parametrize(
    "payload",
    [b"garbage", b"<190>2 2015-12-14T10:00:00Z h a p ID1 - x", b"<190>1 notatime h a p ID1 - x",
     b'<190>1 2015-12-14T10:00:00Z h a p ID1 [unterminated x'],
)  # fmt: skip
def test_bad_messages(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message(payload)


def test_fragmented_frames_byte_by_byte() -> None:
    frames = [format_message(msg(i)) for i in range(1, 6)]
    data = b"".join(frames)
    p = FrameParser()
    got = [f for i in range(len(data)) for f in p.feed(data[i : i + 1])]
    assert got == [f.partition(b" ")[2] for f in frames]
    assert p.buffered == 0


def test_several_frames_per_packet_with_newlines() -> None:
    frames = [format_message(msg(i)) for i in range(1, 4)]
    p = FrameParser()
    got = p.feed(frames[0] + b"\n" + frames[1] + frames[2][:5])
    got += p.feed(frames[2][5:] + b"\n")
    assert [parse_message(f).seq for f in got] == [1, 2, 3]


def test_frames_before_garbage_are_kept() -> None:
    good = format_message(msg(1))
    with pytest.raises(FrameError) as e:
        FrameParser().feed(good + b"garbage")
    assert e.value.frames == [good.partition(b" ")[2]]


def test_oversized_frame_is_refused_before_it_is_read() -> None:
    p = FrameParser(max_message=1024)
    with pytest.raises(FrameError, match="over"):
        p.feed(b"1025 ")
    with pytest.raises(FrameError):
        FrameParser(max_message=1024).feed(b"99999")  # too many digits, no space yet


@pytest.mark.parametrize("data", [b"hello world", b"12x <190>", b"0 ", b" 5 hello", b"-1 x"])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameParser().feed(data)


def test_memory_held_is_bounded() -> None:
    p = FrameParser(max_message=1000)
    p.feed(b"1000 " + b"x" * 999)
    assert p.buffered <= 1000 + 5
    assert p.feed(b"x") == [b"x" * 1000]
    assert p.buffered == 0
