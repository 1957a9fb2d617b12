"""The scheduler process's leadership (`scheduler_service.lead`) against a fake discoverd: it
schedules while it leads, stops scheduling once its heartbeats have failed for a while (its
registration may lapse and another instance lead), and schedules again when they go through
and it still leads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flynn_controller import scheduler_service


@dataclass
class Instance:
    addr: str
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Event:
    kind: str
    instance: Instance | None


class FakeHeartbeater:
    failing = False


class FakeDiscoverd:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.heartbeater = FakeHeartbeater()

    async def add_service_and_register(self, service: str, addr: str) -> FakeHeartbeater:
        return self.heartbeater

    async def watch(self, service: str, kinds: Any = None) -> AsyncIterator[Event]:
        yield Event("leader", Instance(self.addr))
        await asyncio.Event().wait()  # the stream stays open (its reconnects emit nothing)

    async def leader(self, service: str) -> Instance:
        return Instance(self.addr)


class IdleScheduler:
    running = 0

    def __init__(self, controller: Any, discoverd: Any) -> None:
        pass

    async def run(self) -> None:
        IdleScheduler.running += 1
        try:
            await asyncio.Event().wait()
        finally:
            IdleScheduler.running -= 1


def test_a_leader_cut_off_from_discoverd_stops_scheduling_and_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_service, "Scheduler", IdleScheduler)
    monkeypatch.setattr(scheduler_service, "STEP_DOWN_AFTER", 0.3)
    monkeypatch.setattr(scheduler_service, "WATCHDOG_EVERY", 0.05)

    async def main() -> None:
        discoverd = FakeDiscoverd("10.0.0.1:3000")
        state: dict[str, Any] = {"leader": False, "scheduler": None}
        lead = asyncio.create_task(scheduler_service.lead(
            discoverd, "10.0.0.1:3000", None, state, asyncio.Event()))  # type: ignore[arg-type]  # fmt: skip
        try:
            await asyncio.sleep(0.1)
            assert state["leader"] and IdleScheduler.running == 1
            discoverd.heartbeater.failing = True
            await asyncio.sleep(0.2)
            assert state["leader"], "a short failure changes nothing"
            await asyncio.sleep(0.3)
            assert not state["leader"] and IdleScheduler.running == 0
            discoverd.heartbeater.failing = False
            await asyncio.sleep(0.2)
            assert state["leader"] and IdleScheduler.running == 1
        finally:
            lead.cancel()
            await asyncio.gather(lead, return_exceptions=True)
        assert IdleScheduler.running == 0

    asyncio.run(main())
