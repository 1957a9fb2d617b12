"""The discoverd client every component uses (Flynn's `discoverd/client`; see
docs/discoverd.md#the-client).

It speaks discoverd's HTTP API: services, instances, leaders and service metadata, a `watch`
over the service's event stream that reconnects by itself, and `register`, which keeps an
instance alive with heartbeats until it is closed. `DISCOVERD` (a comma list of URLs) says where
discoverd is; when one URL cannot be reached the next is tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from flynn_discoverd.types import (
    CURRENT,
    DOWN,
    EVENT_KINDS,
    LEADER,
    LEADER_OLDEST,
    SERVICE_META,
    UP,
    UPDATE,
    Event,
    Instance,
    ServiceMeta,
)
from flynn_host.errors import FlynnError, ValidationError

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:1111"
REQUEST_TIMEOUT = 10.0
# instance meta copied from the job's environment (Flynn's EnvInstanceMeta,
# docs/discoverd.md#the-client)
ENV_INSTANCE_META = (
    "FLYNN_APP_ID",
    "FLYNN_APP_NAME",
    "FLYNN_RELEASE_ID",
    "FLYNN_PROCESS_TYPE",
    "FLYNN_JOB_ID",
)


# ---- errors ----------------------------------------------------------------------------------


class DiscoverdError(FlynnError):
    """An error answer from discoverd, with Flynn's error code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int, detail: Any = None) -> None:
        super().__init__(code, message, detail)
        self.http_status = status

    @property
    def status(self) -> int:
        return self.http_status


class NotFoundError(DiscoverdError):
    """404: no such service, instance, leader or metadata."""


class ObjectExistsError(DiscoverdError):
    """409: the service exists already, or meta with `index: 0` exists already."""


class PreconditionFailedError(DiscoverdError):
    """412: the meta `index` does not match the current one (compare-and-swap lost)."""


class UnreachableError(Exception):
    """No discoverd URL answered."""


_ERROR_BY_STATUS: dict[int, type[DiscoverdError]] = {
    404: NotFoundError,
    409: ObjectExistsError,
    412: PreconditionFailedError,
}


def _error(status: int, body: bytes) -> DiscoverdError:
    """Map Flynn's error JSON (`{"code","message","detail","retry"}`) to a typed error."""
    try:
        raw = json.loads(body)
        code, message, detail = raw["code"], raw.get("message", ""), raw.get("detail")
    except (ValueError, TypeError, KeyError):
        code, message, detail = "unknown_error", body.decode(errors="replace").strip(), None
    return _ERROR_BY_STATUS.get(status, DiscoverdError)(code, message, status, detail)


def _retryable(exc: BaseException) -> bool:
    """Errors worth trying again (another URL, a later heartbeat): the network, or a server that
    is not ready. A 4xx answer would be the same next time."""
    if isinstance(exc, UnreachableError | aiohttp.ClientError | TimeoutError | OSError):
        return True
    return isinstance(exc, DiscoverdError) and (exc.http_status >= 500 or exc.retry)


# ---- heartbeats ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatTiming:
    """Flynn's heartbeat timing (docs/discoverd.md#heartbeats-and-leaders): every `interval`
    minus up to `jitter` seconds; while failing every `failing_min`–`failing_max`; the first
    registration retried for up to `register_timeout`. Tests pass a faster one."""

    interval: float = 5.0
    jitter: float = 2.0
    failing_min: float = 0.2
    failing_max: float = 0.4
    register_timeout: float = 60.0

    def next_delay(self, failing: bool) -> float:
        if failing:
            return random.uniform(self.failing_min, self.failing_max)
        return self.interval - random.uniform(0, self.jitter)


def expand_addr(addr: str) -> str:
    """`":port"` means this job's external IP (`EXTERNAL_IP`) on that port."""
    if not addr.startswith(":"):
        return addr
    ip = os.environ.get("EXTERNAL_IP", "")
    if not ip:
        raise ValidationError("addr", f"{addr!r} has no host and EXTERNAL_IP is not set")
    return f"[{ip}]{addr}" if ":" in ip else f"{ip}{addr}"


def env_instance_meta() -> dict[str, str]:
    return {k: os.environ[k] for k in ENV_INSTANCE_META if k in os.environ}


class Heartbeater:
    """A registered instance kept alive by a background task. `close()` stops the heartbeats
    and deregisters the instance."""

    def __init__(
        self, client: Client, service: str, instance: Instance, timing: HeartbeatTiming
    ) -> None:
        self.client = client
        self.service = service
        self.instance = instance
        self.timing = timing
        self.path = f"/services/{service}/instances/{instance.id}"
        self.failing = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one PUT at a time, so meta changes are not overtaken

    @property
    def addr(self) -> str:
        return self.instance.addr

    async def _put(self) -> None:
        async with self._lock:
            await self.client._request("PUT", self.path, self.instance.to_json())

    async def _register(self) -> None:
        """The first PUT, retried (while the error is retryable) for `register_timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timing.register_timeout
        while True:
            try:
                await self._put()
                break
            except Exception as e:
                if not _retryable(e) or loop.time() >= deadline:
                    raise
                log.warning("discoverd: registering %s in %s: %s", self.addr, self.service, e)
                await asyncio.sleep(self.timing.next_delay(failing=True))
        self._task = asyncio.create_task(self._run(), name=f"heartbeat {self.service} {self.addr}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.timing.next_delay(self.failing))
            try:
                await self._put()
            except Exception as e:  # keep trying, faster, until discoverd is back
                if not self.failing:
                    log.error(
                        "discoverd: heartbeat %s in %s failed: %s", self.addr, self.service, e
                    )
                self.failing = True
            else:
                self.failing = False

    async def set_meta(self, meta: dict[str, str]) -> None:
        """Replace the instance's meta and send it now."""
        self.instance.meta = dict(meta)
        await self._put()

    async def close(self) -> None:
        self.client._heartbeaters.discard(self)
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await self.client._request("DELETE", self.path)
        except Exception as e:  # it expires after the TTL anyway
            log.warning("discoverd: deregistering %s from %s: %s", self.addr, self.service, e)

    async def __aenter__(self) -> Heartbeater:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---- the client ------------------------------------------------------------------------------


class Client:
    """`Client(urls)`; without urls, the `DISCOVERD` environment variable (comma list), else
    `http://127.0.0.1:1111`. Use as `async with Client() as c:` or call `close()`."""

    def __init__(
        self,
        urls: list[str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        reconnect_delay: float = 0.5,
        watch_read_timeout: float = 75.0,
    ) -> None:
        if not urls:
            urls = [u for u in os.environ.get("DISCOVERD", "").split(",") if u.strip()]
        self.urls = [_normalise_url(u) for u in urls or [DEFAULT_URL]]
        self.timeout = timeout
        self.reconnect_delay = reconnect_delay
        # discoverd sends a keep-alive every 30 s, so a silent stream for longer is dead
        self.watch_read_timeout = watch_read_timeout
        self._current = 0  # index of the URL that last answered
        self._session: aiohttp.ClientSession | None = None
        self._heartbeaters: set[Heartbeater] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Deregister this client's instances, then close its connections."""
        for hb in list(self._heartbeaters):
            await hb.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no cap on connections: every watch holds one for as long as it lasts, and the
            # default cap (100) would leave the 101st watch, and every request, waiting
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def _url_order(self) -> list[int]:
        n = len(self.urls)
        return [(self._current + i) % n for i in range(n)]

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        """Send to the current URL, moving on to the next ones when unreachable. Returns the
        decoded JSON body (None when empty); raises a `DiscoverdError` for an error answer."""
        last: BaseException | None = None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        for i in self._url_order():
            try:
                async with self._http().request(
                    method, self.urls[i] + path, json=body, timeout=timeout
                ) as resp:
                    data = await resp.read()
                    if resp.status == 503:  # not ready (no raft leader, proxying): try another
                        last = _error(resp.status, data)
                        continue
                    self._current = i
                    if resp.status >= 400:
                        raise _error(resp.status, data)
                    return json.loads(data) if data.strip() else None
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                if not isinstance(last, DiscoverdError):  # a server's answer says more
                    last = e
        if isinstance(last, DiscoverdError):
            raise last
        raise UnreachableError(f"discoverd: no server answered ({', '.join(self.urls)}): {last}")

    # ---- services ----

    async def add_service(self, name: str, leader_type: str = LEADER_OLDEST) -> None:
        await self._request("PUT", f"/services/{name}", {"leader_type": leader_type})

    async def remove_service(self, name: str) -> None:
        await self._request("DELETE", f"/services/{name}")

    async def instances(self, service: str) -> list[Instance]:
        raw = await self._request("GET", f"/services/{service}/instances")
        return [Instance.from_json(i) for i in raw or []]

    async def leader(self, service: str) -> Instance | None:
        try:
            raw = await self._request("GET", f"/services/{service}/leader")
        except NotFoundError:
            return None
        return Instance.from_json(raw) if raw else None

    async def set_leader(self, service: str, instance: Instance | str) -> None:
        """Make an instance (or instance id) leader of a `leader_type: manual` service."""
        iid = instance if isinstance(instance, str) else instance.id
        await self._request("PUT", f"/services/{service}/leader", {"id": iid})

    async def get_meta(self, service: str) -> ServiceMeta | None:
        try:
            raw = await self._request("GET", f"/services/{service}/meta")
        except NotFoundError:
            return None
        return ServiceMeta.from_json(raw)

    async def set_meta(self, service: str, meta: ServiceMeta) -> ServiceMeta:
        """Compare-and-swap: `meta.index` 0 creates (ObjectExistsError if present), otherwise it
        must be the current index (PreconditionFailedError if not). Returns the stored meta."""
        body = meta.to_json()
        if meta.leader_id:
            body["leader_id"] = meta.leader_id
        return ServiceMeta.from_json(await self._request("PUT", f"/services/{service}/meta", body))

    # ---- the cluster ----

    async def raft_peers(self) -> list[str]:
        """The discoverd nodes' addresses (`GET /raft/peers`): `ip:port` or `http://ip:port`.
        Each node's etcd answers clients on its port + 1268 (docs/discoverd.md)."""
        raw = await self._request("GET", "/raft/peers")
        return [str(p) for p in raw or []]

    # ---- registration ----

    async def register(
        self,
        service: str,
        addr: str,
        proto: str = "tcp",
        meta: dict[str, str] | None = None,
        *,
        timing: HeartbeatTiming | None = None,
    ) -> Heartbeater:
        """Register an instance and keep it alive (see `Heartbeater`). `":port"` expands to
        `EXTERNAL_IP:port`; the FLYNN_* job variables are added to the meta."""
        inst = Instance(addr=expand_addr(addr), proto=proto, meta={**(meta or {})})
        inst.meta.update(env_instance_meta())
        Instance.from_json(inst.to_json())  # validate here, with a clear message
        hb = Heartbeater(self, service, inst, timing or HeartbeatTiming())
        await hb._register()
        self._heartbeaters.add(hb)
        return hb

    async def add_service_and_register(
        self, service: str, addr: str, proto: str = "tcp", meta: dict[str, str] | None = None
    ) -> Heartbeater:
        with contextlib.suppress(ObjectExistsError):
            await self.add_service(service)
        return await self.register(service, addr, proto, meta)

    # ---- events ----

    async def watch(self, service: str, kinds: Iterable[str] = EVENT_KINDS) -> AsyncIterator[Event]:
        """Events of `service` (current state first: `up` for each instance, `leader`,
        `service_meta`, then `current`), then changes as they happen. When the stream breaks it
        reconnects (trying each URL), and turns the fresh state into the events that were missed
        (`up`/`update`/`down`, `leader`, `service_meta`), so a watcher never sees duplicates.
        A service that does not exist raises NotFoundError."""
        wanted = set(kinds)
        state = _WatchState()
        delay = self.reconnect_delay
        while True:
            try:
                async for event in self._stream(service, state):
                    delay = self.reconnect_delay
                    if event.kind in wanted:
                        yield event
            except (aiohttp.ClientError, TimeoutError, _StreamError, UnreachableError) as e:
                log.info("discoverd: watch %s: %s; reconnecting", service, e)
            except DiscoverdError as e:
                if not _retryable(e):
                    raise
            await asyncio.sleep(delay * random.uniform(1, 1.5))
            delay = min(delay * 2, 10.0)

    async def _stream(self, service: str, state: _WatchState) -> AsyncIterator[Event]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.watch_read_timeout)
        headers = {"Accept": "text/event-stream"}
        resp = None
        last: BaseException | None = None
        for i in self._url_order():
            try:
                resp = await self._http().get(
                    f"{self.urls[i]}/services/{service}", headers=headers, timeout=timeout
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                last = e
                continue
            if resp.status != 200:
                err = _error(resp.status, await resp.read())
                resp.release()
                if not _retryable(err):
                    raise err
                last, resp = err, None
                continue
            self._current = i
            break
        if resp is None:
            raise UnreachableError(f"discoverd: cannot watch {service}: {last}")
        state.begin()
        try:
            async for event in _sse_events(resp):
                for out in state.apply(event):
                    yield out
        finally:
            resp.close()
        raise _StreamError("stream ended")


class _StreamError(Exception):
    pass


class _WatchState:
    """What a watcher has been told, to turn a replayed state after a reconnect into the
    changes it missed."""

    def __init__(self) -> None:
        self.connected = False
        self.current_sent = False
        self.instances: dict[str, Instance] = {}
        self.leader: str | None = None
        self.meta_index: int | None = None
        self._fresh: dict[str, Instance] = {}
        self._pending: list[Event] = []
        self._caught_up = True

    def begin(self) -> None:
        self._caught_up = not self.connected
        self.connected = True
        self._fresh, self._pending = {}, []

    def apply(self, ev: Event) -> list[Event]:
        if not self._caught_up:
            return self._replay(ev)
        if ev.kind in (UP, UPDATE) and ev.instance:
            self.instances[ev.instance.id] = ev.instance
        elif ev.kind == DOWN and ev.instance:
            self.instances.pop(ev.instance.id, None)
        elif ev.kind == LEADER:
            self.leader = ev.instance.id if ev.instance else None
        elif ev.kind == SERVICE_META:
            self.meta_index = ev.service_meta.index if ev.service_meta else None
        elif ev.kind == CURRENT:
            if self.current_sent:
                return []
            self.current_sent = True
        return [ev]

    def _replay(self, ev: Event) -> list[Event]:
        """While re-reading the state after a reconnect: collect it; at `current`, diff."""
        if ev.kind == UP and ev.instance:
            self._fresh[ev.instance.id] = ev.instance
            return []
        if ev.kind != CURRENT:
            self._pending.append(ev)  # leader / service_meta of the replayed state
            return []
        self._caught_up = True
        out: list[Event] = []
        for iid, inst in self._fresh.items():
            old = self.instances.get(iid)
            if old is None:
                out.append(Event(ev.service, UP, inst))
            elif old.to_json() != inst.to_json():
                out.append(Event(ev.service, UPDATE, inst))
        out += [
            Event(ev.service, DOWN, inst)
            for iid, inst in self.instances.items()
            if iid not in self._fresh
        ]
        self.instances = dict(self._fresh)
        for p in self._pending:
            if p.kind == LEADER and (p.instance.id if p.instance else None) != self.leader:
                self.leader = p.instance.id if p.instance else None
                out.append(p)
            elif p.kind == SERVICE_META and p.service_meta:
                if p.service_meta.index != self.meta_index:
                    self.meta_index = p.service_meta.index
                    out.append(p)
            elif p.kind not in (LEADER, SERVICE_META):
                out.append(p)
        if not self.current_sent:  # the first connection broke before its `current`
            self.current_sent = True
            out.append(ev)
        return out


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse Flynn's SSE (docs/discoverd.md#event-streams): `data:` lines joined by newlines
    up to a blank line, `:` comments as keep-alives, and `event: error` ending the stream."""
    data: list[str] = []
    event_type = ""
    async for line in _lines(resp):
        if line == "":
            if event_type == "error":
                raise _StreamError("server error: " + "\n".join(data))
            if data:
                try:
                    event = Event.from_json(json.loads("\n".join(data)))
                except (ValueError, KeyError, TypeError, FlynnError) as e:
                    log.warning("discoverd: skipping a malformed event: %s", e)
                else:
                    yield event
            data, event_type = [], ""
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines, however long (a large service meta is one long `data:` line, which
    aiohttp's readline would refuse)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            yield raw.decode().rstrip("\r")


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


@contextlib.asynccontextmanager
async def registered_while_inside(
    service: str,
    addr: str,
    retry: float = 2.0,
    leave_timeout: float = 2.0,
    meta: dict[str, str] | None = None,
) -> AsyncIterator[None]:
    """While inside: `addr` is an instance of `service` (found through $DISCOVERD) with `meta`,
    registered in the background and retried every `retry` seconds until discoverd answers, so
    the caller serves meanwhile. Leaving deregisters it (waiting at most `leave_timeout`:
    discoverd may be gone already)."""
    client = Client()

    async def register() -> None:
        while True:
            try:
                await client.add_service_and_register(service, addr, meta=meta)
            except Exception as exc:  # noqa: BLE001 - discoverd not up yet: keep trying
                log.warning("registering %s in discoverd failed, retrying: %s", service, exc)
                await asyncio.sleep(retry)
            else:
                log.info("registered in discoverd service %s as %s", service, addr)
                return

    task = asyncio.create_task(register())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        # closing the client deregisters its instance
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), leave_timeout)


@contextlib.asynccontextmanager
async def registered_in_cluster(
    service: str, port: int, retry: float = 2.0, meta: dict[str, str] | None = None
) -> AsyncIterator[None]:
    """`registered_while_inside(service, "$EXTERNAL_IP:<port>", meta=meta)` for a component job
    in a cluster (`DISCOVERD` set and not `none`, `EXTERNAL_IP` set); outside one, nothing."""
    env = os.environ
    if env.get("DISCOVERD") in (None, "", "none") or not env.get("EXTERNAL_IP"):
        yield
        return
    addr = f"{env['EXTERNAL_IP']}:{port}"
    async with registered_while_inside(service, addr, retry, meta=meta):
        yield
