"""Output as the Go CLI printed it: tabwriter columns, ages, Go's time format, limits."""

from __future__ import annotations

import datetime as dt

import pytest
from flynn_cli.limit import format_limit, parse_limit
from flynn_cli.output import TabWriter, go_quote, go_time_string, human_duration, human_time


def table(*rows: tuple[str, ...]) -> str:
    w = TabWriter()
    for r in rows:
        w.row(*r)
    return w.render()


def test_tabwriter_pads_every_cell_but_the_last_by_two():
    out = table(("ID", "NAME"), ("f1e85f5392454a329929e3f27f7a5644", "gitreceive"))
    assert out == (
        "ID                                NAME\nf1e85f5392454a329929e3f27f7a5644  gitreceive\n"
    )


def test_tabwriter_empty_cells_are_padded_and_trailing_ones_kept():
    out = table(
        ("ROUTE", "SERVICE", "ID", "STICKY", "PATH"),
        ("http:a.test", "a-web", "http/1", "false", "/"),
        ("tcp:3000", "a-web", "tcp/2", "", ""),
    )
    assert out.splitlines() == [
        "ROUTE        SERVICE  ID      STICKY  PATH",
        "http:a.test  a-web    http/1  false   /",
        "tcp:3000     a-web    tcp/2           ",
    ]


def test_tabwriter_column_blocks_are_consecutive_rows():
    # a row with fewer cells ends a column's block, as in Go's tabwriter
    out = table(("a", "b", "c"), ("aaaa", "b"), ("x", "yyyyyy", "z"))
    assert out.splitlines() == ["a     b  c", "aaaa  b", "x     yyyyyy  z"]


def test_human_durations():
    assert [human_duration(s) for s in (0.2, 1, 11, 60, 119, 300, 3000, 7200, 86400 * 3)] == [
        "Less than a second",
        "1 second",
        "11 seconds",
        "About a minute",
        "About a minute",
        "5 minutes",
        "About an hour",
        "2 hours",
        "3 days",
    ]
    now = dt.datetime(2015, 12, 14, 12, 0, 11, tzinfo=dt.UTC)
    assert human_time("2015-12-14T12:00:00.123456789Z", now) == "10 seconds ago"
    assert human_time(None) == "" and human_time("") == ""


def test_go_time_strings():
    assert go_time_string("2015-05-06T21:58:12.751741Z") == "2015-05-06 21:58:12.751741 +0000 UTC"
    assert go_time_string("2015-05-06T21:58:12Z") == "2015-05-06 21:58:12 +0000 UTC"
    assert go_time_string("2015-05-06T21:58:12.5+01:00") == "2015-05-06 21:58:12.5 +0100 +0100"


def test_go_quote():
    assert go_quote('a"b') == '"a\\"b"'


@pytest.mark.parametrize(
    ("typ", "text", "value"),
    [
        ("memory", "512MB", 512 * 1024**2),
        ("memory", "1GB", 1024**3),
        ("memory", "1g", 1024**3),
        ("memory", "1.5 GB", int(1.5 * 1024**3)),
        ("memory", "100", 100),
        ("max_fd", "12000", 12000),
        ("max_fd", "12k", 12000),
    ],
)
def test_limits_parse_like_docker_units(typ, text, value):
    assert parse_limit(typ, text) == value


def test_bad_limits_do_not_parse():
    for text in ("", "lots", "1 XB", "-1"):
        with pytest.raises(ValueError):
            parse_limit("memory", text)


def test_limits_format_like_the_go_cli():
    assert format_limit("memory", 1024**3) == "1GB"
    assert format_limit("memory", 512 * 1024**2) == "512MB"
    assert format_limit("memory", 1536 * 1024**2) == "1.5GB"
    assert format_limit("memory", 100) == "100B"
    assert format_limit("max_fd", 10000) == "10000"
