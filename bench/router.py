"""The router's data plane (`flynn-host component router-worker`) as an HTTP/HTTPS reverse
proxy, next to nginx as the reference proxy, measured in the same run against the same backend.

* **backend**: an nginx (`worker_processes 1`, no access log) on a loopback port, serving a
  13-byte body (`/small`, "Hello, world\\n") and a 1 MiB file (`/1mb`), the same for both
  proxies.
* **reference**: a second nginx as reverse proxy to it (`upstream` with `keepalive 64`, HTTP/1.1
  to the backend, `Connection ""`), adding the headers the router adds (X-Forwarded-For, -Proto,
  -Port, X-Request-Start, X-Request-Id) and serving HTTP and HTTPS (TLS 1.2+, the same
  self-signed `bench.test` certificate as the router), with 256 KiB of proxy buffers per
  connection (the router's write-buffer high-water mark; nginx's default is 8 x 4 KiB). It
  gets as many worker processes as the router has workers, each with its own listener
  (`reuseport`), as the router's do.
* **router**: 1 worker, then N workers (N = the CPUs this process may use), configured through
  `FLYNN_ROUTER_WORKER` and fed one HTTP route (`bench.test`, path `/`) and the backend on
  stdin, as the router's supervisor does; the bench certificate is their default certificate,
  since wrk sends no usable SNI when it connects to 127.0.0.1.

Load: `wrk --latency -H 'Host: bench.test'` on keep-alive connections (`--wrk-threads`,
`--connections`, `--duration`), for three cases: the small body over HTTP, 1 MiB over HTTP, the
small body over HTTPS. Within each of `--rounds` rounds, every case runs on both proxies one
after the other (nginx first in odd rounds, the router first in even ones), so load drift on the
machine hits both. Printed per round and as best and median over the rounds: requests/s, p99
latency and the proxy's CPU time per request (all its processes, from /proc) of both, and the
ratios router/nginx; wrk's non-2xx answers and socket errors are counted and shown. Before
measuring, both proxies are checked to answer 200 with the right bodies (and, over HTTPS, the
bench certificate), else the run stops with an error.

On a small machine wrk, the backend and the proxy share the CPUs. With fewer proxy processes
than CPUs, the proxy (either one) is pinned with `taskset` to the last CPUs and wrk and the
backend to the others (on 2 CPUs: the proxy on CPU 1, wrk and the backend on CPU 0), so a
1-process proxy has a CPU to itself; with as many proxy processes as CPUs nothing is pinned.
`--no-pin` turns pinning off. When the reference outruns what wrk and the backend can send it on
their CPU, its req/s is a lower bound; the CPU time per request still compares the proxies.

    python bench/router.py [--rounds 2] [--duration 10] [--connections 50] [--wrk-threads 1]
                           [--no-pin] [--json]

It needs nginx (`/usr/sbin/nginx`, nginx-light) and wrk, not root; about 4 minutes with the
defaults on 2 CPUs. It prints and asserts nothing. Every nginx, worker and wrk it started is
stopped and its temp dir removed at the end, also on an error, Ctrl-C or SIGTERM; a process
left behind is named and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flynn_host.dev.certs import self_signed  # noqa: E402
from flynn_host.dev.host import free_ports  # noqa: E402
from flynn_host.frozen import self_command  # noqa: E402

NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
HOST = "bench.test"
SMALL = b"Hello, world\n"
BIG_SIZE = 1 << 20
SERVICE = "bench-web"
# (key, scheme, path, label)
CASES = [
    ("small_http", "http", "/small", "13 B over HTTP"),
    ("1mb_http", "http", "/1mb", "1 MiB over HTTP"),
    ("small_https", "https", "/small", "13 B over HTTPS"),
]
PROXIES = ("nginx", "router")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------------------


class Started:
    """Every process this run started (each in its own session, so its process group holds it
    and its children), to stop them all at the end whatever happened."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]], timeout: float = 10) -> None:
        """EOF on stdin (a router worker's cue to exit), SIGTERM to the group, SIGKILL to
        whatever is left after `timeout`."""
        for p in procs:
            if p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            if p in self.procs:
                self.procs.remove(p)

    def left(self, pgids: set[int]) -> list[int]:
        """Processes still alive in the given process groups."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (d / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[2]) in pgids:
                        out.append(int(d.name))
        return out


def pinned(cpus: list[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out


# --- certificate -------------------------------------------------------------------------


def make_cert(tmp: Path) -> tuple[str, str]:
    """A self-signed RSA-2048 certificate for bench.test; (cert PEM, key PEM), also written
    to tmp/cert.pem and tmp/key.pem for nginx."""
    cert_pem, key_pem = self_signed(HOST, rsa_bits=2048, days=1)
    (tmp / "cert.pem").write_text(cert_pem)
    (tmp / "key.pem").write_text(key_pem)
    return cert_pem, key_pem


# --- nginx (backend and reference) ------------------------------------------------------


def nginx_conf(tmp: Path, name: str, workers: int, server: str) -> str:
    d = tmp / name
    (d / "tmp").mkdir(parents=True)
    temps = "\n".join(
        f"  {kind}_temp_path {d}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes {workers};
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temps}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  # the defaults (1000) would make wrk and the proxies reconnect every 1000 requests
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{server}
}}
"""


def backend_conf(tmp: Path, port: int) -> str:
    www = tmp / "www"
    www.mkdir()
    (www / "small").write_bytes(SMALL)
    (www / "1mb").write_bytes(os.urandom(BIG_SIZE))
    # what the backend was told by the proxy, for the check before measuring
    seen = " ".join(
        f"{h}=$http_{h.lower().replace('-', '_')}"
        for h in ("Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Port",
                  "X-Request-Start", "X-Request-Id", "Connection")
    )  # fmt: skip
    server = f"""
  server {{
    listen 127.0.0.1:{port};
    root {www};
    location = /headers {{ default_type text/plain; return 200 "{seen}\\n"; }}
  }}"""
    return nginx_conf(tmp, "backend", 1, server)


def reference_conf(
    tmp: Path, certs: Path, workers: int, backend: int, http: int, https: int
) -> str:
    server = f"""
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{http} reuseport;
    listen 127.0.0.1:{https} ssl reuseport;
    server_name {HOST};
    ssl_certificate {certs}/cert.pem;
    ssl_certificate_key {certs}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header X-Request-Start $msec;
      proxy_set_header X-Request-Id $request_id;
      # 256 KiB of buffers per connection, as the router's write-buffer high-water mark (the
      # default 8 x 4 KiB took twice the CPU per 1 MiB answer), and a large answer streamed
      # through them instead of spilled to a temp file
      proxy_buffer_size 64k;
      proxy_buffers 4 64k;
      proxy_busy_buffers_size 128k;
      proxy_max_temp_file_size 0;
    }}
  }}"""
    return nginx_conf(tmp, f"reference-{workers}", workers, server)


def start_nginx(
    started: Started, tmp: Path, name: str, conf: str, port: int, cpus: list[int] | None
) -> subprocess.Popen[bytes]:
    d = tmp / name
    (d / "nginx.conf").write_text(conf)
    log = open(d / "stderr.log", "wb")  # noqa: SIM115 (kept by the process)
    proc = started.popen(
        [*pinned(cpus), NGINX, "-p", str(d), "-c", str(d / "nginx.conf"),
         "-e", str(d / "error.log"), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            logs = "".join(
                p.read_text(errors="replace")
                for p in (d / "stderr.log", d / "error.log")
                if p.exists()
            )
            raise RuntimeError(f"nginx ({name}) did not start:\n{logs}")
        time.sleep(0.05)


def nginx_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    return [proc.pid, *children(proc.pid)]


# --- router workers ----------------------------------------------------------------------


def start_router(
    started: Started,
    tmp: Path,
    workers: int,
    http: int,
    https: int,
    backend: int,
    cert: tuple[str, str],
    cpus: list[int] | None,
) -> list[subprocess.Popen[bytes]]:
    """`workers` router-worker processes sharing the ports, each fed the route and the
    backend; returns once every one has said it is ready."""
    config = {
        "http_ports": [http],
        "https_ports": [https],
        "ip": "127.0.0.1",
        "tcp_ip": "127.0.0.1",
        "tls_cert": cert[0],
        "tls_key": cert[1],
        "cookie_key": "",
        "proxy_protocol": False,
        "legacy_tls": False,
        "error_503_page": None,
    }
    env = {**os.environ, "FLYNN_ROUTER_WORKER": json.dumps(config)}
    route = {"type": "http", "id": str(uuid.uuid4()), "service": SERVICE, "domain": HOST,
             "path": "/"}  # fmt: skip
    addr = {"addr": f"127.0.0.1:{backend}", "job_id": "", "app_id": ""}
    backends = {"op": "backends", "service": SERVICE, "backends": [addr], "leader": None}
    procs, logs, ready = [], [], []
    for i in range(workers):
        log_path = tmp / f"router-{workers}-{i}.log"
        log = open(log_path, "wb")  # noqa: SIM115 (kept by the process)
        proc = started.popen(
            [*pinned(cpus), *self_command(), "component", "router-worker"],
            env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        log.close()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"op": "routes", "routes": [route]}).encode() + b"\n")
        proc.stdin.write(json.dumps(backends).encode() + b"\n")
        proc.stdin.flush()
        said: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_worker, args=(proc, said), daemon=True).start()
        procs.append(proc)
        logs.append(log_path)
        ready.append(said)
    deadline = time.monotonic() + 30
    for proc, said, log_path in zip(procs, ready, logs, strict=True):
        while True:
            try:
                msg = said.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                msg = None
            if msg is not None and msg.get("op") == "ready":
                break
            if msg is None:
                proc.poll()
                raise RuntimeError(
                    f"router worker {proc.pid} did not say ready (exit {proc.returncode}):\n"
                    + log_path.read_text(errors="replace")[-4000:]
                )
    return procs


def _read_worker(proc: subprocess.Popen[bytes], said: queue.Queue[dict[str, Any] | None]) -> None:
    """Drain a worker's stdout (so it never blocks on a full pipe); hand on its messages."""
    assert proc.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                said.put(json.loads(line))
    said.put(None)


# --- checks ------------------------------------------------------------------------------


def fetch(
    port: int, path: str, tls: ssl.SSLContext | None = None, sni: str | None = None
) -> tuple[int, bytes, bytes | None]:
    """GET path with Host: bench.test; (status, body, the server's certificate (DER) or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    cert = None
    try:
        if tls is not None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sock = tls.wrap_socket(raw, server_hostname=sni)
            cert = conn.sock.getpeercert(binary_form=True)
        conn.request("GET", path, headers={"Host": HOST})
        r = conn.getresponse()
        return r.status, r.read(), cert
    finally:
        conn.close()


def check(name: str, http_port: int, https_port: int, big: bytes, cert_pem: str) -> str:
    """Fail loudly unless the proxy answers every case right; returns the request headers
    the backend saw from it."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem)
    no_sni = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_sni.check_hostname = False
    no_sni.verify_mode = ssl.CERT_NONE
    verify = ssl.create_default_context(cadata=cert_pem)
    wanted = {"/small": SMALL, "/1mb": big}
    problems = []
    for scheme, path in (("http", "/small"), ("http", "/1mb"), ("https", "/small"),
                         ("https", "/1mb")):  # fmt: skip
        try:
            if scheme == "http":
                status, body, _ = fetch(http_port, path)
            else:
                # as wrk does it (no SNI for an IP): the default certificate must be ours
                status, body, cert = fetch(https_port, path, no_sni)
                if cert != der:
                    problems.append(f"{scheme} {path}: not the bench certificate without SNI")
                status2, _, _ = fetch(https_port, path, verify, sni=HOST)
                if status2 != 200:
                    problems.append(f"{scheme} {path} with SNI {HOST}: status {status2}")
        except (OSError, http.client.HTTPException) as e:
            problems.append(f"{scheme} {path}: {e!r}")
            continue
        if status != 200 or body != wanted[path]:
            problems.append(f"{scheme} {path}: status {status}, {len(body)} bytes "
                            f"(want 200, {len(wanted[path])} bytes)")  # fmt: skip
    if problems:
        raise RuntimeError(f"{name} does not answer right:\n  " + "\n  ".join(problems))
    _, seen, _ = fetch(http_port, "/headers")
    return seen.decode(errors="replace").strip()


# --- wrk ---------------------------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(text)
    return float(m[1]) * UNITS[m[2]]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    count = re.search(r"^\s*(\d+) requests in ", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and count and p50 and p99):
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps[1]),
        "requests": int(count[1]),
        "p50_ms": _ms(p50[1]),
        "p99_ms": _ms(p99[1]),
        "non_2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {},
    }


def wrk(
    url: str, threads: int, connections: int, seconds: float, cpus: list[int] | None
) -> tuple[dict[str, Any], str]:
    argv = [*pinned(cpus), WRK, "-t", str(threads), "-c", str(connections),
            "-d", f"{seconds:g}s", "--latency", "-H", f"Host: {HOST}", url]  # fmt: skip
    # subprocess.run kills wrk if the run is interrupted
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}{r.stderr}")
    return parse_wrk(r.stdout), r.stdout


# --- the run -----------------------------------------------------------------------------


def pinning(workers: int, cpus: list[int], pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(the proxy's CPUs, wrk's and the backend's CPUs), or no pinning."""
    if not pin or workers >= len(cpus):
        return None, None
    return cpus[-workers:], cpus[:-workers]


def measure_phase(
    started: Started, tmp: Path, workers: int, cpus: list[int], args: argparse.Namespace,
    cert: tuple[str, str],
) -> dict[str, Any]:  # fmt: skip
    """Backend, nginx reference and router with `workers` processes; every case in rounds."""
    proxy_cpus, load_cpus = pinning(workers, cpus, args.pin)
    backend, ref_http, ref_https, r_http, r_https = free_ports(5)
    phase_dir = tmp / f"phase-{workers}"
    phase_dir.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_nginx(started, phase_dir, "backend",
                                 backend_conf(phase_dir, backend), backend, load_cpus))  # fmt: skip
        big = (phase_dir / "www" / "1mb").read_bytes()
        conf = reference_conf(phase_dir, tmp, workers, backend, ref_http, ref_https)
        ref = start_nginx(started, phase_dir, f"reference-{workers}", conf, ref_http, proxy_cpus)
        procs.append(ref)
        say(f"{workers} worker(s): starting the router")
        router = start_router(started, phase_dir, workers, r_http, r_https, backend, cert,
                              proxy_cpus)  # fmt: skip
        procs.extend(router)
        seen = {
            "nginx": check("nginx (reference)", ref_http, ref_https, big, cert[0]),
            "router": check("the router", r_http, r_https, big, cert[0]),
        }
        for name, headers in seen.items():
            say(f"  the backend sees from {name}: {headers}")
        ports = {"nginx": (ref_http, ref_https), "router": (r_http, r_https)}
        pids = {
            "nginx": lambda: nginx_pids(ref),
            "router": lambda: [q for p in router for q in (p.pid, *children(p.pid))],
        }
        # warm-up, not counted: every connection opened, caches and buffers filled
        for name in PROXIES:
            for _, scheme, path, _ in CASES:
                port = ports[name][0 if scheme == "http" else 1]
                wrk(f"{scheme}://127.0.0.1:{port}{path}", args.wrk_threads, args.connections,
                    1, load_cpus)  # fmt: skip
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            case: {name: [] for name in PROXIES} for case, *_ in CASES
        }
        for rnd in range(args.rounds):
            order = PROXIES if rnd % 2 == 0 else PROXIES[::-1]
            for case, scheme, path, label in CASES:
                for name in order:
                    say(f"{workers} worker(s), round {rnd + 1}/{args.rounds}: {label} "
                        f"through {name}")  # fmt: skip
                    port = ports[name][0 if scheme == "http" else 1]
                    before = cpu_seconds(pids[name]())
                    result, _ = wrk(
                        f"{scheme}://127.0.0.1:{port}{path}", args.wrk_threads, args.connections,
                        args.duration, load_cpus,
                    )  # fmt: skip
                    used = cpu_seconds(pids[name]()) - before
                    gone = [
                        p.pid
                        for p in (router if name == "router" else [ref])
                        if p.poll() is not None
                    ]
                    if gone:
                        raise RuntimeError(f"{name}: process(es) {gone} exited while measured")
                    result["cpu_us_per_request"] = used / max(1, result["requests"]) * 1e6
                    result["cpu_percent"] = used / args.duration * 100
                    runs[case][name].append(result)
        return {
            "workers": workers,
            "pinning": {"proxy": proxy_cpus, "wrk_and_backend": load_cpus},
            "backend_saw": seen,
            "cases": {case: summarise(runs[case]) for case, *_ in CASES},
        }
    finally:
        started.stop(procs)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def ratios(n: dict[str, float], r: dict[str, float]) -> dict[str, float]:
        return {
            "rps": r["rps"] / n["rps"],
            "p99": r["p99_ms"] / n["p99_ms"],
            "cpu_per_request": r["cpu_us_per_request"] / max(1e-9, n["cpu_us_per_request"]),
        }

    out: dict[str, Any] = {"rounds": []}
    for n, r in zip(runs["nginx"], runs["router"], strict=True):
        out["rounds"].append({"nginx": n, "router": r, "ratio": ratios(n, r)})
    for name in PROXIES:
        xs = runs[name]
        out.setdefault("best", {})[name] = {
            "rps": max(x["rps"] for x in xs),
            "p99_ms": min(x["p99_ms"] for x in xs),
            "cpu_us_per_request": min(x["cpu_us_per_request"] for x in xs),
        }
        out.setdefault("median", {})[name] = {
            k: statistics.median(x[k] for x in xs) for k in ("rps", "p99_ms", "cpu_us_per_request")
        }
    for which in ("best", "median"):
        out[which]["ratio"] = ratios(out[which]["nginx"], out[which]["router"])
    out["non_2xx"] = {name: sum(x["non_2xx"] for x in runs[name]) for name in PROXIES}
    out["socket_errors"] = {
        name: sum(sum(x["socket_errors"].values()) for x in runs[name]) for name in PROXIES
    }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))
    counts = [1] if len(cpus) == 1 else [1, len(cpus)]
    started = Started()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-"))
    os.chmod(tmp, 0o755)  # nginx's workers run as nobody when started by root
    on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cert = make_cert(tmp)
        result: dict[str, Any] = {
            "date": dt.date.today().isoformat(),
            "cpus": len(cpus),
            "load_average": os.getloadavg(),
            "wrk": {
                "threads": args.wrk_threads,
                "connections": args.connections,
                "duration_s": args.duration,
            },  # fmt: skip
            "rounds": args.rounds,
            "phases": [],
        }
        for workers in counts:
            result["phases"].append(measure_phase(started, tmp, workers, cpus, args, cert))
        result["load_average_end"] = os.getloadavg()
        return result
    finally:
        # an impatient second Ctrl-C must not leave nginx or a worker running
        on_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pgids = {p.pid for p in started.procs}
        started.stop(list(started.procs))
        left = started.left(pgids)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term)
        if left:
            say(f"error: processes of this run were left running (killed): {left}")
            raise SystemExit(1)


def print_table(r: dict[str, Any]) -> None:
    w = r["wrk"]
    print(f"router (flynn-host component router-worker) vs nginx as reverse proxy, backend nginx; "
          f"{r['date']}, {r['cpus']} CPUs, load average {r['load_average'][0]:.2f} before, "
          f"{r['load_average_end'][0]:.2f} after")  # fmt: skip
    print(
        f"wrk {w['threads']} thread(s), {w['connections']} keep-alive connections, "
        f"{w['duration_s']:g} s per run, {r['rounds']} rounds alternating nginx and router"
    )
    print("wrk, the backend and the proxy share this machine's CPUs: absolute figures are "
          "bounded by it, read the ratios (and the proxies' CPU time per request)")  # fmt: skip
    head = (f"{'':17}{'':8}{'nginx':>24}   {'router':>24}   {'router/nginx':>20}\n"
            f"{'':17}{'':8}{'req/s':>8}{'p99 ms':>8}{'µs/req':>8}   {'req/s':>8}{'p99 ms':>8}"
            f"{'µs/req':>8}   {'req/s':>6}{'p99':>7}{'µs/req':>7}")  # fmt: skip
    for ph in r["phases"]:
        pin = ph["pinning"]
        where = (f"proxy on CPU {pin['proxy']}, wrk and backend on CPU {pin['wrk_and_backend']}"
                 if pin["proxy"] else "no pinning")  # fmt: skip
        print(f"\n{ph['workers']} proxy process(es) (nginx worker_processes = router workers), "
              f"{where}; µs/req = the proxy's CPU time per request")  # fmt: skip
        print(head)
        for case, _, _, label in CASES:
            c = ph["cases"][case]
            rows = [(f"round {i + 1}", x) for i, x in enumerate(c["rounds"])]
            rows += [(which, c[which]) for which in ("best", "median")]
            for i, (tag, x) in enumerate(rows):
                n, ro, q = x["nginx"], x["router"], x["ratio"]
                print(f"{label if i == 0 else '':17}{tag:8}"
                      f"{n['rps']:8.0f}{n['p99_ms']:8.2f}{n['cpu_us_per_request']:8.1f}   "
                      f"{ro['rps']:8.0f}{ro['p99_ms']:8.2f}{ro['cpu_us_per_request']:8.1f}   "
                      f"{q['rps']:5.2f}×{q['p99']:6.2f}×{q['cpu_per_request']:6.2f}×")  # fmt: skip
        bad = [
            f"{CASES[[k for k, *_ in CASES].index(case)][3]} via {name}: {c['non_2xx'][name]} "
            f"non-2xx, {c['socket_errors'][name]} socket errors"
            for case, c in ph["cases"].items()
            for name in PROXIES
            if c["non_2xx"][name] or c["socket_errors"][name]
        ]
        print("non-2xx answers / socket errors (wrk): " + ("; ".join(bad) if bad else "none"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per case")
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=50, help="wrk's keep-alive connections")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="no taskset pinning of proxy, wrk and backend")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    for tool in (NGINX, WRK, shutil.which("taskset")):
        if not tool or not os.access(tool, os.X_OK):
            print(f"error: {tool or 'taskset'} is not installed", file=sys.stderr)
            return 1
    try:
        result = run(args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
