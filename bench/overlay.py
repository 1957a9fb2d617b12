"""The overlay network: job-to-job TCP throughput and round-trip time between two hosts, next to
the same measured directly between the two hosts' own network namespaces, in the same run.

Brings up a 2-host cluster (`flynn_host.dev.cluster`, as `script/cluster up -n 2` does: two
daemons in network namespaces on a private bridge, bootstrapped with discoverd and flannel),
then:

* **overlay**: a server job on host 2 and a client job on host 1, both from the `components`
  image, each its own network namespace with an overlay address (veth → flynnbr0 → vxlan
  `flannel.1` → the bridge between the hosts → the same path back up);
* **direct**: the same server and client programs run with the hosts' own Python in the two
  hosts' namespaces (nsenter), talking over the bridge between the hosts by their addresses:
  the path the overlay is built on, without veths, bridge or VXLAN.

The programs: the client sends `--mbytes` MB over one TCP connection (throughput = bytes over
the time until the server confirms it has them all), then does `--rtts` 1-byte request/response
round trips on another connection (TCP_NODELAY). The two paths alternate in `--rounds` rounds,
so machine-load drift hits both. Prints medians and overlay/direct ratios.

    python bench/overlay.py [--rounds 5] [--mbytes 200] [--rtts 2000] [--json]

Everything (jobs, daemons, namespaces, bridge) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flynn_host.dev.cluster import Cluster  # noqa: E402

PORT = 5201

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mode = c.recv(1)
    if mode == b"T":
        n = 0
        while (b := c.recv(1 << 20)):
            n += len(b)
            if n >= int(sys.argv[2]):
                break
        c.sendall(b"k")
    elif mode == b"R":
        while (b := c.recv(1)):
            c.sendall(b)
    c.close()
"""

CLIENT = r"""
import json, socket, sys, time
host, port, nbytes, rtts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def conn():
    for _ in range(100):
        try:
            c = socket.create_connection((host, port), timeout=30)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return c
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server not reachable")
c = conn(); c.sendall(b"T"); chunk = b"x" * (1 << 20); t = time.perf_counter(); sent = 0
while sent < nbytes:
    c.sendall(chunk); sent += len(chunk)
assert c.recv(1) == b"k"; secs = time.perf_counter() - t; c.close()
c = conn(); c.sendall(b"R"); samples = []
for _ in range(rtts):
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); samples.append(time.perf_counter() - t)
c.close(); samples.sort()
print(json.dumps({"mbit_s": sent * 8 / secs / 1e6, "rtt_us": samples[len(samples) // 2] * 1e6,
                  "rtt_p95_us": samples[int(len(samples) * 0.95)] * 1e6}), flush=True)
"""


def components_job(c: Cluster, host: int, args: list[str]) -> str:
    client = c.client(host)
    job_id = f"{c.host(host).id}-{uuid.uuid4().hex}"
    mountspecs = client.request("GET", "/host/images/components")["mountspecs"]
    client.add_job({"id": job_id, "mountspecs": mountspecs, "config": {"args": args}})
    return job_id


def wait_job(c: Cluster, host: int, job_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.client(host).get_job(job_id)
        if job["status"] in states:
            return job
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} not {states} after 120 s")


def overlay_round(c: Cluster, server_ip: str, nbytes: int, rtts: int) -> dict[str, float]:
    job_id = components_job(c, 1, ["python3", "-c", CLIENT, server_ip, str(PORT), str(nbytes),
                                   str(rtts)])  # fmt: skip
    job = wait_job(c, 1, job_id, ("done", "crashed", "failed"))
    log = c.exec(1, ["flynn-host", "log", job_id], capture_output=True, text=True).stdout
    if job["status"] != "done":
        raise RuntimeError(f"overlay client {job['status']}: {job.get('error')} {log}")
    return json.loads(log.strip().splitlines()[-1])


def direct_round(c: Cluster, nbytes: int, rtts: int) -> dict[str, float]:
    out = c.exec(1, ["python3", "-c", CLIENT, c.host(2).ip, str(PORT + 1), str(nbytes),
                     str(rtts)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--mbytes", type=int, default=200)
    p.add_argument("--rtts", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    nbytes = args.mbytes * (1 << 20)
    results: dict[str, list[dict[str, float]]] = {"overlay": [], "direct": []}
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    with Cluster(name="bench", say=say) as c:
        c.up(2, bootstrap=True, host_id_prefix="benchh")
        server_job = components_job(c, 2, ["python3", "-c", SERVER, str(PORT), str(nbytes)])
        server_ip = wait_job(c, 2, server_job, ("running",))["internal_ip"]
        direct_server = subprocess.Popen(
            ["nsenter", f"--net={c.host(2).netns_path}", "--", "python3", "-c", SERVER,
             str(PORT + 1), str(nbytes)], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            say(f"overlay: job {server_ip} on {c.host(2).id} ← job on {c.host(1).id}; "
                f"direct: {c.host(2).ip} ← {c.host(1).ip}")  # fmt: skip
            for r in range(args.rounds):
                results["overlay"].append(overlay_round(c, server_ip, nbytes, args.rtts))
                results["direct"].append(direct_round(c, nbytes, args.rtts))
                say(f"round {r + 1}: overlay {results['overlay'][-1]}, "
                    f"direct {results['direct'][-1]}")  # fmt: skip
        finally:
            direct_server.kill()
            direct_server.wait()
    med = {path: {k: statistics.median(s[k] for s in rows) for k in rows[0]}
           for path, rows in results.items()}  # fmt: skip
    ratio = {k: med["overlay"][k] / med["direct"][k] for k in med["overlay"]}
    if args.json:
        print(json.dumps({"median": med, "overlay_over_direct": ratio, "rounds": results}))
        return 0
    print(f"{'':24}{'overlay':>12}{'direct':>12}{'ratio':>8}")
    for key, label in (("mbit_s", "throughput (Mbit/s)"), ("rtt_us", "RTT median (µs)"),
                       ("rtt_p95_us", "RTT p95 (µs)")):  # fmt: skip
        print(f"{label:24}{med['overlay'][key]:12.1f}{med['direct'][key]:12.1f}{ratio[key]:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
