"""What logaggregator's tests share: the process (`flynn_host.dev.logaggregator`), numbered
messages of a host and a small shipper (what a host's log mux does)."""

from __future__ import annotations

import socket
from typing import Any

from flynn_logaggregator.client import Message, format_message

from flynn_host.dev.logaggregator import LogAggregator, logaggregator_process

__all__ = ["LogAggregator", "logaggregator_process", "message", "send"]


def message(seq: int, app: str = "app1", host: str = "host1", **kw: Any) -> Message:
    """Message number `seq` of `host`: its time grows with seq, so (time, seq) orders them."""
    fields: dict[str, Any] = {
        "app_id": app, "host_id": host, "job_id": "job1", "process_type": "web",
        "stream": "stdout", "time": 1_450_000_000_000_000_000 + seq * 1000, "seq": seq,
        "msg": f"line {seq}",
    }  # fmt: skip
    fields.update(kw)
    return Message(**fields)


def send(sock: socket.socket, msgs: list[Message], chunk: int = 1000) -> None:
    for i in range(0, len(msgs), chunk):
        sock.sendall(b"".join(format_message(m) for m in msgs[i : i + chunk]))
