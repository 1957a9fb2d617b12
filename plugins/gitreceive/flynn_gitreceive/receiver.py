"""The receiver: the pre-receive hook of every app repository (`flynn-host component
gitreceive-hook`), which turns a push to master into a running release, as Flynn's
flynn-receiver does.

    -----> Building <app>...          slugbuilder's output follows (builds.py)
    -----> Creating release...        the slug image: slugrunner's layers + the slug layer
    =====> Application deployed       through the controller's deployer
    =====> Added default web=1 formation     (first push of an app with a web type)

Every line goes to the pusher as it comes (git shows it as a `remote:` line; the leading
`ESC[1G ESC[K` puts it at the start of the line, as Flynn does). Exiting non-zero rejects the
push, and whatever the push made is taken away again: the build job, the slug and its image
in the blobstore, the release that failed to deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from flynn_gitreceive import builds
from flynn_gitreceive.repos import extract
from flynn_gitreceive.types import (
    BLOBSTORE_URL,
    CACHE_PATH,
    DEPLOY_REF,
    REPO_PATH,
    SLUG_IMAGES_PATH,
    SLUG_LAYERS_PATH,
    ZERO_SHA,
)
from flynn_host.runtime import images

ENV_MARKER = ".ENV_DIR_bdca46b87df0537eaefe79bb632d37709ff1df18"
SLUG_LINE = "FLYNN-SLUG-LAYER "
# the host metadata that marks a build job (its value: the app's name)
BUILD_META = "flynn-gitreceive.build"
WEB_PORT = 8080
SCALE_TIMEOUT = 20.0
# a build running longer is stopped (it holds the app's push lock): gitreceive's BUILD_TIMEOUT
BUILD_TIMEOUT = 1800.0  # seconds between job events while the first web job starts
# a BUILDPACK_URL naming a repository of this cluster's own gitreceive
OWN_GIT_RE = re.compile(r"^https?://git\.[^/]+/([a-z\d]+(?:-[a-z\d]+)*)(?:\.git)?/?(?:#(.+))?$")


class Rejected(Exception):
    """The push is refused; the message says why."""


def say(line: str) -> None:
    sys.stdout.write(f"\x1b[1G\x1b[K{line}\n")
    sys.stdout.flush()


class Receiver:
    def __init__(self, app_name: str, newrev: str, env: dict[str, str]) -> None:
        from flynn_controller.client import Client

        self.app_name = app_name
        self.newrev = newrev
        self.env = env
        self.blobstore = (env.get("BLOBSTORE_URL") or BLOBSTORE_URL).rstrip("/")
        self.controller = Client(
            env.get("CONTROLLER_URL") or "http://controller.discoverd",
            (env.get("CONTROLLER_KEY") or "").split(",")[0],
        )
        self.work = Path(tempfile.mkdtemp(prefix="receive-"))
        self._partial = ""
        self.slug: dict[str, Any] | None = None
        # what this push made, taken away again if it fails
        self.blobs: list[str] = []
        self.undeployed_release: str | None = None

    async def run(self) -> None:
        from flynn_controller.client import NotFound

        c = self.controller
        app = await asyncio.to_thread(c.get_app, self.app_name)
        try:
            prev = await asyncio.to_thread(c.app_release, self.app_name)
        except NotFound:
            prev = None
        if await self.is_buildpack():
            # what BUILDPACK_URL may name: kept in the cluster's git, nothing to run
            say(f"-----> {app['name']} is a buildpack (bin/detect, bin/compile): stored, not built")
            return
        say(f"-----> Building {app['name']}...")
        source = await self.source_tar(app, prev)
        await self.build(app, prev, source)
        assert self.slug is not None
        say("-----> Creating release...")
        release = await self.create_release(app, prev)
        await self.deploy(app, prev, release)

    # --- the source -----------------------------------------------------------------------

    async def is_buildpack(self) -> bool:
        for path in ("bin/detect", "bin/compile"):
            try:
                await _run(["git", "cat-file", "-e", f"{self.newrev}:{path}"])
            except Rejected:
                return False
        return True

    async def source_tar(self, app: dict[str, Any], prev: dict[str, Any] | None) -> Path:
        """The pushed tree as a tar; with the app's config vars (an env dir) or a buildpack
        from this cluster's git, in Flynn's layout (app/, env/, buildpack/ and the marker)."""
        tree = self.work / "source.tar"
        await _run(["git", "archive", "--format=tar", "-o", str(tree), self.newrev])
        env = dict((prev or {}).get("env") or {})
        own_buildpack = await self.own_buildpack(env.get("BUILDPACK_URL", ""))
        if not env and own_buildpack is None:
            return tree
        wrapped = self.work / "input.tar"
        await asyncio.to_thread(_wrap, tree, wrapped, env, own_buildpack)
        tree.unlink()
        return wrapped

    async def own_buildpack(self, url: str) -> Path | None:
        """A BUILDPACK_URL at this cluster's own git: the buildpack's tree, taken from its
        repository in the blobstore (the build job has no key to clone it with)."""
        from flynn_controller.client import NotFound

        m = OWN_GIT_RE.match(url)
        if not m:
            return None
        try:
            bp_app = await asyncio.to_thread(self.controller.get_app, m.group(1))
        except NotFound:
            return None
        repo_tar = self.work / "buildpack-repo.tar"
        repo_url = self.blobstore + REPO_PATH.format(app_id=bp_app["id"])
        async with aiohttp.ClientSession() as session, session.get(repo_url) as resp:
            if resp.status != 200:
                raise Rejected(f"the buildpack {url} has not been pushed to this cluster")
            with repo_tar.open("wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    f.write(chunk)
        repo = self.work / "buildpack.git"
        await asyncio.to_thread(extract, repo_tar, repo)
        out = self.work / "buildpack.tar"
        ref = m.group(2) or "master"
        try:
            await _run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(out), ref],
                       clean_env=True)  # fmt: skip
        except Rejected:
            raise Rejected(f"the buildpack {url} has no {ref!r} to build with") from None
        return out

    # --- the build ------------------------------------------------------------------------

    async def build(self, app: dict[str, Any], prev: dict[str, Any] | None, source: Path) -> None:
        env = {
            "BUILD_CACHE_URL": self.blobstore + CACHE_PATH.format(app_id=app["id"]),
            "SOURCE_VERSION": self.newrev,
        }
        if self.env.get("BUILD_CA_CERTS"):
            env["BUILD_CA_CERTS"] = self.env["BUILD_CA_CERTS"]
        env.update(proxy_env(self.env))
        bp_url = ((prev or {}).get("env") or {}).get("BUILDPACK_URL", "")
        if bp_url and not OWN_GIT_RE.match(bp_url):
            env["BUILDPACK_URL"] = bp_url
        proc = ((prev or {}).get("processes") or {}).get("slugbuilder") or {}
        metadata = {
            "flynn-controller.app": app["id"],
            "flynn-controller.app_name": app["name"],
            "flynn-controller.release": (prev or {}).get("id", ""),
            # no `flynn-controller.type`: the scheduler takes a typed job of a release for one
            # of its formation's and would stop it as one too many
            BUILD_META: app["name"],
        }
        image_uri = self.env.get("SLUGBUILDER_IMAGE_URI", "")
        if not image_uri:
            raise Rejected("gitreceive has no SLUGBUILDER_IMAGE_URI: the cluster cannot build")
        limit = float(self.env.get("BUILD_TIMEOUT") or BUILD_TIMEOUT)
        try:
            async with asyncio.timeout(limit):
                status = await builds.run(
                    image_uri,
                    ["/builder/build", self.blobstore + SLUG_LAYERS_PATH],
                    env,
                    metadata,
                    proc.get("resources"),
                    source,
                    self.output,
                )
        except builds.BuildError as exc:
            raise Rejected(str(exc)) from None
        except TimeoutError:
            raise Rejected(
                f"the build took longer than {limit:g} seconds (BUILD_TIMEOUT)"
            ) from None
        self.output(b"", final=True)
        if self.slug is not None:
            self.blobs.append(self.blobstore + SLUG_LAYERS_PATH + f"{self.slug['id']}.squashfs")
        if status != 0:
            raise Rejected("the build failed")
        if self.slug is None:
            raise Rejected("the build made no slug")

    def output(self, data: bytes, final: bool = False) -> None:
        self._partial += data.decode(errors="replace")
        lines = self._partial.split("\n")
        self._partial = "" if final else lines.pop()
        for line in lines:
            line = line.rstrip("\r")
            if line.startswith(SLUG_LINE):
                with contextlib.suppress(ValueError):
                    self.slug = json.loads(line[len(SLUG_LINE) :])
            elif line or not final:
                say(line)

    # --- the release ----------------------------------------------------------------------

    async def create_release(
        self, app: dict[str, Any], prev: dict[str, Any] | None
    ) -> dict[str, Any]:
        assert self.slug is not None
        runner_uri = self.env.get("SLUGRUNNER_IMAGE_URI", "")
        host_id, url = await builds.pick_host()
        host = builds.Host(host_id, url)
        try:
            runner = await host.image("slugrunner", runner_uri)
        except builds.BuildError as exc:
            raise Rejected(str(exc)) from None
        finally:
            await host.close()
        manifest = json.loads(json.dumps(runner["manifest"]))
        for rootfs in manifest["rootfs"]:
            if rootfs.get("platform") == images.PLATFORM:
                rootfs["layers"].append(
                    {
                        "id": self.slug["id"],
                        "type": images.LAYER_TYPE,
                        "length": int(self.slug["length"]),
                        "hashes": {"sha512_256": self.slug["id"]},
                        "meta": {"slug": "true"},
                    }
                )
        manifest_url = self.blobstore + SLUG_IMAGES_PATH.format(image_id=images.image_id(manifest))
        async with aiohttp.ClientSession() as session:
            body = json.dumps(manifest).encode()
            async with session.put(manifest_url, data=body) as resp:
                if resp.status != 200:
                    raise Rejected(f"storing the slug's image failed: HTTP {resp.status}")
        self.blobs.append(manifest_url)
        types: list[str] = list(self.slug.get("process_types") or [])
        artifact = await asyncio.to_thread(
            self.controller.create_artifact,
            {
                "type": "flynn",
                "uri": manifest_url,
                "meta": {"blobstore": "true", "slugbuilder.process_types": ",".join(types)},
            },
        )
        prev_procs = (prev or {}).get("processes") or {}
        processes: dict[str, Any] = {}
        for t in types:
            proc = dict(prev_procs.get(t) or {})
            proc.pop("args", None)
            proc["entrypoint"] = ["/runner/init"]
            proc["cmd"] = ["start", t]
            if t == "web" or t.endswith("-web"):
                service = f"{app['name']}-{t}"
                proc["ports"] = [
                    {
                        "port": WEB_PORT,
                        "proto": "tcp",
                        "service": {"name": service, "create": True, "check": {"type": "tcp"}},
                    }
                ]
                proc["service"] = service
            processes[t] = proc
        if "slugbuilder" in prev_procs:
            processes["slugbuilder"] = prev_procs["slugbuilder"]
        release = {
            "artifact": artifact["id"],
            "env": dict((prev or {}).get("env") or {}),
            "meta": {**((prev or {}).get("meta") or {}), "git": "true", "rev": self.newrev},
            "processes": processes,
        }
        created = dict(await asyncio.to_thread(self.controller.create_release, release))
        self.undeployed_release = created["id"]
        return created

    # --- the deploy -----------------------------------------------------------------------

    async def deploy(
        self, app: dict[str, Any], prev: dict[str, Any] | None, release: dict[str, Any]
    ) -> None:
        from flynn_controller.client import ControllerError, NotFound

        c = self.controller
        first = prev is None
        if prev is not None:
            try:
                await asyncio.to_thread(c.get_formation, app["name"], prev["id"])
            except NotFound:
                first = True
        try:
            await asyncio.to_thread(c.deploy_app_release, app["name"], release["id"])
        except ControllerError as exc:
            # the deployer rolled back to the previous release: this one is taken away
            with contextlib.suppress(ControllerError):
                await asyncio.to_thread(c.delete_app_release, app["name"], release["id"])
            raise Rejected(f"the deployment failed: {exc}") from None
        # the release is the app's now: its slug stays
        self.blobs.clear()
        self.undeployed_release = None
        say("=====> Application deployed")
        if first and "web" in (release.get("processes") or {}):
            try:
                await asyncio.to_thread(self.scale_web, app, release)
            except Rejected:
                # no web job that keeps crashing: the app has no previous release to serve
                with contextlib.suppress(ControllerError):
                    await asyncio.to_thread(
                        c.put_formation,
                        {"app": app["id"], "release": release["id"], "processes": {"web": 0}},
                    )
                raise
            say("=====> Added default web=1 formation")

    def scale_web(self, app: dict[str, Any], release: dict[str, Any]) -> None:
        c = self.controller
        with c.events(app_id=app["id"], object_types=["job"]) as stream:
            c.put_formation({"app": app["id"], "release": release["id"], "processes": {"web": 1}})
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    event = stream.next(timeout=SCALE_TIMEOUT)
                except TimeoutError:
                    break
                job = event.get("data") or {}
                if job.get("type") != "web" or job.get("release") != release["id"]:
                    continue
                if job.get("state") == "up":
                    return
                if job.get("state") in ("down", "crashed", "failed"):
                    raise Rejected("Failed to scale web process type")
        raise Rejected("Failed to scale web process type: no web job came up in time")

    # --- cleaning up ----------------------------------------------------------------------

    async def discard(self) -> None:
        """Take away what a failed push made."""
        from flynn_controller.client import ControllerError

        if self.undeployed_release is not None:
            with contextlib.suppress(ControllerError, OSError):
                await asyncio.to_thread(
                    self.controller.delete_app_release, self.app_name, self.undeployed_release
                )
        if not self.blobs:
            return
        async with aiohttp.ClientSession() as session:
            for url in self.blobs:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.delete(url):
                        pass

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def proxy_env(env: dict[str, str]) -> dict[str, str]:
    """The proxy a build reaches the package registries through (`BUILD_HTTPS_PROXY`, as
    an operator behind a proxy sets it), in the variables curl, git, npm and pip read; the
    cluster's own services (`*.discoverd`) are never asked through it."""
    proxy = env.get("BUILD_HTTPS_PROXY", "")
    if not proxy:
        return {}
    no_proxy = ",".join(
        x for x in (".discoverd", "localhost", "127.0.0.1", env.get("BUILD_NO_PROXY", "")) if x
    )
    return {
        "HTTPS_PROXY": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "http_proxy": proxy,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def _wrap(tree: Path, out: Path, env: dict[str, str], buildpack: Path | None) -> None:
    """Flynn's build input: the app under app/, one file per config var under env/, a
    buildpack under buildpack/, and the marker file."""
    with tarfile.open(out, "w") as dst:
        marker = tarfile.TarInfo(ENV_MARKER)
        dst.addfile(marker)
        with tarfile.open(tree) as src:
            for member in src:
                data = src.extractfile(member) if member.isfile() else None
                member.name = "app/" + member.name
                if member.islnk():
                    member.linkname = "app/" + member.linkname
                dst.addfile(member, data)
        for name, value in env.items():
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                info = tarfile.TarInfo(f"env/{name}")
                raw = str(value).encode()
                info.size = len(raw)
                dst.addfile(info, io.BytesIO(raw))
        if buildpack is not None:
            with tarfile.open(buildpack) as src:
                for member in src:
                    data = src.extractfile(member) if member.isfile() else None
                    member.name = "buildpack/" + member.name
                    if member.islnk():
                        member.linkname = "buildpack/" + member.linkname
                    dst.addfile(member, data)


async def _run(argv: list[str], clean_env: bool = False) -> None:
    env = None
    if clean_env:
        # git's hook environment points at the pushed repository: not for another one
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise Rejected(f"{argv[0]} {argv[1]}: {err.decode(errors='replace').strip()}")


def read_updates(text: str) -> list[tuple[str, str, str]]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


def main(argv: list[str]) -> int:
    app_name = os.environ.get("RECEIVE_APP", "")
    updates = read_updates(sys.stdin.read())
    for _old, new, ref in updates:
        if ref != DEPLOY_REF:
            branch = ref.removeprefix("refs/heads/")
            say(f" !     Only a push to master deploys: {ref} was refused.")
            say(f" !     Push with `git push flynn {branch}:master` to deploy it.")
            return 1
        if new == ZERO_SHA:
            say(" !     Deleting master is not supported: the app's code stays.")
            return 1
    if not updates:
        return 0
    old, new, ref = updates[-1]
    current = subprocess.run(["git", "rev-parse", "--verify", "-q", ref],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    if (current or ZERO_SHA) != old:
        # another push came first (pushes to one app wait for each other): building this
        # one would deploy a commit git is about to refuse
        say(" !     master has moved on since you fetched it: another push came first.")
        say(" !     Pull (git pull flynn master) and push again.")
        return 1
    receiver = Receiver(app_name, new, dict(os.environ))

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # the pusher went away (gitreceive stops git and this hook): stop the build and
        # take away what was made
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await receiver.run()
            return 0
        except Rejected as exc:
            say(f" !     Push rejected: {exc}")
            await receiver.discard()
            return 1
        except asyncio.CancelledError:
            await receiver.discard()
            return 1
        except Exception as exc:  # noqa: BLE001 - the pusher gets the reason, not a traceback
            say(f" !     Push rejected: {type(exc).__name__}: {exc}")
            await receiver.discard()
            return 1
        finally:
            receiver.close()

    return asyncio.run(guarded())
