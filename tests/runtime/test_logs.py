"""Tests for flynn_host.runtime.logs: line splitting, partial lines, rotation and reading back."""

from __future__ import annotations

import json
import os
import re

from flynn_host.runtime.logs import (
    MAX_LINE,
    LogWriter,
    encode_entry,
    format_entry,
    read_entries,
    remove_logs,
)


def messages(path: str) -> list[tuple[str, str, bool]]:
    return [(e["s"], e["m"], bool(e.get("p"))) for e in read_entries(path)]


def test_lines_are_split_and_partials_wait_for_their_newline(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"one\ntw")
    log.write("stderr", b"err")
    assert messages(path) == [("stdout", "one", False)]
    log.write("stdout", b"o\nthree\n")
    log.write("stderr", b"or\n")
    assert messages(path) == [
        ("stdout", "one", False),
        ("stdout", "two", False),
        ("stdout", "three", False),
        ("stderr", "error", False),
    ]
    entries = read_entries(path)
    assert [e["n"] for e in entries] == [1, 2, 3, 4]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["t"]) for e in entries)
    assert "p" not in entries[0]
    log.close()


def test_flush_partial_and_close_log_pending_text_as_partial(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"abc")
    log.flush_partial()
    log.write("stdout", b"def\n")
    log.write("stderr", b"tail")
    log.close()
    assert messages(path) == [
        ("stdout", "abc", True),
        ("stdout", "def", False),
        ("stderr", "tail", True),
    ]
    # replaying the entries gives back exactly the bytes that were written
    assert b"".join(format_entry(e) for e in read_entries(path, streams={"stdout"})) == b"abcdef\n"


def test_long_lines_are_cut_without_splitting_characters(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 30)
    text = "é" * MAX_LINE  # two bytes each: MAX_LINE is reached in the middle of the text
    log.write("stdout", text.encode())
    first = read_entries(path)
    assert len(first) == 1 and first[0]["p"] is True
    assert len(first[0]["m"].encode()) == MAX_LINE and "\ufffd" not in first[0]["m"]
    log.write("stdout", b"\n" + b"x" * (2 * MAX_LINE + 10) + b"\n")
    log.close()
    entries = read_entries(path)
    assert (
        b"".join(map(format_entry, entries))
        == (text + "\n" + "x" * (2 * MAX_LINE + 10) + "\n").encode()
    )
    assert all(len(e["m"].encode()) <= MAX_LINE for e in entries)


def test_invalid_utf8_is_replaced(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"\xff ok\n")
    log.close()
    assert messages(path) == [("stdout", "\ufffd ok", False)]


def test_rotation_keeps_two_files_and_continues_the_sequence(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1000)
    for i in range(200):
        log.write("stdout", f"line {i}\n".encode())
    log.close()
    assert sorted(os.listdir(tmp_path)) == ["log", "log.1"]
    for name in ("log", "log.1"):
        assert os.path.getsize(tmp_path / name) <= 1000 + 100
    entries = read_entries(path)
    seqs = [e["n"] for e in entries]
    assert seqs == list(range(seqs[0], 201)) and seqs[0] > 1
    assert entries[-1]["m"] == "line 199"


def test_reopening_continues_numbering(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"a\nb\n")
    log.close()
    log = LogWriter(path, 1 << 20)
    log.write("stderr", b"c\n")
    log.close()
    assert [e["n"] for e in read_entries(path)] == [1, 2, 3]


def test_reopening_right_after_rotation_continues_from_the_old_file(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 10)  # every entry overflows: the new file is always empty
    log.write("stdout", b"a\nb\n")
    log.close()
    assert os.path.getsize(path) == 0
    log = LogWriter(path, 10)
    log.write("stdout", b"c\n")
    log.close()
    assert [e["n"] for e in read_entries(path)][-1] == 3


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"whole\n")
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"n":2,"t":"2026-')  # a writer died mid-entry
    assert messages(path) == [("stdout", "whole", False)]
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b"next\n")
    log.close()
    assert [(e["n"], e["m"]) for e in read_entries(path)] == [(1, "whole"), (2, "next")]


def test_read_entries_filters(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 200)
    for i in range(10):
        log.write("stdout" if i % 2 else "stderr", f"m{i}\n".encode())
    log.close()
    assert [e["m"] for e in read_entries(path, since=7)] == ["m7", "m8", "m9"]
    assert [e["m"] for e in read_entries(path, lines=2)] == ["m8", "m9"]
    assert [e["m"] for e in read_entries(path, lines=2, streams={"stdout"})] == ["m7", "m9"]
    assert read_entries(path, lines=0) == []
    assert read_entries(str(tmp_path / "missing")) == []


def test_listeners_see_each_entry_after_it_is_in_the_file(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    seen = []

    def listener(entry):
        on_disk = [e["n"] for e in read_entries(path)]
        seen.append((entry["m"], entry["n"] in on_disk))

    log.listeners.append(listener)
    log.write("stdout", b"x\ny")
    log.close()
    assert seen == [("x", True), ("y", True)]


def test_entries_are_plain_json_lines(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 1 << 20)
    log.write("stdout", b'say "hi"\n')
    log.close()
    with open(path) as f:
        (line,) = f.read().splitlines()
    entry = json.loads(line)
    assert set(entry) == {"n", "t", "s", "m"} and entry["m"] == 'say "hi"'


def test_encode_entry_matches_json_dumps():
    for entry in (
        {"n": 7, "t": "2026-11-27T06:10:00.123456Z", "s": "stdout", "m": 'q"\\\x00é\u2028😀'},
        {"n": 8, "t": "2026-11-27T06:10:00.123456Z", "s": "stderr", "m": "", "p": True},
    ):
        expected = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        assert encode_entry(entry) == expected.encode()


def test_format_entry():
    assert format_entry({"n": 1, "s": "stdout", "m": "hé"}) == "hé\n".encode()
    assert format_entry({"n": 1, "s": "stdout", "m": "x", "p": True}) == b"x"


def test_remove_logs(tmp_path):
    path = str(tmp_path / "log")
    log = LogWriter(path, 10)
    log.write("stdout", b"a\nb\n")
    log.close()
    remove_logs(path)
    remove_logs(path)  # absent files are fine
    assert os.listdir(tmp_path) == []
