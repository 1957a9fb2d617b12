"""The controller's request throughput and latency, and its event delivery across processes,
set against bare references measured in the same run on the same PostgreSQL database.

* **GET /apps/:app/release** and **POST /releases**: `--clients` concurrent aiohttp clients
  (keep-alive, one connection each) for `--time` seconds against one controller process;
  requests/s and p50/p99 latency. Reference: a bare aiohttp handler in its own process (as the
  controller is) that reads the same release from the same tables with asyncpg and returns the
  same JSON (no auth, no validation, no event), and for POST inserts an equivalent release row;
  a second POST reference also writes the release's event row and its NOTIFY in the same
  transaction, as the controller must (but without the controller's event lock).
  Controller and reference alternate in `--rounds` blocks, so load drift hits both.
* **event delivery**: an SSE subscriber on controller process B; `POST /apps` through process
  A, one at a time; latency from sending the POST to the app's event arriving on B (the write,
  the commit, LISTEN/NOTIFY, B's fan-out). Reference: the floor of any cross-process delivery
  through PostgreSQL: one asyncpg connection commits an INSERT and a `pg_notify` in one
  transaction, another connection LISTENing receives it.

    python bench/controller.py [--clients 50] [--time 10] [--rounds 2] [--events 200] [--json]

It needs the packages `make dev` installs (PostgreSQL 15), not root. It prints, and asserts
nothing. PostgreSQL, both controllers and the reference are stopped and removed at the end,
also on Ctrl-C or SIGTERM. About a minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flynn_host.dev.controller import (  # noqa: E402
    KEY,
    ControllerProcess,
    PGServer,
    controller_process,
    pg_server,
)
from flynn_host.dev.host import free_port  # noqa: E402

AUTH = {"Authorization": "Basic " + __import__("base64").b64encode(f":{KEY}".encode()).decode()}
RELEASE_BODY = {
    "env": {"SLUG_URL": "http://blobstore.discoverd/x.tgz", "SOME": "info"},
    "processes": {
        "web": {
            "cmd": ["start", "web"],
            "ports": [{"port": 8080, "proto": "tcp", "service": {"name": "b-web", "create": True}}],
        }
    },
}

# The reference server's SQL, on the controller's own tables (migrations/0001_initial.sql).
SELECT_RELEASE = """
SELECT r.release_id, r.artifact_id, r.env, r.meta, r.processes, r.created_at
  FROM apps a JOIN releases r ON r.release_id = a.release_id
 WHERE a.app_id = $1 AND a.deleted_at IS NULL"""
INSERT_RELEASE = """
INSERT INTO releases (release_id, artifact_id, env, meta, processes)
VALUES ($1, $2, $3, $4, $5) RETURNING created_at"""
INSERT_EVENT = """
INSERT INTO events (object_type, object_id, data) VALUES ('release', $1, $2) RETURNING event_id"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the reference server (run as `controller.py --reference PORT`) ------------------------


def _time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _release_json(rid: Any, artifact: Any, env: Any, meta: Any, procs: Any, created: Any) -> dict:
    out: dict[str, Any] = {"id": str(rid)}
    if artifact is not None:
        out["artifact"] = str(artifact)
    for key, value in (("env", env), ("meta", meta), ("processes", procs)):
        if value:
            out[key] = value
    out["created_at"] = _time(created)
    return out


def serve_reference(port: int) -> None:
    import asyncpg
    from aiohttp import web

    async def init(conn: Any) -> None:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )

    async def lifecycle(app: web.Application) -> Any:
        app["pool"] = await asyncpg.create_pool(
            host=os.environ["PGHOST"], port=int(os.environ["PGPORT"]), user=os.environ["PGUSER"],
            password=os.environ["PGPASSWORD"], database=os.environ["PGDATABASE"],
            min_size=10, max_size=20, init=init,
        )  # fmt: skip
        yield
        await app["pool"].close()

    async def get_release(request: web.Request) -> web.Response:
        row = await request.app["pool"].fetchrow(
            SELECT_RELEASE, uuid.UUID(request.match_info["app"])
        )
        if row is None:
            return web.Response(status=404)
        return web.json_response(_release_json(*row))

    async def post_release(request: web.Request) -> web.Response:
        body = await request.json()
        rid = uuid.uuid4()
        artifact = uuid.UUID(body["artifact"]) if body.get("artifact") else None
        env, meta, procs = body.get("env"), body.get("meta"), body.get("processes")
        if "event" not in request.query:
            created = await request.app["pool"].fetchval(
                INSERT_RELEASE, rid, artifact, env, meta, procs
            )
            return web.json_response(_release_json(rid, artifact, env, meta, procs, created))
        # ?event: also the release's event and its NOTIFY, in one transaction
        async with request.app["pool"].acquire() as conn, conn.transaction():
            created = await conn.fetchval(INSERT_RELEASE, rid, artifact, env, meta, procs)
            out = _release_json(rid, artifact, env, meta, procs, created)
            event_id = await conn.fetchval(INSERT_EVENT, out["id"], out)
            await conn.execute("SELECT pg_notify('bench_reference', $1)", str(event_id))
        return web.json_response(out)

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/ping", ping)
    app.router.add_get("/apps/{app}/release", get_release)
    app.router.add_post("/releases", post_release)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@contextlib.contextmanager
def reference_process(pg: PGServer) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--reference", str(port)],
        env={**os.environ, **pg.env()},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the reference server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- load --------------------------------------------------------------------------------


def call(ctl: ControllerProcess, method: str, path: str, body: object = None) -> Any:
    req = urllib.request.Request(
        ctl.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200, (method, path, r.status)
        data = r.read()
        return json.loads(data) if data else None


async def load(
    url: str, method: str, path: str, body: bytes | None, clients: int, seconds: float
) -> tuple[int, float, list[float]]:
    """`clients` workers, each on its own keep-alive connection, send requests back to back
    for `seconds`; returns (requests, elapsed s, latencies in ms). Non-200 answers abort."""
    import aiohttp

    latencies: list[float] = []
    headers = {**AUTH, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.request(method, url + path, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{method} {url}{path}: {r.status} {await r.text()}")
                latencies.append((time.perf_counter() - t0) * 1000)

        # warm-up: every connection opened and used once
        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(clients)))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(latencies), elapsed, latencies


def summary(runs: list[tuple[int, float, list[float]]]) -> dict[str, float]:
    n = sum(r[0] for r in runs)
    elapsed = sum(r[1] for r in runs)
    lat = sorted(x for r in runs for x in r[2])
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def quantiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_ms": s[len(s) // 2],
        "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))],
        "mean_ms": statistics.fmean(s),
    }


# --- events ------------------------------------------------------------------------------


async def controller_events(a: ControllerProcess, b: ControllerProcess, n: int) -> dict:
    """POST /apps through A, one at a time; each app's event awaited on B's stream."""
    import aiohttp

    arrived: dict[str, float] = {}
    waiting: dict[str, asyncio.Future[float]] = {}
    async with aiohttp.ClientSession() as session:
        last = (await (await session.get(
            b.url + "/events?count=1", headers={**AUTH, "Accept": "application/json"}
        )).json())  # fmt: skip
        last_id = last[0]["id"] if last else 0
        stream = await session.get(
            b.url + "/events?object_types=app",
            headers={**AUTH, "Accept": "text/event-stream", "Last-Event-Id": str(last_id)},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
        assert stream.status == 200, stream.status

        async def read() -> None:
            async for line in stream.content:
                if line.startswith(b"data: "):
                    t = time.perf_counter()
                    obj = json.loads(line[6:])["object_id"]
                    arrived[obj] = t
                    fut = waiting.get(obj)
                    if fut is not None and not fut.done():
                        fut.set_result(t)

        reader = asyncio.create_task(read())
        delivery, post, after = [], [], []
        try:
            for _ in range(n):
                name = f"bench-{uuid.uuid4().hex[:12]}"
                t0 = time.perf_counter()
                async with session.post(a.url + "/apps", json={"name": name}, headers=AUTH) as r:
                    app = await r.json()
                    t1 = time.perf_counter()
                fut = asyncio.get_running_loop().create_future()
                waiting[app["id"]] = fut
                if app["id"] in arrived:
                    fut.set_result(arrived[app["id"]])
                t2 = await asyncio.wait_for(fut, 10)
                delivery.append((t2 - t0) * 1000)
                post.append((t1 - t0) * 1000)
                after.append((t2 - t1) * 1000)  # < 0: the event beat the POST's answer
                await asyncio.sleep(0.01)
        finally:
            reader.cancel()
            stream.close()
    return {"delivery": quantiles(delivery), "post": quantiles(post), "after": quantiles(after)}


async def reference_events(pg: PGServer, n: int) -> dict:
    """INSERT + pg_notify committed on one connection, received by a LISTENer on another."""
    import asyncpg

    env = pg.env()
    kw = dict(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"],
              password=env["PGPASSWORD"], database=env["PGDATABASE"])  # fmt: skip
    writer, listener = await asyncpg.connect(**kw), await asyncpg.connect(**kw)
    try:
        await writer.execute(
            "CREATE TABLE IF NOT EXISTS bench_reference_events"
            " (id bigserial PRIMARY KEY, data jsonb)"
        )
        waiting: dict[str, asyncio.Future[float]] = {}

        def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
            fut = waiting.get(payload)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

        await listener.add_listener("bench_reference", on_notify)
        samples = []
        for _ in range(n):
            key = uuid.uuid4().hex
            waiting[key] = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            async with writer.transaction():
                await writer.execute(
                    "INSERT INTO bench_reference_events (data) VALUES ($1)", json.dumps({"k": key})
                )
                await writer.execute("SELECT pg_notify('bench_reference', $1)", key)
            t2 = await asyncio.wait_for(waiting[key], 10)
            samples.append((t2 - t0) * 1000)
            await asyncio.sleep(0.01)
        await writer.execute("DROP TABLE bench_reference_events")
        return {"delivery": quantiles(samples)}
    finally:
        await writer.close()
        await listener.close()


# --- the run -----------------------------------------------------------------------------


def run(clients: int, seconds: float, rounds: int, events: int) -> dict[str, Any]:
    with (
        pg_server() as pg,
        controller_process(pg) as a,
        controller_process(pg) as b,
        reference_process(pg) as ref,
    ):
        artifact = call(a, "POST", "/artifacts", {"type": "docker", "uri": "https://r.test?name=b"})
        release = call(a, "POST", "/releases", {"artifact": artifact["id"], **RELEASE_BODY})
        app = call(a, "POST", "/apps", {"name": "bench"})
        call(a, "PUT", f"/apps/{app['id']}/release", {"id": release["id"]})
        ours = call(a, "GET", f"/apps/{app['id']}/release")
        with urllib.request.urlopen(f"{ref}/apps/{app['id']}/release") as r:
            theirs = json.loads(r.read())
        if ours != theirs:
            say(f"note: the reference's release JSON differs:\n  {ours}\n  {theirs}")

        post_body = json.dumps({"artifact": artifact["id"], **RELEASE_BODY}).encode()
        cases = {
            "get_release": ("GET", f"/apps/{app['id']}/release", None),
            "post_release": ("POST", "/releases", post_body),
        }
        runs: dict[str, dict[str, list]] = {k: {"controller": [], "reference": []} for k in cases}
        runs["post_release"]["reference_event"] = []
        for i in range(rounds):
            for case, (method, path, body) in cases.items():
                sides = [("controller", a.url, path), ("reference", ref, path)]
                if case == "post_release":
                    sides.append(("reference_event", ref, path + "?event"))
                for side, url, p in sides:
                    say(f"round {i + 1}/{rounds}: {method} {p} on the {side}")
                    runs[case][side].append(
                        asyncio.run(load(url, method, p, body, clients, seconds / rounds))
                    )
        result: dict[str, Any] = {"clients": clients, "seconds": seconds}
        for case in cases:
            c, r = summary(runs[case]["controller"]), summary(runs[case]["reference"])
            result[case] = {
                "controller": c,
                "reference": r,
                "rps_ratio": c["rps"] / r["rps"],
                "p50_ratio": c["p50_ms"] / r["p50_ms"],
                "p99_ratio": c["p99_ms"] / r["p99_ms"],
            }
        e = summary(runs["post_release"]["reference_event"])
        c = result["post_release"]["controller"]
        result["post_release"]["reference_event"] = e
        result["post_release"]["vs_reference_event"] = {
            "rps_ratio": c["rps"] / e["rps"],
            "p50_ratio": c["p50_ms"] / e["p50_ms"],
            "p99_ratio": c["p99_ms"] / e["p99_ms"],
        }
        say(f"event delivery: {events} apps through A, on B's stream; then the reference")
        ce = asyncio.run(controller_events(a, b, events))
        re_ = asyncio.run(reference_events(pg, events))
        result["events"] = {
            "controller": ce["delivery"],
            "controller_post": ce["post"],
            "controller_after_answer": ce["after"],
            "reference": re_["delivery"],
            "p50_ratio": ce["delivery"]["p50_ms"] / re_["delivery"]["p50_ms"],
            "p99_ratio": ce["delivery"]["p99_ms"] / re_["delivery"]["p99_ms"],
        }
        return result


def print_table(r: dict[str, Any]) -> None:
    print(f"controller, one process, {r['clients']} clients (keep-alive), {r['seconds']:.0f} s "
          "per measure; reference = bare aiohttp + asyncpg on the same tables")  # fmt: skip
    print(f"{'':26}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}   {'ref req/s':>9}{'p50 ms':>9}"
          f"{'p99 ms':>9}   {'req/s':>6}{'p50':>7}{'p99':>7}")  # fmt: skip
    for case, label in (
        ("get_release", "GET /apps/:app/release"),
        ("post_release", "POST /releases"),
    ):
        x = r[case]
        c, f = x["controller"], x["reference"]
        print(f"{label:26}{c['rps']:9.0f}{c['p50_ms']:9.1f}{c['p99_ms']:9.1f}   {f['rps']:9.0f}"
              f"{f['p50_ms']:9.1f}{f['p99_ms']:9.1f}   {x['rps_ratio']:5.2f}×{x['p50_ratio']:6.2f}×"
              f"{x['p99_ratio']:6.2f}×")  # fmt: skip
    x = r["post_release"]
    f, v = x["reference_event"], x["vs_reference_event"]
    print(f"{'  (reference + its event)':26}{'':27}   {f['rps']:9.0f}{f['p50_ms']:9.1f}"
          f"{f['p99_ms']:9.1f}   {v['rps_ratio']:5.2f}×{v['p50_ratio']:6.2f}×"
          f"{v['p99_ratio']:6.2f}×")  # fmt: skip
    e = r["events"]
    print(f"event delivery, POST /apps on A → SSE on B ({e['controller']['n']} events): "
          f"p50 {e['controller']['p50_ms']:.1f} ms, p99 {e['controller']['p99_ms']:.1f} ms "
          f"(the POST's answer: p50 {e['controller_post']['p50_ms']:.1f} ms, the event after it: "
          f"p50 {e['controller_after_answer']['p50_ms']:.1f} ms);\n"
          f"  reference INSERT+NOTIFY → LISTEN: p50 {e['reference']['p50_ms']:.2f} ms, "
          f"p99 {e['reference']['p99_ms']:.2f} ms; "
          f"ratio p50 {e['p50_ratio']:.1f}×, p99 {e['p99_ratio']:.1f}×")  # fmt: skip


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--reference":
        serve_reference(int(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--time", type=float, default=10, help="seconds per measure (all rounds)")
    p.add_argument("--rounds", type=int, default=2, help="alternating blocks per measure")
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so PostgreSQL and the processes are removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args.clients, args.time, args.rounds, args.events)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
