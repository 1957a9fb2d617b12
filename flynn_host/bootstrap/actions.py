"""The built-in Layer 0 bootstrap actions: `require-env`, `resource-check` and `wait-hosts`
(registered by `flynn_host.plugins.bootstrap_actions`); `run-app` is in `runapp`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flynn_host.bootstrap.joblog import last_log_lines
from flynn_host.bootstrap.runner import Action, ClusterHost, State, StepError
from flynn_host.client import HostAPIError


def host_call(host: ClusterHost, what: str, method: str, path: str, body: Any = None) -> Any:
    """A host API call; StepError naming the host and `what` failed."""
    try:
        return host.client.request(method, path, body)
    except (HostAPIError, ConnectionError, OSError) as exc:
        raise StepError(f"host {host}: {what}: {exc}") from None


class RequireEnv(Action):
    """`{"vars": ["NAME", ...]}`: every variable must be set (and not empty)."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.vars = step.get("vars") or []
        if not isinstance(self.vars, list) or not all(isinstance(v, str) for v in self.vars):
            raise StepError("vars must be a list of variable names")

    def run(self, state: State) -> Any:
        missing = [v for v in self.vars if not os.environ.get(v)]
        if missing:
            raise StepError(f"{', '.join(missing)} must be set in the environment")
        return None


class ResourceCheck(Action):
    """`{"resources": [{"type": "port", "port": 80, "proto": "tcp"}, ...]}`: the ports must be
    free on every host (`POST /host/resource-check`)."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.ports = []
        for r in step.get("resources") or []:
            if (
                not isinstance(r, dict)
                or r.get("type") != "port"
                or not isinstance(r.get("port"), int)
            ):
                raise StepError(
                    f"unsupported resource {r!r}: expected "
                    '{"type": "port", "port": N, "proto": "tcp"|"udp"}'
                )
            self.ports.append({"port": r["port"], "proto": r.get("proto") or "tcp"})

    @staticmethod
    def held_by_bootstrap(host: Any) -> dict[tuple[int, str], str]:
        """Ports declared by the running jobs bootstrap started on `host` (by their app
        metadata): when bootstrap is rerun, their own apps hold them and are skipped."""
        held = {}
        for job in host.client.list_jobs().values():
            app = (job.get("job", {}).get("metadata") or {}).get("flynn-controller.app_name")
            if not app or job.get("status") not in ("starting", "running"):
                continue
            for p in job["job"].get("config", {}).get("ports") or []:
                held[(p.get("port"), p.get("proto") or "tcp")] = app
        return held

    def run(self, state: State) -> Any:
        problems = []
        for host in state.hosts:
            try:
                held = self.held_by_bootstrap(host)
                ports = [p for p in self.ports if (p["port"], p["proto"]) not in held]
                if len(ports) < len(self.ports):
                    apps = ", ".join(sorted(set(held.values())))
                    state.progress(f"host {host}: some ports are held by {apps} (already running)")
                host.client.request("POST", "/host/resource-check", {"ports": ports})
            except HostAPIError as exc:
                ports = (exc.body.get("detail") or {}).get("ports") or []
                if exc.code != "conflict" or not ports:
                    problems.append(f"host {host}: {exc}")
                    continue
                names = ", ".join(f"{p['port']}/{p.get('proto', 'tcp')}" for p in ports)
                problems.append(f"host {host}: ports in use: {names}")
            except (ConnectionError, OSError) as exc:
                problems.append(f"host {host}: {exc}")
        if problems:
            raise StepError("resource check failed: " + "; ".join(problems))
        return None


class WaitHosts(Action):
    """`{"timeout": SECS}` (default 60): wait until every host reports discoverd and its DNS
    (`discoverd.url`, `discoverd.dns`) and its network (`network.subnet`) in
    `GET /host/status`."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.timeout = float(step.get("timeout") or 60)

    def lacking(self, host: ClusterHost) -> list[str]:
        try:
            status = host.client.status()
        except (HostAPIError, ConnectionError, OSError) as exc:
            return [f"status ({exc})"]
        out = []
        discoverd = status.get("discoverd") or {}
        if not discoverd.get("url"):
            out.append("discoverd")
        elif not discoverd.get("dns"):
            # discoverd serves DNS on the bridge once the network exists: jobs need it
            out.append("discoverd DNS")
        if not (status.get("network") or {}).get("subnet"):
            out.append("network")
        return out

    @staticmethod
    def ended_jobs(host: ClusterHost) -> list[str]:
        """Bootstrap's jobs on `host` that have ended (the usual reason a host lacks
        something), each with how it ended and its last output."""
        try:
            jobs = host.client.list_jobs()
        except (HostAPIError, ConnectionError, OSError):
            return []
        out = []
        for jid, job in jobs.items():
            app = (job.get("job", {}).get("metadata") or {}).get("flynn-controller.app_name")
            if not app or job.get("status") not in ("crashed", "failed"):
                continue
            how = job.get("error") or f"exit status {job.get('exit_status')}"
            tail = " | ".join(last_log_lines(host, jid, 3))
            out.append(f"{app} job {jid} on {host} {job['status']}: {how}"
                       + (f"; its last output: {tail}" if tail else ""))  # fmt: skip
        return out

    def run(self, state: State) -> Any:
        deadline = time.monotonic() + self.timeout
        next_report = time.monotonic() + 5
        while True:
            missing = {str(h): m for h in state.hosts if (m := self.lacking(h))}
            if not missing:
                return None
            text = "; ".join(f"host {h} lacks {', '.join(m)}" for h, m in missing.items())
            if time.monotonic() > deadline:
                ended = [e for h in state.hosts if str(h) in missing for e in self.ended_jobs(h)]
                why = f" ({'; '.join(ended)})" if ended else ""
                raise StepError(f"timed out after {self.timeout:g}s waiting for hosts: {text}{why}")
            if time.monotonic() > next_report:
                state.progress(f"waiting: {text}")
                next_report = time.monotonic() + 5
            time.sleep(0.2)


class ImageURI(Action):
    """`{"image": "slugbuilder"}`: the `file://` URL of an image's manifest in the image
    directory (`$FLYNN_IMAGES`, default /var/lib/flynn/images), which every host has; data
    `{"uri", "id"}`. For what a component imports on the hosts itself when it needs the image
    (gitreceive runs builds from `slugbuilder`), so bootstrap does not import it everywhere."""

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        image = step.get("image")
        if not isinstance(image, str) or not image:
            raise StepError("image must name an image of the image directory")
        self.image: str = image

    def run(self, state: State) -> Any:
        from flynn_host.errors import FlynnError
        from flynn_host.runtime import images

        path = images.images_dir() / self.image / "manifest.json"
        try:
            manifest, _ = images.load_manifest(str(path), images.images_dir())
        except (OSError, ValueError, FlynnError) as exc:
            raise StepError(
                f"image {self.image!r}: {exc} (`make images` builds it into {images.images_dir()})"
            ) from None
        return {"uri": path.absolute().as_uri(), "id": images.image_id(manifest)}
