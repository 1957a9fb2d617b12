"""`make demo`: the most complete use of flynn-host so far, as a transcript.

Starts a real daemon (its own port and directories under /tmp), then uses it the way an
operator would: a job submitted as Flynn's job JSON, `flynn-host run` with output and exit
status, a crash, an out-of-memory kill, a long-running job listed by `ps`, inspected, its log
read and stopped, a data volume shared by two jobs, the Debian images imported and run, a
platform component served from the host's own code, discoverd as a job (etcd, its API and
DNS, the host registering itself), and the plugin list. Then three hosts in network
namespaces booted with `flynn-host bootstrap` (discoverd and flannel on each), and a job on
host 1 reaching a job on host 3 over the overlay by `<service>.discoverd`; the PostgreSQL
appliance bootstrap started (three nodes, discoverd's leader on the primary), a database for
an app from its provider API and the app's psql; and the controller bootstrap started, driven
with the `flynn` CLI as a developer would (an app from the busybox image scaled to three jobs
spread over the hosts by the scheduler, `ps`, a job killed and replaced, a deploy by `env
set`, a one-off `run`, a postgres resource used with `pg psql`, the app reached through the
router over HTTP and HTTPS, routes added live, deletion). The CLI runs on this machine and
reaches `https://controller.<domain>` through the router, pinned as bootstrap printed. Everything
is removed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

from flynn_discoverd.service import CLIENT_PORT_OFFSET, PEER_PORT_OFFSET

from flynn_host.dev import host as devhost
from flynn_host.dev.busybox import build_busybox_image
from flynn_host.dev.cluster import Cluster, leftovers

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


def put(url: str, body: object) -> str:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    return urllib.request.urlopen(req).read().decode()


def main() -> int:
    build_busybox_image(devhost.IMAGES)
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
            headers={"Content-Type": "application/json", **d.auth_headers},
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
            "partition": "system",  # a platform component: it may use the host network
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

        say("discoverd as a job: etcd + Flynn's discoverd API and DNS; the host registers in it")
        # a free API port whose etcd ports (API port + 1268 and + 1269) are free too
        (api,) = devhost.free_ports(1, offsets=(CLIENT_PORT_OFFSET, PEER_PORT_OFFSET))
        dns = devhost.free_port()
        vol = d.client.request("POST", "/storage/providers/default/volumes", {})
        node = d.new_job_id()
        d.client.add_job(
            {
                "id": node,
                "partition": "system",
                "mountspecs": d.client.request("GET", "/host/images/components")["mountspecs"],
                "config": {
                    "args": ["/.flynn-host/flynn-host", "component", "discoverd",
                             "--data-dir", "/data", "--host", "127.0.0.1",
                             "--addr", f"127.0.0.1:{api}", "--dns-addr", f"127.0.0.1:{dns}",
                             "--recursors", "", "--notify", f"{d.url}/host/discoverd"],
                    "host_bundle": True,
                    "host_network": True,
                    "volumes": [{"target": "/data", "volume": vol["id"], "delete_on_stop": True}],
                },
                "resources": {"temp_disk": {"limit": 256 * 1024 * 1024}},
            }
        )  # fmt: skip
        base = f"http://127.0.0.1:{api}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/ping").read()
                break
            except OSError:
                time.sleep(0.1)
        put(f"{base}/services/web", {})
        for addr in ("10.1.2.3:8080", "10.1.2.4:8080"):
            iid = hashlib.md5(f"tcp-{addr}".encode()).hexdigest()
            print(f"PUT /services/web/instances/{iid[:12]}... -> "
                  f"{put(f'{base}/services/web/instances/{iid}', {'addr': addr})}")  # fmt: skip
        for name in ("web.discoverd", "leader.web.discoverd"):
            out = subprocess.run(["dig", "+short", "@127.0.0.1", "-p", str(dns), name],
                                 capture_output=True, text=True).stdout.split()  # fmt: skip
            print(f"dig {name} -> {' '.join(out)}")
        for _ in range(100):  # the host registers itself once discoverd reported in
            if len(d.run_cli("list").stdout.splitlines()) > 1:
                break
            time.sleep(0.1)
        sh(d, "list")
        sh(d, "discover", "web")
        sh(d, "stop", node)
        d.wait_job(node)

        say("the plugins this daemon loaded")
        sh(d, "plugins")
    finally:
        say("stopping the daemon and removing everything it made")
        d.cleanup()
        leftovers = devhost.mounts_under(d.base)
        print("nothing left behind" if not leftovers else f"LEFT: {leftovers}")
    cluster_demo()
    return 0


def cluster_demo() -> None:
    """Three hosts in network namespaces, booted with `flynn-host bootstrap`; a job on host 1
    reaches a job on host 3 over the overlay by `<service>.discoverd`."""
    say("three hosts on this machine (script/cluster up -n 3): init, daemons, bootstrap")
    with Cluster(name="demo", say=lambda m: print(f"{DIM}{m}{RESET}", flush=True)) as c:
        c.up(3, host_id_prefix="demoh")
        for i in (1, 2, 3):
            net = c.client(i).status()["network"]
            print(f"{c.host(i).id} at {c.host(i).ip}: jobs get {net['subnet']} (mtu {net['mtu']})")

        say("a web job on host 3, registered in discoverd as service `web`")
        web_id = f"{c.host(3).id}-{uuid.uuid4().hex}"
        page = "mkdir /www && echo hello from $EXTERNAL_IP on $HOSTNAME > /www/index.html"
        c.client(3).add_job(
            devhost.busybox_job(web_id, ["sh", "-c", f"{page} && exec httpd -f -p 8080 -h /www"])
        )
        for _ in range(100):
            web = c.client(3).get_job(web_id)
            if web["status"] == "running":
                break
            time.sleep(0.1)
        print(f"job {web_id} running at {web['internal_ip']}")
        api = f"http://{c.host(2).ip}:1111"
        addr = f"{web['internal_ip']}:8080"
        put(f"{api}/services/web", {})
        iid = hashlib.md5(f"tcp-{addr}".encode()).hexdigest()
        put(f"{api}/services/web/instances/{iid}", {"addr": addr})

        say("from a job on host 1: DNS at its bridge, then HTTP over the overlay by name")
        script = (
            "cat /etc/resolv.conf; echo EXTERNAL_IP=$EXTERNAL_IP; nslookup web.discoverd; "
            "wget -q -O- http://web.discoverd:8080/"
        )
        argv = ["flynn-host", "run", "busybox", "--", "sh", "-c", script]
        print(f"{DIM}$ script/cluster exec {c.host(1).id} {shlex.join(argv)}{RESET}", flush=True)
        out = c.exec(1, argv, capture_output=True, text=True, timeout=60)
        sys.stdout.write(out.stdout + out.stderr)

        postgres_demo(c)
        controller_demo(c)

        say("script/cluster down: every namespace, bridge, vxlan device, rule, mount, process")
    left = leftovers(c)
    print("nothing left behind" if not left else f"LEFT: {left}")


def postgres_demo(c: Cluster) -> None:
    """The PostgreSQL appliance bootstrap started: its nodes, a database for an app from the
    provider API, and the app's psql through leader.postgres.discoverd."""
    from flynn_host.dev import postgres as pg

    say("the PostgreSQL appliance: three nodes on three hosts; discoverd's leader is the primary")
    pg.wait_for(lambda: pg.healthy(c), 60)
    members = pg.patroni(c, pg.primary(c), "/cluster")["members"]
    for m in sorted(members, key=lambda m: m["name"]):
        print(f"{m['name']}  {m['host']}:{m['port']}  {m['role']}  {m['state']}")
    print(f"leader.postgres.discoverd -> {pg.leader_addr(c)}")

    say("a database for an app: POST http://postgres-api.discoverd/databases (from a job)")
    status, body = pg.api_request(c, 1, "POST", "/databases")
    shown = {
        k: ("..." if k in ("PGPASSWORD", "DATABASE_URL") else v) for k, v in body["env"].items()
    }
    print(f"{status} id={body['id']} env={json.dumps(shown)}")

    say("the app's psql (a job on host 2 with only that env): a table, hstore and PostGIS")
    script = (
        "psql -v ON_ERROR_STOP=1 -c 'CREATE TABLE notes (id serial, body text)' "
        "-c \"INSERT INTO notes (body) VALUES ('written through leader.postgres.discoverd')\" "
        "-c 'SELECT * FROM notes' -c 'CREATE EXTENSION hstore' -c 'CREATE EXTENSION postgis' "
        "-c 'SELECT postgis_version()'"
    )
    status, out = pg.run_job(c, 2, script, {k: str(v) for k, v in body["env"].items()})
    sys.stdout.write(out)
    status, _ = pg.api_request(c, 1, "DELETE", f"/databases?id={body['id']}")
    print(f"DELETE /databases?id={body['id']}: {status}")


def controller_demo(c: Cluster) -> None:
    """The controller bootstrap started, used with the `flynn` CLI from this machine as a
    developer would: through the router at https://controller.<domain> (which `script/cluster
    up` put in /etc/hosts), checked against the pin bootstrap printed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flynn-demo-home-") as home:
        _flynn_cli_demo(c, home)


def _system_env(c: Cluster, app: str) -> dict[str, str]:
    for i in range(1, len(c.hosts) + 1):
        for job in c.client(i).list_jobs(active=True).values():
            if (job["job"].get("metadata") or {}).get("flynn-controller.app_name") == app:
                return dict(job["job"]["config"]["env"])
    raise RuntimeError(f"no job of {app} in the cluster")


def _pin(cert_pem: str) -> str:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(Encoding.DER)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def curl(*args: str) -> str:
    print(f"{DIM}${RESET} curl {shlex.join(args)}", flush=True)
    out = subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                         text=True)  # fmt: skip
    sys.stdout.write(out.stdout + out.stderr)
    return out.stdout


def _flynn_cli_demo(c: Cluster, home: str) -> None:
    env = {**os.environ, "HOME": home, "FLYNNRC": f"{home}/.flynnrc"}
    flynn = str(devhost.ROOT / ".venv" / "bin" / "flynn")
    router = _system_env(c, "router")
    pin, key, domain, ip = _pin(router["TLSCERT"]), router["CONTROLLER_KEY"], c.domain, c.ips()[0]

    def run(*args: str, show: str | None = None) -> str:
        print(f"{DIM}${RESET} {show or 'flynn ' + shlex.join(args)}", flush=True)
        out = subprocess.run([flynn, *args], env=env, capture_output=True, text=True,
                             timeout=120, cwd=home)  # fmt: skip
        sys.stdout.write(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"flynn {args[0]} failed (exit {out.returncode})")
        return out.stdout + out.stderr

    say("the controller through the router: the line bootstrap printed, pasted on this machine")
    print(f"{DIM}# /etc/hosts (script/cluster up): controller.{domain} -> {ip}{RESET}")
    run("cluster", "add", "-p", pin, "default", domain, key,
        show=f"flynn cluster add -p {pin} default {domain} {key[:8]}...")  # fmt: skip
    run("apps")
    run("provider")

    say("an app: create, a release of the busybox image with a web process, env, meta, limits")
    run("create", "hello")
    run("-a", "hello", "info")
    release = f"{home}/release.json"
    web = 'echo "$GREETING from $FLYNN_JOB_ID" > /tmp/index.html; exec httpd -f -p 8080 -h /tmp'
    with open(release, "w") as f:
        json.dump({"env": {"GREETING": "Hello"},
                   "processes": {"web": {"cmd": ["sh", "-c", web], "ports": [
                       {"port": 8080, "proto": "tcp",
                        "service": {"name": "hello-web", "create": True}}]}}}, f)  # fmt: skip
    run("-a", "hello", "release", "add", "-t", "flynn", "-f", release,
        "file:///var/lib/flynn/images/busybox/manifest.json")  # fmt: skip
    run("-a", "hello", "meta", "set", "owner=demo")
    run("-a", "hello", "limit", "set", "web", "memory=64MB", "max_fd=2048")
    run("-a", "hello", "limit")

    say("the scheduler runs it: flynn scale web=3 waits for the 3 jobs, spread over the hosts")
    run("-a", "hello", "scale", "web=3")
    ps = run("-a", "hello", "ps")
    # a job is an instance of hello-web once its port answers
    _wait(lambda: len(_web_answers(c, "hello-web")) == 3, "3 instances of hello-web")
    print(f"{DIM}# each job, found through discoverd (service hello-web):{RESET}", flush=True)
    for addr, text in _web_answers(c, "hello-web"):
        print(f"  {addr}  {text}", flush=True)
    killed = ps.splitlines()[1].split()[0]
    run("-a", "hello", "kill", killed)
    _wait(
        lambda: (
            len(a := _web_answers(c, "hello-web")) == 3 and not any(killed in text for _, text in a)
        ),
        "a replacement for the killed job",
    )
    run("-a", "hello", "ps")

    say("a deploy: flynn env set makes a release, the deployer replaces the jobs")
    run("-a", "hello", "env", "set", "GREETING=Bonjour", "LANG=C.UTF-8")
    run("-a", "hello", "ps")
    _wait(lambda: all("Bonjour" in t for _, t in _web_answers(c, "hello-web")), "new jobs")
    for addr, text in _web_answers(c, "hello-web"):
        print(f"  {addr}  {text}", flush=True)
    run("-a", "hello", "deployment")
    run("-a", "hello", "run", "--", "sh", "-c", "echo one-off job on $(hostname): $GREETING")
    run("-a", "hello", "release")

    say("a PostgreSQL database for it: flynn resource add postgres, then flynn pg psql")
    run("-a", "hello", "resource", "add", "postgres")
    run("-a", "hello", "resource")
    run("-a", "hello", "pg", "psql", "--",
        "-c", "CREATE TABLE visits (at timestamptz DEFAULT now())",
        "-c", "INSERT INTO visits DEFAULT VALUES",
        "-c", "SELECT count(*) AS visits FROM visits")  # fmt: skip

    say("the router: hello.<domain> over HTTP and HTTPS (the cluster certificate), from here")
    for _ in range(3):
        curl("--resolve", f"hello.{domain}:80:{ip}", f"http://hello.{domain}/")
    ca = f"{home}/ca.pem"
    with open(ca, "w") as f:
        f.write(_system_env(c, "controller")["CA_CERT"])
    curl("--cacert", ca, "--resolve", f"hello.{domain}:443:{ip}", f"https://hello.{domain}/")

    say("routes: an HTTP domain and a TCP port, live on the router at once")
    run("-a", "hello", "route", "add", "http", "hello.example.test")
    curl("-H", "Host: hello.example.test", f"http://{ip}/")
    tcp = run("-a", "hello", "route", "add", "tcp")
    port = int(tcp.split()[-1])
    added = time.monotonic()
    for _ in range(300):  # the router opens the port when the route reaches it
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            break
        time.sleep(0.01)
    print(f"(port {port} open {time.monotonic() - added:.2f}s after `route add` returned)")
    curl(f"http://{ip}:{port}/")
    run("-a", "hello", "route")
    run("-a", "hello", "deployment")

    say("git push flynn master: the Node.js example, built by its buildpack, live on the router")
    genv = {
        k: v for k, v in env.items() if not k.startswith("GIT_")
    }  # the cluster CA, not $GIT_SSL_CAINFO
    genv["GIT_TERMINAL_PROMPT"] = "0"
    work = f"{home}/example"
    shutil.copytree(devhost.ROOT / "examples" / "nodejs", work)

    def git(*args: str) -> str:
        print(f"{DIM}${RESET} git {shlex.join(args)}", flush=True)
        out = subprocess.run(["git", *args], env=genv, cwd=work, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.stdout + out.stderr)
        sys.stdout.write(text)
        if out.returncode != 0:
            raise RuntimeError(f"git {args[0]} failed (exit {out.returncode})")
        return text

    def quiet_get() -> str:
        return subprocess.run(["curl", "-s", "--max-time", "5", "--resolve",
                               f"example.{domain}:80:{ip}", f"http://example.{domain}/"],
                              capture_output=True, text=True).stdout  # fmt: skip

    setup = (
        ["init", "-q", "-b", "master"],
        ["config", "user.email", "demo@example.test"],
        ["config", "user.name", "demo"],
        ["add", "."],
        ["commit", "-qm", "example"],
    )
    for args in setup:
        subprocess.run(["git", *args], env=genv, cwd=work, check=True, capture_output=True)
    print(f"{DIM}$ cd example && flynn create example{RESET}", flush=True)
    out = subprocess.run([flynn, "create", "-y", "example"], env=env, cwd=work, text=True,
                         capture_output=True, timeout=60)  # fmt: skip
    sys.stdout.write(out.stdout + out.stderr)
    git("remote", "-v")
    started = time.monotonic()
    git("push", "flynn", "master")
    _wait(lambda: "Node.js" in quiet_get(), "the example app")
    print(f"(first push to first answer: {time.monotonic() - started:.1f}s)")
    curl("--resolve", f"example.{domain}:80:{ip}", f"http://example.{domain}/")
    subprocess.run([flynn, "-a", "example", "route"], env=env, cwd=work)
    server = f"{work}/server.js"
    with open(server) as f:
        code = f.read()
    with open(server, "w") as f:
        f.write(code.replace("Hello from Node.js", "Hello from Node.js (second push)"))
    git("commit", "-qam", "second push")
    started = time.monotonic()
    git("push", "flynn", "master")
    _wait(lambda: "second push" in quiet_get(), "the new release")
    print(f"(second push, build cache used, to the new release answering: "
          f"{time.monotonic() - started:.1f}s)")  # fmt: skip
    curl("--resolve", f"example.{domain}:80:{ip}", f"http://example.{domain}/")
    run("-a", "example", "run", "--", "bash", "-c", "echo $HOME $(id -un) $(node --version)")
    run("-a", "example", "delete", "-y")

    say("flynn scale web=0, flynn delete: jobs stopped, routes removed, database deprovisioned")
    run("-a", "hello", "scale", "web=0")
    run("-a", "hello", "delete", "-y")
    run("apps")


def _web_answers(c: Cluster, service: str) -> list[tuple[str, str]]:
    """(address, answer) of each instance of `service` in discoverd, asked from host 1."""
    script = (
        "import json, sys, urllib.request\n"
        f"url = 'http://{c.host(1).ip}:1111/services/{service}/instances'\n"
        "for i in json.load(urllib.request.urlopen(url, timeout=5)):\n"
        "    text = urllib.request.urlopen('http://' + i['addr'], timeout=5).read().decode()\n"
        "    print(i['addr'], text.strip())\n"
    )
    out = c.exec(1, [sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    return [(a, t) for a, _, t in (line.partition(" ") for line in out.stdout.splitlines())]


def _wait(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
