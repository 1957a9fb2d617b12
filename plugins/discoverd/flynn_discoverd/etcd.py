"""A small async client of etcd's v3 JSON gateway, and an `etcd` member run as a subprocess.

discoverd keeps all of its state in etcd (DESIGN.md): this module is the only place that speaks
etcd's wire format (base64 keys and values, int64 fields as strings, gRPC error bodies). The
client talks to a list of endpoints over one aiohttp session and moves on to the next endpoint
when one is down or has lost its leader, so a discoverd node keeps answering while its own etcd
member is being replaced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

# gRPC codes that mean "this member cannot answer now, another one may"
RETRY_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
RETRY_MESSAGES = ("no leader", "leader changed", "timed out", "not capable", "stopped")


class EtcdError(Exception):
    """etcd refused a request (a gRPC error carried by the gateway)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint of the list could answer."""


class EtcdCompacted(EtcdError):
    """A watch asked for revisions etcd has already compacted away."""


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str | bytes) -> bytes:
    """The range end that selects every key starting with `prefix`."""
    raw = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


@dataclass
class KV:
    key: str
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> KV:
        return cls(
            key=unb64(raw.get("key")).decode(),
            value=unb64(raw.get("value")),
            create_revision=int(raw.get("create_revision", 0)),
            mod_revision=int(raw.get("mod_revision", 0)),
            version=int(raw.get("version", 0)),
            lease=int(raw.get("lease", 0)),
        )


@dataclass
class WatchEvent:
    type: str  # "PUT" or "DELETE"
    kv: KV
    prev_kv: KV | None = None


# --- txn building blocks ----------------------------------------------------------------------


def compare(key: str, target: str, value: int | str, result: str = "EQUAL") -> dict[str, Any]:
    """`target` is CREATE, MOD, VERSION or VALUE; `result` EQUAL, GREATER, LESS, NOT_EQUAL."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}
    cmp: dict[str, Any] = {"key": b64(key), "target": target, "result": result}
    if target == "VALUE":
        cmp["value"] = b64(value if isinstance(value, str) else str(value))
    else:
        cmp[field[target]] = str(value)
    return cmp


def op_put(key: str, value: str | bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_range(key: str, prefix: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return {"request_range": body}


def op_delete(key: str, prefix: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return {"request_delete_range": body}


def range_kvs(response: dict[str, Any]) -> list[KV]:
    """The KVs of one `response_range` in a txn's responses."""
    return [KV.from_json(kv) for kv in response.get("response_range", {}).get("kvs", [])]


# --- client -----------------------------------------------------------------------------------


class EtcdClient:
    """etcd v3 over its JSON gateway, trying each endpoint in turn. `revision` is the highest
    store revision seen in any response header (discoverd's `Discoverd-Index`).

    With `retry_within`, a request no endpoint could answer is tried again every 0.1 s for
    that long: an election (the leader's member stopped, as when discoverd is redeployed host
    by host) leaves every member without a leader for a few hundred milliseconds."""

    def __init__(
        self, endpoints: list[str], timeout: float = 2.0, retry_within: float = 0.0
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.retry_within = retry_within
        self.revision = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no cap on connections: each watch (one per watched discoverd service) holds one
            # while it lasts, and with the default cap of 100 the next calls would wait forever
            self._session = aiohttp.ClientSession(
                read_bufsize=1 << 22, connector=aiohttp.TCPConnector(limit=0)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _seen(self, body: dict[str, Any]) -> None:
        rev = int(body.get("header", {}).get("revision", 0))
        self.revision = max(self.revision, rev)

    def _promote(self, endpoint: str) -> None:
        """Try the endpoint that answered first next time."""
        if self.endpoints[0] != endpoint:
            self.endpoints.remove(endpoint)
            self.endpoints.insert(0, endpoint)

    async def call_one(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.post(endpoint + path, json=body, timeout=timeout) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise EtcdUnavailable(f"{endpoint}: {exc or type(exc).__name__}", 14) from exc
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise EtcdError(f"{endpoint}{path}: bad response {text[:200]!r}") from exc
        if resp.status != 200 or "error" in data:
            msg = data.get("message") or data.get("error") or text
            code = int(data.get("code", 0))
            if code in RETRY_CODES or any(m in msg for m in RETRY_MESSAGES):
                raise EtcdUnavailable(f"{endpoint}: {msg}", code)
            raise EtcdError(msg, code)
        if "result" in data and isinstance(data["result"], dict):
            data = data["result"]  # stream endpoints (keepalive) answer with one result
        self._seen(data)
        return data

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_within
        while True:
            errors = []
            for endpoint in list(self.endpoints):
                try:
                    data = await self.call_one(endpoint, path, body)
                except EtcdUnavailable as exc:
                    errors.append(str(exc))
                    continue
                self._promote(endpoint)
                return data
            if loop.time() >= deadline:
                raise EtcdUnavailable("no etcd endpoint answered: " + "; ".join(errors))
            await asyncio.sleep(0.1)

    # kv

    async def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        data = await self.call("/v3/kv/put", op_put(key, value, lease)["request_put"])
        return int(data["header"]["revision"])

    async def range(
        self, key: str, prefix: bool = False, revision: int = 0
    ) -> tuple[list[KV], int]:
        body = op_range(key, prefix)["request_range"]
        if revision:
            body["revision"] = str(revision)
        data = await self.call("/v3/kv/range", body)
        return [KV.from_json(kv) for kv in data.get("kvs", [])], int(data["header"]["revision"])

    async def get(self, key: str) -> KV | None:
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def delete(self, key: str, prefix: bool = False) -> tuple[int, int]:
        """Returns (number deleted, revision)."""
        data = await self.call("/v3/kv/deleterange", op_delete(key, prefix)["request_delete_range"])
        return int(data.get("deleted", 0)), int(data["header"]["revision"])

    async def txn(
        self,
        compares: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, list[dict[str, Any]], int]:
        """Returns (succeeded, responses of the branch taken, revision)."""
        body = {"compare": compares, "success": success, "failure": failure or []}
        data = await self.call("/v3/kv/txn", body)
        return (
            bool(data.get("succeeded", False)),
            data.get("responses", []),
            int(data["header"]["revision"]),
        )

    # leases

    async def lease_grant(self, ttl: float) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": str(max(1, round(ttl)))})
        return int(data["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Refreshes a lease; returns its TTL, 0 if it has expired."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        with contextlib.suppress(EtcdError):  # an expired lease is already revoked
            await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def lease_ttl(self, lease: int) -> tuple[int, int]:
        """(remaining TTL, granted TTL); remaining is -1 once expired."""
        data = await self.call("/v3/lease/timetolive", {"ID": str(lease)})
        return int(data.get("TTL", -1)), int(data.get("grantedTTL", 0))

    # watch

    async def watch(
        self, key: str, prefix: bool = False, start_revision: int = 0
    ) -> AsyncIterator[list[WatchEvent]]:
        """Yields batches of events in revision order, from `start_revision` on, forever.
        When an endpoint fails the watch resumes on the next one after the last revision seen,
        so no event is lost or repeated."""
        next_rev = start_revision
        failures = 0
        while True:
            endpoint = self.endpoints[0]
            create: dict[str, Any] = {"key": b64(key), "prev_kv": True}
            if prefix:
                create["range_end"] = b64(prefix_end(key))
            if next_rev:
                create["start_revision"] = str(next_rev)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
            try:
                async with self.session.post(
                    endpoint + "/v3/watch", json={"create_request": create}, timeout=timeout
                ) as resp:
                    if resp.status != 200:
                        raise EtcdUnavailable(f"{endpoint}: watch answered {resp.status}")
                    while line := await resp.content.readline():
                        msg = json.loads(line)
                        if "error" in msg:
                            raise EtcdUnavailable(f"{endpoint}: {msg['error']}")
                        result = msg.get("result", {})
                        if result.get("canceled"):
                            if int(result.get("compact_revision", 0)):
                                raise EtcdCompacted(f"revision {next_rev} is compacted")
                            raise EtcdUnavailable(f"{endpoint}: watch canceled")
                        failures = 0
                        events = [
                            WatchEvent(
                                type=ev.get("type", "PUT"),
                                kv=KV.from_json(ev["kv"]),
                                prev_kv=KV.from_json(ev["prev_kv"]) if "prev_kv" in ev else None,
                            )
                            for ev in result.get("events", [])
                        ]
                        self._seen(result)
                        if events:
                            next_rev = events[-1].kv.mod_revision + 1
                            yield events
            except (aiohttp.ClientError, EtcdUnavailable, OSError, ValueError):
                pass
            # the stream broke: resume on another member
            failures += 1
            if len(self.endpoints) > 1:
                self.endpoints.append(self.endpoints.pop(0))
            await asyncio.sleep(min(0.05 * failures, 1.0))

    # cluster

    async def member_list(self) -> list[dict[str, Any]]:
        data = await self.call("/v3/cluster/member/list", {})
        return data.get("members", [])

    async def member_add(self, peer_urls: list[str]) -> dict[str, Any]:
        data = await self.call("/v3/cluster/member/add", {"peerURLs": peer_urls})
        return data.get("member", {})

    async def member_remove(self, member_id: str | int) -> None:
        await self.call("/v3/cluster/member/remove", {"ID": str(member_id)})

    async def status(self, endpoint: str | None = None) -> dict[str, Any]:
        """`/v3/maintenance/status` of one endpoint (the first that answers if None)."""
        if endpoint is None:
            return await self.call("/v3/maintenance/status", {})
        return await self.call_one(endpoint.rstrip("/"), "/v3/maintenance/status", {})

    async def leader_id(self) -> str | None:
        """The id of the current etcd leader, asked of every endpoint until one knows."""
        for endpoint in list(self.endpoints):
            with contextlib.suppress(EtcdError):
                leader = (await self.status(endpoint)).get("leader")
                if leader and leader != "0":
                    return str(leader)
        return None


# --- the etcd member process ------------------------------------------------------------------


class EtcdProcess:
    """One etcd member as a child process. `initial_cluster` maps member name → peer URL
    (defaults to just this member). Use as a (sync or async) context manager so the process is
    always stopped; `kill()` is SIGKILL for failure tests and `start()` restarts it."""

    def __init__(
        self,
        name: str,
        data_dir: str | Path,
        ip: str = "127.0.0.1",
        client_port: int = 2379,
        peer_port: int = 2380,
        initial_cluster: dict[str, str] | None = None,
        cluster_state: str = "new",
        cluster_token: str = "flynn-discoverd",
        etcd_bin: str = "etcd",
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.ip = ip
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster or {name: self.peer_url}
        self.cluster_state = cluster_state
        self.cluster_token = cluster_token
        self.etcd_bin = etcd_bin
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def args(self) -> list[str]:
        cluster = ",".join(f"{n}={u}" for n, u in self.initial_cluster.items())
        return [
            self.etcd_bin,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", cluster,
            "--initial-cluster-state", self.cluster_state,
            "--initial-cluster-token", self.cluster_token,
            # a lost leader is replaced in about a second
            "--heartbeat-interval", "100",
            "--election-timeout", "500",
        ]  # fmt: skip

    def start(self) -> None:
        """Spawns the member (does not wait: a new cluster is healthy only once a quorum runs)."""
        if self.running:
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"etcd {self.name} exited: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"etcd {self.name} not healthy after {timeout}s: {self.log_tail()}")

    async def wait_healthy_async(self, within: float = 20.0) -> None:
        await asyncio.to_thread(self.wait_healthy, within)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EtcdProcess:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EtcdProcess:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
