"""The step loop of a bootstrap and the state its actions share.

`wait_for_hosts` is Flynn's implicit first step (`online-hosts`, action `check`): it waits
until enough hosts answer. `run_steps` then runs each manifest step's action in order, emitting
a `StepInfo` when a step starts, reports progress, finishes or fails, and stops at the first
failure. A step's action returns its step data, which later steps can read in `state.step_data`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flynn_host.bootstrap.template import TemplateError, render_step
from flynn_host.client import HostClient


class StepError(Exception):
    """A step failed; the message says why (and names the host when one is to blame)."""


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class StepInfo:
    """Flynn's `bootstrap.StepInfo`: one event of one step (`start`, `info`, `done`, `error`)."""

    id: str
    action: str
    state: str
    data: Any = None
    error: str = ""
    ts: str = field(default_factory=now)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "action": self.action}
        if self.data is not None:
            out["data"] = self.data
        out["state"] = self.state
        if self.error:
            out["error"] = self.error
        out["ts"] = self.ts
        return out


@dataclass
class ClusterHost:
    """One host of the cluster: its address (`ip:port`), its API client and (once it answered)
    its status and id."""

    addr: str
    client: HostClient
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.addr.rsplit(":", 1)[0]

    @property
    def id(self) -> str:
        return str(self.status.get("id") or self.addr)

    def __str__(self) -> str:
        return f"{self.id} ({self.addr})" if self.status else self.addr


Emit = Callable[[StepInfo], None]


@dataclass
class State:
    """What every action sees: the hosts (in a stable order), the step data so far, the
    singleton flag, the per-job timeout and a way to report progress."""

    hosts: list[ClusterHost]
    singleton: bool = False
    job_timeout: float = 30.0
    step_data: dict[str, Any] = field(default_factory=dict)
    emit: Emit = lambda info: None  # noqa: E731
    current: StepInfo | None = None
    # values no output may show (generated passwords): `redact` replaces them
    secrets: set[str] = field(default_factory=set)

    @property
    def sorted_host_ips(self) -> list[str]:
        return sorted(h.ip for h in self.hosts)

    def template_data(self, with_steps: bool = False) -> dict[str, Any]:
        """The fields a manifest template can use (`StepData` only once steps run)."""
        data: dict[str, Any] = {"Singleton": self.singleton, "SortedHostIPs": self.sorted_host_ips}
        if with_steps:
            data["StepData"] = self.step_data
        return data

    def redact(self, value: Any) -> Any:
        """`value` with every secret (in any string, at any depth) replaced by `(secret)`."""
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, "(secret)")
            return value
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        return value

    def report(self, info: StepInfo, reveal: bool = False) -> None:
        """Emit `info` with the secrets taken out of its data and error (unless `reveal`: a
        step whose data is meant to show one, `log`)."""
        if self.secrets and not reveal:
            info.data, info.error = self.redact(info.data), self.redact(info.error)
        self.emit(info)

    def progress(self, message: str) -> None:
        """Report progress of the running step (an `info` event; one text line)."""
        step = self.current
        self.report(
            StepInfo(step.id if step else "", step.action if step else "", "info", data=message)
        )


class Action:
    """Base class of a bootstrap action. A plugin's action subclasses it (or just provides the
    same two methods): `__init__(step)` gets the step's JSON object (already template-rendered)
    and should reject bad fields by raising `StepError`; `run(state)` does the work, raises
    `StepError` on failure and returns the step data (any JSON value, or None).
    `shows_secrets` (only `log`'s) lets the step's data reach the output unredacted."""

    shows_secrets = False

    def __init__(self, step: dict[str, Any]) -> None:
        self.step = step
        self.id = str(step.get("id", ""))

    def run(self, state: State) -> Any:
        raise NotImplementedError


def wait_for_hosts(
    addrs: list[str], min_hosts: int, timeout: float, emit: Emit
) -> list[ClusterHost]:
    """Flynn's `online-hosts` check: wait until `min_hosts` of `addrs` answer `GET /host/status`
    and return those that answered. Raises StepError naming the ones that did not."""
    info = StepInfo("online-hosts", "check", "start")
    emit(info)
    hosts = [ClusterHost(a, HostClient(a, timeout=5)) for a in addrs]
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 5
    errors: dict[str, str] = {}
    while True:
        for h in hosts:
            if h.status:
                continue
            try:
                h.status = h.client.status()
                errors.pop(h.addr, None)
            except Exception as exc:  # noqa: BLE001 - any failure means "not online yet"
                errors[h.addr] = str(exc)
        online = [h for h in hosts if h.status]
        if len(online) >= min_hosts:
            emit(StepInfo("online-hosts", "check", "done"))
            return online
        if time.monotonic() > deadline:
            missing = "; ".join(f"{a}: {e}" for a, e in errors.items())
            raise StepError(
                f"timed out waiting for {min_hosts} hosts to come online "
                f"(currently {len(online)} online; not answering: {missing})"
            )
        if time.monotonic() > next_report:
            emit(
                StepInfo(
                    "online-hosts",
                    "check",
                    "info",
                    data=f"{len(online)} of {min_hosts} hosts online",
                )
            )
            next_report = time.monotonic() + 5
        time.sleep(0.2)


def run_steps(
    steps: list[dict[str, Any]],
    actions: dict[str, type],
    state: State,
    only: list[str] | None = None,
) -> bool:
    """Run the steps (those in `only`, when given) in order; False after the first failure.

    Every step's action is built before any step runs, so an unknown action or a malformed
    step stops the bootstrap before it has changed anything. A step that uses earlier steps'
    data (`{{ (index .StepData "ID").Data }}`) is rendered again, and its action built again,
    just before it runs. Output never shows a secret a step made (`State.secrets`).
    """
    built = []
    for step in steps:
        if only is not None and step["id"] not in only:
            continue
        try:
            cls = actions.get(step["action"])
            if cls is None:
                known = ", ".join(sorted(actions))
                raise StepError(f"unknown action {step['action']!r} (available: {known})")
            built.append((step, cls, cls(step)))
        except StepError as exc:
            state.report(StepInfo(step["id"], step["action"], "error", error=str(exc)))
            return False
    for step, cls, action in built:
        state.current = StepInfo(step["id"], step["action"], "start")
        state.report(state.current)
        try:
            if "{{" in json.dumps(step):
                action = cls(render_step(step, state.template_data(with_steps=True)))
            data = action.run(state)
        except (StepError, TemplateError) as exc:
            state.report(StepInfo(step["id"], step["action"], "error", error=str(exc)))
            return False
        if data is not None:
            state.step_data[step["id"]] = data
        reveal = bool(getattr(action, "shows_secrets", False))
        state.report(StepInfo(step["id"], step["action"], "done", data=data), reveal=reveal)
    state.current = None
    return True
