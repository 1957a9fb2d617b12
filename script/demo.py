"""`make demo`: the most complete use of flynn-host so far, as a transcript.

Starts a real daemon (its own port and directories under /tmp), then uses it the way an
operator would: a job submitted as Flynn's job JSON, `flynn-host run` with output and exit
status, a crash, an out-of-memory kill, a long-running job listed by `ps`, inspected, its log
read and stopped, a data volume shared by two jobs, and the plugin list. Everything is
removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request

from flynn_host import devhost, images

BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def say(text: str) -> None:
    print(f"\n{BOLD}# {text}{RESET}", flush=True)


def sh(d: devhost.Daemon, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print(f"{DIM}${RESET} flynn-host {shlex.join(args)}", flush=True)
    out = d.run_cli(*args)
    sys.stdout.write(out.stderr)  # progress lines come first
    sys.stdout.write(out.stdout)
    if out.returncode:
        print(f"{DIM}(exit status {out.returncode}){RESET}")
    if check and out.returncode not in (0, 3):
        raise SystemExit(f"demo step failed: flynn-host {shlex.join(args)}")
    return out


def main() -> int:
    images.build_busybox_image(devhost.IMAGES)
    for name in ("base", "components", "stack"):
        if not (devhost.IMAGES / name / "manifest.json").exists():
            raise SystemExit(f"image {name} is missing in {devhost.IMAGES}: run `make images`")
    d = devhost.make_daemon(host_id="demo")
    try:
        say(f"a flynn-host daemon is running: {d.url}, state under {d.base}")
        print(json.dumps(d.client.status(), indent=2)[:600], "...")

        say("submit Flynn's job JSON with curl, then read its log")
        job_id = d.new_job_id()
        job = devhost.busybox_job(
            job_id, ["sh", "-c", "echo hello from $HOSTNAME; uname -s; echo to stderr >&2"]
        )
        req = urllib.request.Request(
            f"{d.url}/host/jobs/{job_id}", data=json.dumps(job).encode(), method="PUT",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        print(f"PUT /host/jobs/{job_id} -> {urllib.request.urlopen(req).read().decode()}")
        final = d.wait_job(job_id)
        print(f"status={final['status']} exit_status={final['exit_status']}")
        sh(d, "log", job_id)

        say("flynn-host run: output streams back and the exit status is the job's")
        sh(d, "run", "busybox", "sh", "-c", "echo the answer is $((6 * 7)); exit 3")

        say("an out-of-memory kill under a 32 MB limit")
        oom = d.new_job_id()
        d.client.add_job(
            devhost.busybox_job(
                oom, ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"],
                resources={"memory": {"limit": 32 * 1024 * 1024}},
            )
        )  # fmt: skip
        final = d.wait_job(oom)
        print(f"status={final['status']} error={final['error']!r}")

        say("a long-running job: ps, inspect, log, stop")
        web = d.new_job_id()
        job = devhost.busybox_job(
            web, ["sh", "-c", "echo listening on $PORT; while true; do sleep 1; done"],
            ports=[{"port": 0, "proto": "tcp"}],
        )  # fmt: skip
        job["metadata"] = {"flynn-controller.app_name": "example", "flynn-controller.type": "web"}
        d.client.add_job(job)
        d.wait_job(web, ("running",))
        time.sleep(0.3)
        sh(d, "ps")
        sh(d, "inspect", "--omit-env", web)
        sh(d, "log", web)
        sh(d, "stop", web)
        d.wait_job(web)
        sh(d, "ps", "-a")

        say("a data volume outlives the job that wrote it")
        vol = d.client.request("POST", "/storage/providers/default/volumes", {})
        mount = [{"target": "/data", "volume": vol["id"], "writeable": True}]
        for args in (["sh", "-c", "date > /data/written-at"], ["cat", "/data/written-at"]):
            jid = d.new_job_id()
            d.client.add_job(devhost.busybox_job(jid, args, volumes=mount))
            d.wait_job(jid)
        sh(d, "log", jid)

        say("images from Debian packages: import them into the host, run their tools")
        for name in ("base", "components", "stack"):
            sh(d, "image", "import", str(devhost.IMAGES / name / "manifest.json"))
        sh(d, "image", "list")
        sh(d, "run", "base", "--", "sh", "-c", ". /etc/os-release; echo $PRETTY_NAME")
        sh(d, "run", "components", "--", "etcd", "--version")
        sh(d, "run", "stack", "--", "sh", "-c", "node --version; go version; python3 --version")

        say("a platform component as a job: the host's own code, mounted at /.flynn-host")
        port = devhost.free_port()
        comp = d.new_job_id()
        job = {
            "id": comp,
            "mountspecs": d.client.request("GET", "/host/images/components")["mountspecs"],
            "config": {
                "args": ["/.flynn-host/flynn-host", "component", "ping", "--port", str(port)],
                "host_bundle": True,
                "host_network": True,
            },
        }
        d.client.add_job(job)
        d.wait_job(comp, ("running",))
        url = f"http://127.0.0.1:{port}/.well-known/status"
        for _ in range(100):
            try:
                print(f"GET {url} -> {urllib.request.urlopen(url).read().decode()}")
                break
            except OSError:
                time.sleep(0.1)
        sh(d, "stop", comp)

        say("the plugins this daemon loaded")
        sh(d, "plugins")
    finally:
        say("stopping the daemon and removing everything it made")
        d.cleanup()
        leftovers = devhost.mounts_under(d.base)
        print("nothing left behind" if not leftovers else f"LEFT: {leftovers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
