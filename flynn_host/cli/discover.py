"""Commands that ask the cluster's discoverd: `flynn-host list` (the hosts) and
`flynn-host discover` (a service's instances).

discoverd is found through `DISCOVERD` (a comma list of URLs), else the local host's status
(set when discoverd's job reported in), else `http://127.0.0.1:1111`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from flynn_host.cli.jobs import table
from flynn_host.cli.usage import Parser
from flynn_host.client import HostClient


def discoverd_urls() -> list[str]:
    if os.environ.get("DISCOVERD"):
        return [u.strip().rstrip("/") for u in os.environ["DISCOVERD"].split(",") if u.strip()]
    try:
        info = HostClient(timeout=5).status().get("discoverd") or {}
    except (ConnectionError, OSError):
        info = {}
    return [info["url"].rstrip("/")] if info.get("url") else ["http://127.0.0.1:1111"]


def instances(service: str) -> list[dict[str, Any]]:
    """The service's instances from the first discoverd that answers; [] if it is unknown."""
    errors = []
    for url in discoverd_urls():
        try:
            with urllib.request.urlopen(f"{url}/services/{service}/instances", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            errors.append(f"{url}: HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
    raise ConnectionError("cannot reach discoverd (" + "; ".join(errors) + ")")


def cmd_list(argv: list[str]) -> int:
    Parser("usage: flynn-host list\n\nList the hosts of the cluster (from discoverd).\n").parse(
        argv
    )
    rows = [["ID", "ADDR"]]
    for inst in sorted(instances("flynn-host"), key=lambda i: i.get("meta", {}).get("id", "")):
        if inst.get("meta", {}).get("shutdown") == "true":
            continue
        rows.append([inst.get("meta", {}).get("id", ""), inst["addr"]])
    print(table(rows))
    return 0


def cmd_discover(argv: list[str]) -> int:
    p = Parser(
        "usage: flynn-host discover [options] <service>...\n\n"
        "Show the instances of services registered in discoverd.\n\n"
        "options:\n  --json   print the instances as JSON\n"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("service", nargs="+")
    args = p.parse(argv)
    found = {service: instances(service) for service in args.service}
    if args.json:
        print(json.dumps(found if len(found) > 1 else found[args.service[0]], indent=2))
        return 0
    rows = [["SERVICE", "ID", "ADDR", "PROTO", "META"]]
    for service, items in found.items():
        for inst in sorted(items, key=lambda i: i.get("index", 0)):
            meta = ",".join(f"{k}={v}" for k, v in sorted((inst.get("meta") or {}).items()))
            rows.append([service, inst["id"], inst["addr"], inst.get("proto", "tcp"), meta])
    print(table(rows))
    return 0
