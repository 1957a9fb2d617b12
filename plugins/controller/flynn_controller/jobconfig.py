"""A host job from a release, as Flynn's `utils.JobConfig` builds it: what the scheduler starts
for a formation's process type and what `POST /apps/:app/jobs` starts for a one-off run.

The job's env is the image entrypoint's env, then the release's (unless a one-off run asks for
none), then the process type's, then the caller's, then Flynn's own `FLYNN_*` variables; `PORT`
is the first port. Its filesystem is the release artifact's image layers (`mountspecs`, which
the host resolves from the artifact's manifest URL, see `image_name`).

Apps are untrusted: what would let a job see or change its host (host network or PID
namespace, the host's bundle, capabilities, devices, writeable cgroups, seccomp off, the
`system` partition) is honoured only for system apps (`meta["flynn-system-app"] == "true"`),
the platform's own. Anything else runs in partition `user` (or `background` for builds)
where the host refuses those settings anyway.
"""

from __future__ import annotations

import re
from typing import Any

from flynn_controller.types import SYSTEM_APP_META, with_default_resources

# process type fields copied into a system app job's config as they are
SYSTEM_ONLY_FIELDS = (
    "host_network",
    "host_pid_namespace",
    "host_bundle",
    "linux_capabilities",
    "writeable_cgroups",
    "allowed_devices",
    "seccomp",
    "no_new_privileges",
    "uid",
    "gid",
)
# process type fields every app may set
CONFIG_FIELDS = ("working_dir", "disable_log", "data")
IMAGE_NAME_RE = re.compile(r"[^a-z0-9_.-]")
# the entrypoint of slug apps' images (gitreceive's releases have meta `git: "true"`)
SLUGRUNNER_INIT = "/runner/init"


def is_system_app(app: dict[str, Any]) -> bool:
    return (app.get("meta") or {}).get(SYSTEM_APP_META) == "true"


def image_name(artifact: dict[str, Any]) -> str:
    """The name a host's image store keeps an artifact's image under: its `flynn.image` meta
    (the name bootstrap imported it as) or else one derived from the artifact id."""
    name = (artifact.get("meta") or {}).get("flynn.image") or ""
    name = IMAGE_NAME_RE.sub("-", name.lower())[:64].strip("-.")
    return name or "artifact-" + str(artifact["id"])


def port_config(p: dict[str, Any], app_name: str) -> dict[str, Any]:
    """A release's port as the host wants it (`service` may be just a name)."""
    out = {"port": int(p.get("port") or 0), "proto": p.get("proto") or "tcp"}
    service = p.get("service")
    if isinstance(service, str) and service:
        out["service"] = {"name": service, "create": True}
    elif isinstance(service, dict) and service.get("name"):
        out["service"] = {"create": True, **service}
    return out


def build_job(
    *,
    job_id: str,
    app: dict[str, Any],
    release: dict[str, Any],
    process_type: str,
    image: dict[str, Any],
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: dict[str, str] | None = None,
    release_env: bool = True,
    volumes: list[dict[str, Any]] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The host job (`PUT /host/jobs/:id` body) running `process_type` of `release` (or a
    one-off command when `process_type` is "" and `cmd` is given). `image` is the host's
    record of the artifact's image: `manifest` and `mountspecs`. `volumes` are the job's
    volume mounts, already created on its host."""
    proc: dict[str, Any] = (release.get("processes") or {}).get(process_type) or {}
    system = is_system_app(app)
    manifest = image.get("manifest") or {}
    entry = (
        (manifest.get("entrypoints") or {}).get(process_type)
        or (manifest.get("entrypoints") or {}).get("_default")
        or {}
    )

    job_env: dict[str, str] = {str(k): str(v) for k, v in (entry.get("env") or {}).items()}
    if release_env:
        job_env.update({k: str(v) for k, v in (release.get("env") or {}).items()})
    job_env.update({k: str(v) for k, v in (proc.get("env") or {}).items()})
    job_env.update({k: str(v) for k, v in (env or {}).items()})
    ports = [port_config(p, app["name"]) for p in proc.get("ports") or []]
    if ports and ports[0]["port"]:
        job_env["PORT"] = str(ports[0]["port"])
    job_env.update(
        {
            "FLYNN_APP_ID": str(app["id"]),
            "FLYNN_APP_NAME": str(app["name"]),
            "FLYNN_RELEASE_ID": str(release["id"]),
            "FLYNN_PROCESS_TYPE": process_type,
            "FLYNN_JOB_ID": job_id,
        }
    )

    # args: the process type's `args`, else its `entrypoint` + `cmd`, else the image
    # entrypoint's; an explicit entrypoint and cmd (a one-off run) replace them
    args: list[str] = list(proc.get("args") or [])
    if not args and (proc.get("entrypoint") or proc.get("cmd")):
        args = list(proc.get("entrypoint") or []) + list(proc.get("cmd") or [])
    if not args:
        args = list(entry.get("args") or [])
    if cmd and not entrypoint and (release.get("meta") or {}).get("git") == "true":
        # a slug app's command runs through slugrunner (its env, as nobody), as the 2015
        # slugrunner image's Docker entrypoint made `flynn run bash` do
        entrypoint = [SLUGRUNNER_INIT]
    if entrypoint or cmd:
        args = list(entrypoint or []) + list(cmd or [])
    config: dict[str, Any] = {k: proc[k] for k in CONFIG_FIELDS if k in proc}
    if system:
        config.update({k: proc[k] for k in SYSTEM_ONLY_FIELDS if k in proc})
    if "working_dir" not in config and entry.get("cwd"):
        config["working_dir"] = entry["cwd"]
    config["args"] = args
    config["env"] = job_env
    config["ports"] = ports
    config["volumes"] = list(volumes or [])
    metadata = {
        "flynn-controller.app": str(app["id"]),
        "flynn-controller.app_name": str(app["name"]),
        "flynn-controller.release": str(release["id"]),
    }
    if process_type:
        metadata["flynn-controller.type"] = process_type
    metadata.update(extra_metadata or {})
    resources = with_default_resources(proc.get("resources"))
    partition = "system" if system else "user"
    if not system and proc.get("partition") == "background":
        partition = "background"
    return {
        "id": job_id,
        "mountspecs": list(image.get("mountspecs") or []),
        "metadata": metadata,
        "resources": resources,
        "partition": partition,
        "config": config,
    }
