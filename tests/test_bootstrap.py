"""`flynn-host bootstrap`: the manifest template, the built-in actions against real daemons on
loopback, step selection and the text and JSON output."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host.bootstrap.manifest import ManifestError, packaged_manifest, parse_manifest
from flynn_host.bootstrap.template import TemplateError, render
from flynn_host.dev import host as devhost

from .conftest import IMAGES, ROOT, needs_root

DATA = {"Singleton": False, "SortedHostIPs": ["10.0.0.2", "10.0.0.1"]}


# --- template and manifest ---------------------------------------------------------------------


def test_template_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYNN_TEST_DOMAIN", "example.com")
    src = (
        "{{ range $ip := .SortedHostIPs }}{{ $ip }}:1111,{{ end }}|"
        "{{ range $i, $ip := .SortedHostIPs }}{{ if $i }},{{ end }}{{ $ip }}{{ end }}|"
        '{{ getenv "FLYNN_TEST_DOMAIN" }}|{{ getenv \\"FLYNN_TEST_NONE\\" }}|'
        "{{ .Singleton }}|{{ if .Singleton }}one{{ else }}many{{ end }}|"
        'a {{- " " }}'
    )
    with pytest.raises(TemplateError, match=r'unsupported template construct \{\{ " " \}\}'):
        render(src, DATA)
    out = render(src.replace('{{- " " }}', "{{- .Singleton }}"), DATA)
    assert out == ("10.0.0.2:1111,10.0.0.1:1111,|10.0.0.2,10.0.0.1|example.com||false|many|afalse")


@pytest.mark.parametrize(
    "src, message",
    [
        ('{{ printf "%s" .X }}', "unsupported template construct"),
        ("{{ .StepData }}", r"unknown field \.StepData"),
        ("{{ range .SortedHostIPs }}", r"missing \{\{ end \}\}"),
        ("{{ end }}", r"unexpected \{\{ end \}\}"),
        ("{{ $nope }}", r"undefined variable \$nope"),
        ("{{ range .Singleton }}{{ end }}", "not a list"),
    ],
)
def test_template_errors(src: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render(src, DATA)


def test_manifest_errors() -> None:
    with pytest.raises(ManifestError, match="line 2, column 1"):
        parse_manifest('[{"id": "a", "action": "x"},\n]', "m.json", DATA)
    with pytest.raises(ManifestError, match="step 0 has no 'action'"):
        parse_manifest('[{"id": "a"}]', "m.json", DATA)
    with pytest.raises(ManifestError, match="duplicate step id 'a'"):
        parse_manifest('[{"id": "a", "action": "x"}, {"id": "a", "action": "x"}]', "m", DATA)
    with pytest.raises(ManifestError, match="template error: line 1"):
        parse_manifest("[{{ .Nope }}]", "m.json", DATA)


def test_packaged_manifest_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLANNEL_BACKEND", "vxlan")
    monkeypatch.setenv("CLUSTER_DOMAIN", "example.test")
    steps = parse_manifest(packaged_manifest().read_text(), "packaged", DATA)
    assert [s["action"] for s in steps] == [
        "require-env",
        "resource-check",
        "run-app",
        "run-app",
        "wait-hosts",
        "gen-random",
        "gen-random",
        "run-app",
        "wait",
        # the controller (Flynn's steps 8-19), then the closing line
        "gen-random",
        "gen-random",
        "gen-random",
        "gen-tls-cert",
        "run-app",
        "wait",
        "add-app",
        "add-app",
        "add-app",
        "add-app",
        "add-provider",
        # the hand-over to the scheduler, and its wait
        "scheduler",
        "wait",
        # then Flynn's steps 35-57: the blobstore, the router, gitreceive (its images' URLs
        # first), the router's wait, the routes to git and the controller, the log aggregator,
        # the waits, and the status check of everything
        "deploy-app",
        "deploy-app",
        "image-uri",
        "image-uri",
        "deploy-app",
        "wait",
        "add-route",
        "add-route",
        "wait",
        "deploy-app",
        "wait",
        "wait",
        "wait",
        "wait",
        "status-check",
        "log",
    ]
    discoverd = steps[2]["release"]
    assert discoverd["env"]["DISCOVERD_PEERS"] == "10.0.0.2:1111,10.0.0.1:1111"
    assert steps[3]["release"]["env"]["BACKEND"] == "vxlan"
    # the postgres appliance: three nodes in strict mode (one, available, in a singleton),
    # its passwords from the gen-random steps, filled in only when the step runs
    postgres = steps[7]
    assert postgres["processes"] == {"postgres": 3, "web": 2}
    env = postgres["release"]["env"]
    assert env["POSTGRES_MODE"] == "strict" and env["PGHOST"] == "leader.postgres.discoverd"
    assert env["POSTGRES_SUPERUSER_PASSWORD"] == '{{ (index .StepData "pg-password").Data }}'
    single = parse_manifest(
        packaged_manifest().read_text(), "packaged", {**DATA, "Singleton": True}
    )
    assert single[7]["release"]["env"]["POSTGRES_MODE"] == "available"
    assert steps[8]["url"] == "http://postgres-api.discoverd/ping"
    by_id = {s["id"]: s for s in steps}
    controller = by_id["controller"]
    assert controller["resources"] == [
        {"name": "postgres", "url": "http://postgres-api.discoverd/databases"}
    ]
    assert (
        controller["release"]["env"]["CA_CERT"]
        == '{{ (index .StepData "controller-cert").CACert }}'
    )
    assert controller["release"]["processes"]["web"]["args"][-2:] == ["component", "controller"]
    assert by_id["controller-wait"]["status"] == 401
    added = ("controller-inception", "postgres-app", "flannel-app", "discoverd-app")
    assert [by_id[i]["from_step"] for i in added] == [
        "controller",
        "postgres",
        "flannel",
        "discoverd",
    ]
    assert "flynn cluster add -p {{" in by_id["log-complete"]["output"]
    # the scheduler takes over after every app was handed to the controller
    assert by_id["scheduler"]["processes"] == {"web": 2, "scheduler": 1, "worker": 2}
    assert set(by_id["scheduler"]["processes"]) <= set(controller["release"]["processes"])
    assert controller["release"]["processes"]["scheduler"]["omni"] is True
    blobstore = by_id["blobstore"]
    assert blobstore["resources"] == [{"name": "postgres"}]
    assert blobstore["processes"] == {"web": 2}
    web = blobstore["release"]["processes"]["web"]
    assert web["args"][1:] == ["component", "blobstore"] and web["partition"] == "system"
    # it registers itself in discoverd (a system-partition job): no service on the port
    assert web["ports"] == [{"port": 80, "proto": "tcp"}]
    assert by_id["blobstore-wait"]["url"] == "http://blobstore.discoverd/.well-known/status"
    router = by_id["router"]
    proc = router["release"]["processes"]["app"]
    assert proc["omni"] and proc["host_network"] and proc["args"][1:3] == ["component", "router"]
    assert router["release"]["env"]["TLSCERT"] == '{{ (index .StepData "controller-cert").Cert }}'
    assert by_id["router-sticky-key"]["encoding"] == "base64"
    assert by_id["controller-route"]["route"]["domain"] == "controller.example.test"
    assert by_id["controller-route-wait"]["host"] == "controller.example.test"
    assert by_id["controller-route-wait"]["status"] == 401
    gitreceive = by_id["gitreceive"]
    assert gitreceive["processes"] == {"app": 2}
    assert gitreceive["resources"] == [{"name": "postgres"}]
    git_env = gitreceive["release"]["env"]
    assert git_env["SLUGBUILDER_IMAGE_URI"] == '{{ (index .StepData "slugbuilder-image").URI }}'
    assert by_id["slugrunner-image"] == {
        "id": "slugrunner-image",
        "action": "image-uri",
        "image": "slugrunner",
    }
    assert by_id["gitreceive-route"]["route"]["domain"] == "git.example.test"
    assert by_id["gitreceive-route"]["cert_step"] == "controller-cert"


# --- against real daemons ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[devhost.Daemon]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts, runc)")
    made: list[devhost.Daemon] = []
    key = secrets.token_hex(32)  # a cluster's hosts share one host key
    try:
        for _ in range(2):
            d = devhost.make_daemon(key=key)
            made.append(d)
            d.client.request(
                "POST", "/host/images", {"manifest_url": str(IMAGES / "busybox" / "manifest.json")}
            )
        yield made
    finally:
        for d in made:
            d.cleanup()


def bootstrap(
    tmp_path: Path,
    hosts: list[devhost.Daemon],
    steps: list[dict[str, Any]],
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(steps))
    peers = ",".join(f"127.0.0.1:{d.port}" for d in hosts)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "flynn_host.cli.main",
            "bootstrap",
            "--peer-ips",
            peers,
            "--timeout",
            "10",
            "--job-timeout",
            "15",
            *args,
            str(manifest),
        ],
        env={**os.environ, "FLYNN_HOST_KEY": hosts[0].key or "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def app_jobs(d: devhost.Daemon, name: str) -> dict[str, Any]:
    return {
        jid: j
        for jid, j in d.client.list_jobs(active=True).items()
        if j["job"]["metadata"].get("flynn-controller.app_name") == name
    }


def sleeper(name: str, **proc: Any) -> dict[str, Any]:
    return {
        "id": name,
        "action": "run-app",
        "app": {"name": name},
        "artifact": {"image": "busybox"},
        "release": {
            "env": {"A": "release", "B": "release"},
            "processes": {"app": {"args": ["sleep", "1000"], "env": {"B": "proc"}, **proc}},
        },
        "processes": {"app": 1},
    }


@needs_root
def test_require_env_names_missing_variable(tmp_path: Path, hosts: list[devhost.Daemon]) -> None:
    out = bootstrap(
        tmp_path,
        hosts[:1],
        [{"id": "check-env", "action": "require-env", "vars": ["FLYNN_TEST_UNSET_VAR"]}],
    )
    assert out.returncode == 1
    assert "require-env check-env error: FLYNN_TEST_UNSET_VAR must be set" in out.stderr
    ok = bootstrap(
        tmp_path,
        hosts[:1],
        [{"id": "check-env", "action": "require-env", "vars": ["FLYNN_TEST_SET_VAR"]}],
        env={"FLYNN_TEST_SET_VAR": "x"},
    )
    assert ok.returncode == 0, ok.stderr
    assert "require-env check-env done" in ok.stderr


@needs_root
def test_resource_check_conflict_names_host_and_port(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        free = devhost.free_port()
        out = bootstrap(
            tmp_path,
            hosts,
            [
                {
                    "id": "ports",
                    "action": "resource-check",
                    "resources": [{"type": "port", "port": port}, {"type": "port", "port": free}],
                }
            ],
        )
    assert out.returncode == 1
    for d in hosts:
        assert f"host {d.host_id} (127.0.0.1:{d.port}): ports in use: {port}/tcp" in out.stderr
    assert f"{free}/" not in out.stderr


@needs_root
def test_run_app_omni_metadata_and_rerun(tmp_path: Path, hosts: list[devhost.Daemon]) -> None:
    steps = [
        {"id": "check-env", "action": "require-env", "vars": ["FLYNN_TEST_UNSET_VAR"]},
        sleeper("omni-app", omni=True, volumes=[{"path": "/data"}]),
        sleeper("spread-app"),
    ]
    steps[2]["processes"] = {"app": 3}
    out = bootstrap(tmp_path, hosts, steps, "--json", "--steps", "omni-app,spread-app")
    assert out.returncode == 0, out.stdout + out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]  # one JSON object per line
    assert [(e["id"], e["state"]) for e in events] == [
        ("online-hosts", "start"),
        ("online-hosts", "done"),
        ("omni-app", "start"),
        ("omni-app", "done"),
        ("spread-app", "start"),
        ("spread-app", "done"),
    ]
    assert all(set(e) <= {"id", "action", "data", "state", "error", "ts"} for e in events)
    data = events[3]["data"]
    for d in hosts:
        jobs = app_jobs(d, "omni-app")
        assert list(jobs) == data["jobs"][d.host_id]
        ((jid, job),) = jobs.items()
        assert jid.startswith(f"{d.host_id}-") and job["status"] == "running"
        assert job["job"]["metadata"] == {
            "flynn-controller.app": data["app"]["id"],
            "flynn-controller.app_name": "omni-app",
            "flynn-controller.release": data["release"]["id"],
            "flynn-controller.type": "app",
        }
        config = job["job"]["config"]
        assert config["env"]["A"] == "release" and config["env"]["B"] == "proc"
        assert config["env"]["FLYNN_JOB_ID"] == jid
        (vol,) = config["volumes"]
        assert vol["target"] == "/data" and d.client.request(
            "GET", f"/storage/volumes/{vol['volume']}"
        )
    # three non-omni jobs spread over two hosts: 2 + 1
    assert sorted(len(app_jobs(d, "spread-app")) for d in hosts) == [1, 2]

    # a rerun starts nothing new; a host that lost its job gets it back
    lost = next(iter(app_jobs(hosts[1], "omni-app")))
    hosts[1].client.stop_job(lost)
    hosts[1].wait_job(lost)
    again = bootstrap(tmp_path, hosts, steps, "--json", "--steps", "omni-app,spread-app")
    assert again.returncode == 0, again.stdout + again.stderr
    events = [json.loads(line) for line in again.stdout.splitlines()]
    started = {
        e["id"]: e["data"]["started"]
        for e in events
        if e["state"] == "done" and e["id"] != "online-hosts"
    }
    assert started["spread-app"] == []
    (new,) = started["omni-app"]
    assert new.startswith(f"{hosts[1].host_id}-")
    assert events[3]["data"]["app"]["id"] == data["app"]["id"]  # the same app, found again
    for d in hosts:
        for jid in list(app_jobs(d, "omni-app")) + list(app_jobs(d, "spread-app")):
            d.client.stop_job(jid)


@needs_root
def test_generated_secret_reaches_the_job_but_never_the_output(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    """A gen-random value reaches the job's env and no output; a rerun, whose gen-random makes
    a new value, starts a lost job with the env of the release still running."""
    app = sleeper("secret-app")
    app["release"]["env"]["PASSWORD"] = '{{ (index .StepData "pw").Data }}'
    app["processes"] = {"app": 2}
    steps = [{"id": "pw", "action": "gen-random", "length": 20}, app]

    def passwords() -> dict[str, str]:
        return {
            jid: job["job"]["config"]["env"]["PASSWORD"]
            for d in hosts
            for jid, job in app_jobs(d, "secret-app").items()
        }

    out = bootstrap(tmp_path, hosts, steps, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    (password,) = set(passwords().values())
    assert len(password) == 40 and int(password, 16) >= 0
    assert password not in out.stdout + out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    done = {e["id"]: e.get("data") for e in events if e["state"] == "done"}
    assert done["pw"] == {"data": "(secret)"}
    assert done["secret-app"]["release"]["env"]["PASSWORD"] == "(secret)"

    lost = next(iter(app_jobs(hosts[1], "secret-app")))
    hosts[1].client.stop_job(lost)
    hosts[1].wait_job(lost)
    again = bootstrap(tmp_path, hosts, steps)  # text output
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(secret)" not in again.stderr  # text output shows no step data at all
    now = passwords()
    assert len(now) == 2 and lost not in now and set(now.values()) == {password}
    for d in hosts:
        for j in app_jobs(d, "secret-app"):
            d.client.stop_job(j)
            d.wait_job(j)


@needs_root
def test_failing_job_fails_the_step_naming_the_host(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    step = sleeper("broken")
    step["release"]["processes"]["app"]["args"] = ["/no/such/program"]
    out = bootstrap(tmp_path, hosts[:1], [step])
    assert out.returncode == 1
    line = next(ln for ln in out.stderr.splitlines() if "error:" in ln)
    assert (
        f"run-app broken error: host {hosts[0].host_id} (127.0.0.1:{hosts[0].port}): job "
        f"{hosts[0].host_id}-" in line
    )
    assert "failed" in line or "crashed" in line


@needs_root
def test_an_image_missing_on_a_host_says_how_to_import_it(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    step = sleeper("noimage")
    step["artifact"] = {"image": "nosuchimage"}
    out = bootstrap(tmp_path, hosts[:1], [step])
    assert out.returncode == 1
    assert (
        f"run-app noimage error: host {hosts[0].host_id} (127.0.0.1:{hosts[0].port}) has no "
        "image 'nosuchimage': import it there first, e.g. `flynn-host image import "
        "/var/lib/flynn/images/nosuchimage/manifest.json --name=nosuchimage`"
    ) in out.stderr
    assert app_jobs(hosts[0], "noimage") == {}


@needs_root
def test_wait_hosts_timeout_lists_what_is_missing(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    out = bootstrap(tmp_path, hosts, [{"id": "wait-hosts", "action": "wait-hosts", "timeout": 0.5}])
    assert out.returncode == 1
    for d in hosts:
        assert f"host {d.host_id} (127.0.0.1:{d.port}) lacks discoverd, network" in out.stderr


@needs_root
def test_wait_hosts_timeout_names_bootstrap_jobs_that_ended(
    tmp_path: Path, hosts: list[devhost.Daemon]
) -> None:
    step = sleeper("dies")
    # it outlives run-app's 1 s "kept running" check, then ends before wait-hosts gives up
    step["release"]["processes"]["app"]["args"] = ["sh", "-c", "echo going down; sleep 2; exit 7"]
    wait = {"id": "wait-hosts", "action": "wait-hosts", "timeout": 3}
    out = bootstrap(tmp_path, hosts[:1], [step, wait])
    assert out.returncode == 1
    line = next(ln for ln in out.stderr.splitlines() if "wait-hosts error:" in ln)
    assert f"dies job {hosts[0].host_id}-" in line
    assert "crashed: exit status 7; its last output: going down" in line


def test_unreachable_hosts_and_unsupported_flags(tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text("[]")
    closed = devhost.free_port()
    cmd = [sys.executable, "-m", "flynn_host.cli.main", "bootstrap"]
    out = subprocess.run(
        [*cmd, "--peer-ips", f"127.0.0.1:{closed}", "-t", "0.5", str(manifest)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 1
    assert "check online-hosts error: timed out waiting for 1 hosts" in out.stderr
    assert f"127.0.0.1:{closed}" in out.stderr
    out = subprocess.run(
        [*cmd, "--from-backup", "x.tar", str(manifest)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert out.returncode == 1 and "not supported yet" in out.stderr
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.stdout.startswith("usage: flynn-host bootstrap [options] [<manifest>]")


def test_hosts_from_a_discovery_token() -> None:
    import http.server
    import threading

    from flynn_host.cli.bootstrap import discovery_addrs

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = {"data": [{"url": "http://10.0.0.1:1113"}, {"url": "http://10.0.0.2:1113/"}]}
            raw = json.dumps(body if self.path == "/clusters/abc/instances" else {}).encode()
            self.send_response(200 if self.path == "/clusters/abc/instances" else 404)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert discovery_addrs(f"{base}/clusters/abc") == ["10.0.0.1:1113", "10.0.0.2:1113"]
        with pytest.raises(ValueError, match="cannot get the cluster's hosts from"):
            discovery_addrs(f"{base}/clusters/nope")
    finally:
        server.shutdown()
        server.server_close()


def test_image_uri_names_an_image_of_the_image_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flynn_host.bootstrap.actions import ImageURI
    from flynn_host.bootstrap.runner import StepError
    from flynn_host.runtime import images

    manifest = {
        "_type": images.MANIFEST_TYPE,
        "entrypoints": {"_default": {"args": ["/bin/sh"]}},
        "rootfs": [],
    }
    (tmp_path / "slugbuilder").mkdir()
    (tmp_path / "slugbuilder" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("FLYNN_IMAGES", str(tmp_path))
    data = ImageURI({"id": "x", "action": "image-uri", "image": "slugbuilder"}).run(None)  # type: ignore[arg-type]
    assert data == {
        "uri": f"file://{tmp_path}/slugbuilder/manifest.json",
        "id": images.image_id(manifest),
    }
    with pytest.raises(StepError, match="make images"):
        ImageURI({"id": "x", "action": "image-uri", "image": "nope"}).run(None)  # type: ignore[arg-type]
    with pytest.raises(StepError, match="image must name"):
        ImageURI({"id": "x", "action": "image-uri"})
