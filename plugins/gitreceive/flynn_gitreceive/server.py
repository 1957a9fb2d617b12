"""git's smart HTTP protocol for app repositories (`https://git.<domain>/<app>.git`).

`GET <app>.git/info/refs?service=git-upload-pack|git-receive-pack` advertises the refs,
`POST <app>.git/git-upload-pack` serves a clone or fetch and `POST <app>.git/git-receive-pack`
takes a push, each by running git's own `upload-pack`/`receive-pack --stateless-rpc` on the
app's repository (see repos.py). A push holds the app's lock from restoring the repository to
storing it back, and installs a pre-receive hook that builds and deploys a push to master
(`flynn-host component gitreceive-hook`, receiver.py): git relays the hook's output to the
pusher as `remote:` lines while it runs, and a hook that fails rejects the push.

Every request needs HTTP Basic auth whose password is the controller key (the username is
ignored); without it the answer is 401 with `WWW-Authenticate`, which makes git ask its
credential helper (`flynn git-credentials`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import os
import signal
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from flynn_gitreceive.repos import PushLocks, RepoStore, refs
from flynn_gitreceive.types import APP_NAME_RE

log = logging.getLogger("flynn_gitreceive")

SERVICES = ("git-upload-pack", "git-receive-pack")
CHUNK = 1 << 16
# how long a killed push's git and hook get to clean up (the hook stops its build job)
STOP_GRACE = 15.0


class Config:
    def __init__(
        self,
        keys: list[str],
        controller: Any,
        repos: RepoStore,
        locks: PushLocks,
        hook_command: list[str],
        hook_env: dict[str, str],
    ) -> None:
        self.keys = [k for k in keys if k]
        self.controller = controller  # flynn_controller.client.Client
        self.repos = repos
        self.locks = locks
        self.hook_command = hook_command
        self.hook_env = hook_env


CONFIG = web.AppKey("config", Config)


def hook_command() -> list[str]:
    """How git runs the receiver: this program's `component gitreceive-hook`."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "component", "gitreceive-hook"]
    return [sys.executable, "-m", "flynn_host.cli.main", "component", "gitreceive-hook"]


def make_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=0)
    app[CONFIG] = config
    app.router.add_route("*", "/{path:.*}", handle)
    return app


def text(status: int, body: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=body + "\n", headers=headers)


def authorized(request: web.Request, keys: list[str]) -> bool:
    auth = request.headers.get("Authorization", "")
    scheme, _, encoded = auth.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        _, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return any(hmac.compare_digest(password.encode(), k.encode()) for k in keys)


def parse_path(path: str) -> tuple[str, str] | None:
    """(app name, what) for `/<app>[.git]/info/refs|git-upload-pack|git-receive-pack`."""
    for what in ("/info/refs", "/git-upload-pack", "/git-receive-pack"):
        if path.endswith(what):
            name = path[: -len(what)].lstrip("/").removesuffix(".git")
            return name, what.lstrip("/")
    return None


async def handle(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if request.path == "/.well-known/status":
        return text(200, "ok")
    parsed = parse_path(request.path)
    if parsed is None:
        return text(404, "Not Found")
    if not authorized(request, config.keys):
        return text(401, "Unauthorized", **{"WWW-Authenticate": 'Basic realm="flynn"'})
    name, what = parsed
    if not APP_NAME_RE.match(name):
        return text(403, "Forbidden")
    if what == "info/refs":
        service = request.query.get("service", "")
        if request.method != "GET":
            return text(405, "Method Not Allowed")
        if service not in SERVICES:
            return text(404, "Not Found: only git's smart HTTP protocol is served")
    elif request.method != "POST":
        return text(405, "Method Not Allowed")
    try:
        app = await asyncio.to_thread(config.controller.get_app, name)
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ == "NotFound":
            return text(404, "unknown app")
        log.warning("looking up app %s: %s", name, exc)
        return text(503, f"the controller is unavailable: {exc}")
    if what == "info/refs":
        return await advertise(request, config, app, request.query["service"])
    if what == "git-upload-pack":
        return await upload_pack(request, config, app)
    return await receive_pack(request, config, app)


async def advertise(
    request: web.Request, config: Config, app: dict[str, Any], service: str
) -> web.StreamResponse:
    async with config.repos.checkout(app["id"]) as repo:
        proc = await asyncio.create_subprocess_exec(
            "git",
            service.removeprefix("git-"),
            "--stateless-rpc",
            "--advertise-refs",
            str(repo),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    if proc.returncode != 0:
        log.warning("%s --advertise-refs: %s", service, err.decode(errors="replace"))
        return text(500, "git failed")
    header = f"# service={service}\n"
    body = f"{len(header) + 4:04x}{header}0000".encode() + out
    return web.Response(
        body=body,
        content_type=f"application/x-{service}-advertisement",
        headers={"Cache-Control": "no-cache"},
    )


async def upload_pack(
    request: web.Request, config: Config, app: dict[str, Any]
) -> web.StreamResponse:
    async with config.repos.checkout(app["id"]) as repo:
        return await run_rpc(request, "git-upload-pack", repo, os.environ.copy())


async def receive_pack(
    request: web.Request, config: Config, app: dict[str, Any]
) -> web.StreamResponse:
    resp: web.StreamResponse | None = None

    async def say_waiting() -> None:
        # nothing can be shown before git's own output starts: the wait is only logged
        log.info("push to %s waits for another push to finish", app["name"])

    async with (
        config.locks.hold(app["id"], say_waiting),
        config.repos.checkout(app["id"]) as repo,
    ):
        hook = repo / "hooks" / "pre-receive"
        hook.parent.mkdir(exist_ok=True)
        hook.write_text("#!/bin/sh\nexec " + " ".join(_sh(a) for a in config.hook_command) + "\n")
        hook.chmod(0o755)
        env = {
            **os.environ,
            **config.hook_env,
            "RECEIVE_APP": app["name"],
            "RECEIVE_APP_ID": app["id"],
        }
        before = await refs(repo)
        resp = await run_rpc(request, "git-receive-pack", repo, env)
        if await refs(repo) != before:
            try:
                await config.repos.save(app["id"], repo)
            except Exception:  # noqa: BLE001 - the push is deployed; the next one heals it
                log.exception("storing the repository of %s", app["name"])
    return resp


def _sh(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


async def run_rpc(
    request: web.Request, service: str, repo: Path, env: dict[str, str]
) -> web.StreamResponse:
    """Feed the request body to `git <service> --stateless-rpc` and stream its output back.
    If the client goes away, git and everything it started (the hook, the receiver) are
    stopped: SIGTERM first, so the receiver can stop its build job."""
    proc = await asyncio.create_subprocess_exec(
        "git",
        service.removeprefix("git-"),
        "--stateless-rpc",
        str(repo),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    resp = web.StreamResponse(
        headers={"Content-Type": f"application/x-{service}-result", "Cache-Control": "no-cache"}
    )
    errors = bytearray()

    async def feed() -> None:
        assert proc.stdin is not None
        decompress: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
        if request.headers.get("Content-Encoding", "").lower() in ("gzip", "x-gzip"):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            decompress = d.decompress
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                proc.stdin.write(decompress(chunk))
                await proc.stdin.drain()
        finally:
            with contextlib.suppress(ConnectionError):
                proc.stdin.close()

    async def drain_stderr() -> None:
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(CHUNK):
            if len(errors) < CHUNK:
                errors.extend(chunk)

    feeder = asyncio.create_task(feed())
    stderr_task = asyncio.create_task(drain_stderr())
    try:
        await resp.prepare(request)
        while chunk := await proc.stdout.read(CHUNK):
            await resp.write(chunk)
        await feeder
        await proc.wait()
        await stderr_task
        if proc.returncode != 0:
            log.info("%s exited %s: %s", service, proc.returncode, errors.decode(errors="replace"))
        await resp.write_eof()
    except BaseException as exc:
        log.info("%s for %s ended early (%s): stopping it", service, repo, type(exc).__name__)
        await asyncio.shield(_stop(proc))
        raise
    finally:
        feeder.cancel()
        stderr_task.cancel()
    return resp


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
