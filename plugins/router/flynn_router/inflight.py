"""Requests and connections in flight per backend, so that a backend that goes away can be
drained: the worker reports it drained once nothing it carries is still going there."""

from __future__ import annotations

from collections.abc import Callable


class InFlight:
    """`begin(addr)` when a request (HTTP) or connection (TCP, upgraded HTTP) starts using
    a backend, `end(addr)` when it is done with it; `on_idle(addr)` runs when a backend's
    count falls to zero."""

    def __init__(self, on_idle: Callable[[str], None] | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.on_idle = on_idle

    def begin(self, addr: str) -> None:
        self.counts[addr] = self.counts.get(addr, 0) + 1

    def end(self, addr: str) -> None:
        n = self.counts.get(addr, 0) - 1
        if n > 0:
            self.counts[addr] = n
            return
        self.counts.pop(addr, None)
        if self.on_idle is not None:
            self.on_idle(addr)

    def count(self, addr: str) -> int:
        return self.counts.get(addr, 0)
