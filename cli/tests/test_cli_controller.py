"""The `flynn` command end to end: the installed console script, in a private home, against a
real controller process on a real PostgreSQL (one of each per module). Every command is
checked by what it prints and by the API's state afterwards (read with the controller client).

A resource provider (an external HTTP service to the controller) is served by the test."""

from __future__ import annotations

import http.server
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_home import Home
from flynn_controller.client import Client, NotFound

from flynn_host.dev.controller import ControllerProcess, controller_process, pg_server
from flynn_host.dev.host import missing_programs
from flynn_host.dev.scheduler_standin import scheduler_standin

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
IMAGE = "https://registry.hub.docker.com?name=flynn/slugbuilder&id=15d72b7f573b"


@pytest.fixture(scope="module")
def controller() -> Iterator[ControllerProcess]:
    with pg_server() as pg, controller_process(pg) as ctl:
        yield ctl


@pytest.fixture(scope="module")
def api(controller: ControllerProcess) -> Client:
    return Client(controller.url, controller.key)


@pytest.fixture
def cli(home: Home, controller: ControllerProcess) -> Home:
    """A home with the controller added as its (default) cluster."""
    out = home.ok("cluster", "add", "--no-git", "test", controller.url, controller.key)
    assert out.stderr == 'Cluster "test" added and set as default.\n'
    return home


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create(cli: Home, name: str | None = None) -> str:
    name = name or unique("app")
    out = cli.ok("create", "-y", name)
    assert out.stderr == f"Created {name}\n"
    return name


def test_create_apps_info_delete(cli: Home, api: Client, controller: ControllerProcess):
    name = create(cli)
    app = api.get_app(name)
    assert app["name"] == name and app["meta"] == {}
    out = cli.ok("apps").stdout.splitlines()
    assert re.fullmatch(r"ID +NAME", out[0])
    assert any(re.fullmatch(rf"{app['id']}  +{name}", line) for line in out[1:]), out

    # an app that has no release: git URL, and the default route as web URL
    git_url = "http://git.127.0.0.1:" + controller.url.rsplit(":", 1)[1]
    info = cli.ok("-a", name, "info").stdout
    assert info == (
        f"=== {name}\nGit URL:  {git_url}/{name}.git\nWeb URL:  http://{name}.dev.localflynn.test\n"
    )

    # a duplicate name is the controller's error, word for word
    err = cli.fail("create", "-y", name)
    assert err == f'object_exists: application "{name}" already exists\n'

    out = cli.ok("-a", name, "delete", "-y")
    assert out.stderr == f"Deleted {name} (removed 1 routes, deprovisioned 0 resources)\n"
    with pytest.raises(NotFound):
        api.get_app(name)
    # as the 2015 CLI: `info` of an unknown app is a bare 404 on its release, so a git URL
    assert cli.ok("-a", name, "info").stdout == f"=== {name}\nGit URL:  {git_url}/{name}.git\n"
    assert cli.fail("-a", name, "delete", "-y") == "controller: resource not found\n"


def test_create_without_a_name_and_the_git_remote(cli: Home, api: Client, controller):
    repo = cli.repo()
    out = cli.ok("create", cwd=repo)
    name = out.stderr.removeprefix("Created ").strip()
    assert re.fullmatch(r"[a-z]+(-[a-z]+)+", name), name
    git_url = "http://git.127.0.0.1:" + controller.url.rsplit(":", 1)[1]
    assert cli.git("remote", "get-url", "flynn", cwd=repo).strip() == f"{git_url}/{name}.git"
    # the app comes from the remote now
    assert cli.ok("info", cwd=repo).stdout.startswith(f"=== {name}\n")

    # a second create asks before replacing the remote; "no" leaves everything as it was
    other = unique("other")
    out = cli.run("create", other, cwd=repo, input="no\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "There is already a git remote called flynn\n"
        "Are you sure you want to replace it? (yes/no): "
    )
    with pytest.raises(NotFound):
        api.get_app(other)
    # an app can get a second remote
    out = cli.ok("-a", name, "remote", "add", "staging", cwd=repo)
    assert out.stderr == f"Created remote staging with url {git_url}/{name}.git.\n"
    assert cli.ok("-a", name, "remote", "add").stderr.startswith("Must be executed within")

    # delete removes the remote that points at the app
    cli.git("remote", "remove", "staging", cwd=repo)
    cli.ok("delete", "-y", cwd=repo)
    assert cli.git("remote", cwd=repo).strip() == ""


def test_delete_asks_first(cli: Home, api: Client):
    name = create(cli)
    out = cli.run("-a", name, "delete", input="no\n")
    assert out.returncode == 0
    assert out.stdout == f'Are you sure you want to delete the app "{name}"? (yes/no): '
    assert api.get_app(name)["name"] == name
    out = cli.run("-a", name, "delete", input="maybe\nyes\n")
    assert out.returncode == 0, out.stderr
    assert "Please type 'yes' or 'no': " in out.stdout
    with pytest.raises(NotFound):
        api.get_app(name)


def test_env_set_get_unset(cli: Home, api: Client):
    name = create(cli)
    assert cli.ok("-a", name, "env").stdout == ""  # no release yet
    assert cli.fail("-a", name, "env", "get", "FOO") == "no app release found\n"

    out = cli.ok("-a", name, "env", "set", "FOO=bar", "BAZ=a=b c")
    m = re.fullmatch(rf"Created release ({UUID})\.\n", out.stderr)
    assert m, out.stderr
    release = api.app_release(name)
    assert release["id"] == m.group(1)
    assert release["env"] == {"FOO": "bar", "BAZ": "a=b c"}
    assert "artifact" not in release or not release["artifact"]

    assert cli.ok("-a", name, "env").stdout == "BAZ=a=b c\nFOO=bar\n"
    assert cli.ok("-a", name, "env", "get", "FOO").stdout == "bar\n"
    err = cli.fail("-a", name, "env", "get", "NOPE")
    assert err == f'var "NOPE" not found in release "{release["id"]}"\n'
    assert cli.fail("-a", name, "env", "set", "NOEQUALS") == 'invalid var format: "NOEQUALS"\n'

    out = cli.ok("-a", name, "env", "unset", "FOO")
    rid = re.fullmatch(rf"Created release ({UUID})\.\n", out.stderr).group(1)  # type: ignore[union-attr]
    assert rid != release["id"]
    assert api.app_release(name)["env"] == {"BAZ": "a=b c"}
    # each change was a deployment
    deployments = api.deployment_list(name)
    assert {d["new_release"] for d in deployments} >= {release["id"], rid}
    out = cli.ok("-a", name, "deployment").stdout.splitlines()
    assert re.fullmatch(r"ID +STATUS +CREATED +FINISHED", out[0])
    assert len(out) == len(deployments) + 1
    assert all(re.match(rf"{UUID}  +complete  +.* ago  +.* ago$", line) for line in out[1:])

    # process-type env
    err = cli.fail("-a", name, "env", "set", "-t", "web", "X=1")
    assert err == f'process "web" in release {rid} not found\n'


def test_env_set_over_a_running_formation_waits_for_the_deployment(
    cli: Home, api: Client, controller: ControllerProcess
):
    name = create(cli)
    cli.ok(
        "-a", name, "release", "add", "-f", "/dev/stdin", IMAGE, input='{"processes":{"web":{}}}'
    )
    first = api.app_release(name)
    api.put_formation({"app": name, "release": first["id"], "processes": {"web": 2}})
    # the deployer waits for the new jobs: a stand-in for the scheduler reports them
    with scheduler_standin(controller.url, controller.key):
        out = cli.ok("-a", name, "env", "set", "A=1")
    rid = re.fullmatch(rf"Created release ({UUID})\.\n", out.stderr).group(1)  # type: ignore[union-attr]
    # the deployment was not finished when created: the CLI waited for its `complete` event
    (deployment,) = [d for d in api.deployment_list(name) if d["new_release"] == rid]
    assert deployment["status"] == "complete" and deployment["processes"] == {"web": 2}
    assert api.app_release(name)["id"] == rid
    assert api.get_formation(name, rid)["processes"] == {"web": 2}


def test_meta(cli: Home, api: Client):
    name = create(cli)
    assert cli.ok("-a", name, "meta").stdout == "KEY  VALUE\n"
    assert cli.ok("-a", name, "meta", "set", "foo=bar", "team=a b").stderr == ""
    assert api.get_app(name)["meta"] == {"foo": "bar", "team": "a b"}
    assert cli.ok("-a", name, "meta").stdout == "KEY   VALUE\nfoo   bar\nteam  a b\n"
    cli.ok("-a", name, "meta", "unset", "foo")
    assert api.get_app(name)["meta"] == {"team": "a b"}


def test_release_add_show_list(cli: Home, api: Client, tmp_path: Path):
    name = create(cli)
    config = tmp_path / "release.json"
    config.write_text(
        json.dumps(
            {
                "env": {"MY_VAR": "Hello World"},
                "processes": {
                    "echo": {
                        "cmd": ["socat -v tcp-l:$PORT,fork exec:/bin/cat"],
                        "entrypoint": ["sh", "-c"],
                        "ports": [{"port": 8080, "proto": "tcp"}],
                    }
                },
            }
        )
    )
    out = cli.ok("-a", name, "release", "add", "-f", str(config), IMAGE)
    rid = re.fullmatch(rf"Created release ({UUID})\.\n", out.stderr).group(1)  # type: ignore[union-attr]
    release = api.app_release(name)
    assert release["id"] == rid
    artifact = api.get_artifact(release["artifact"])
    assert (artifact["type"], artifact["uri"]) == ("docker", IMAGE)
    assert release["env"] == {"MY_VAR": "Hello World"}
    assert release["processes"]["echo"]["entrypoint"] == ["sh", "-c"]

    show = cli.ok("-a", name, "release", "show").stdout.splitlines()
    assert show[0] == f"ID:             {rid}"
    assert show[1] == f"Artifact:       docker+{IMAGE}"
    assert show[2] == "Process Types:  echo"
    assert re.fullmatch(
        r"Created At:     \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC", show[3]
    )
    assert show[4] == "ENV[MY_VAR]     Hello World"  # (no colon: the Go code, not its help)
    assert cli.ok("release", "show", rid).stdout.splitlines() == show
    shown = json.loads(cli.ok("-a", name, "release", "show", "--json").stdout)
    assert shown["id"] == rid and shown["artifact"] == release["artifact"]
    assert shown["processes"] == release["processes"]

    # the same image again: the artifact is reused
    cli.ok("-a", name, "release", "add", IMAGE)
    assert api.app_release(name)["artifact"] == release["artifact"]

    # `release` lists releases that have a formation for the app; -q only their ids
    listed = api.app_release_list(name)
    quiet = cli.ok("-a", name, "release", "-q").stdout.split()
    assert quiet == [r["id"] for r in listed]
    table = cli.ok("-a", name, "release").stdout.splitlines()
    assert re.fullmatch(r"ID +Created", table[0]) and len(table) == len(listed) + 1

    assert cli.fail("-a", name, "release", "add", "-t", "tarball", IMAGE) == (
        "Release type tarball not supported.\n"
    )
    err = cli.fail("-a", name, "release", "add", "not a uri")
    assert err.startswith("validation_error: ")


def test_limit(cli: Home, api: Client):
    name = create(cli)
    cli.ok(
        "-a", name, "release", "add", "-f", "/dev/stdin", IMAGE, input='{"processes":{"web":{}}}'
    )
    assert cli.ok("-a", name, "limit").stdout == "web:  max_fd=10000  memory=1GB\n"

    out = cli.ok("-a", name, "limit", "set", "web", "memory=512MB", "max_fd=12000")
    rid = re.fullmatch(rf"Created release ({UUID})\n", out.stdout).group(1)  # type: ignore[union-attr]
    release = api.app_release(name)
    assert release["id"] == rid
    resources = release["processes"]["web"]["resources"]
    assert resources["memory"]["limit"] == 512 * 1024**2
    assert resources["max_fd"]["limit"] == 12000
    assert cli.ok("-a", name, "limit").stdout == "web:  max_fd=12000  memory=512MB\n"
    assert cli.ok("-a", name, "limit", "-t", "web").stdout == "web:  max_fd=12000  memory=512MB\n"
    assert cli.fail("-a", name, "limit", "-t", "worker") == 'unknown process type "worker"\n'
    err = cli.fail("-a", name, "limit", "set", "web", "cpu=1")
    assert err == 'invalid resource limit type: ["cpu" "1"]\n'
    err = cli.fail("-a", name, "limit", "set", "web", "memory=lots")
    assert err == 'invalid resource limit value: "lots"\n'


def test_routes(cli: Home, api: Client):
    name = create(cli)
    out = cli.ok("-a", name, "route", "add", "http", "example-" + name + ".test")
    http_id = out.stdout.strip()
    assert re.fullmatch(rf"http/{UUID}", http_id), out.stdout
    out = cli.ok("-a", name, "route", "add", "http", "--sticky", f"example-{name}.test/api/")
    path_id = out.stdout.strip()
    out = cli.ok("-a", name, "route", "add", "tcp", "-s", "echo")
    m = re.fullmatch(rf"(tcp/{UUID}) listening on port (\d+)\n", out.stdout)
    assert m, out.stdout
    tcp_id, port = m.group(1), int(m.group(2))

    routes = {f"{r['type']}/{r['id']}": r for r in api.route_list(name)}
    assert routes[http_id]["domain"] == f"example-{name}.test"
    assert routes[http_id]["service"] == f"{name}-web"
    assert routes[path_id]["path"] == "/api/" and routes[path_id]["sticky"] is True
    assert routes[tcp_id]["port"] == port and routes[tcp_id]["service"] == "echo"

    listing = cli.ok("-a", name, "route").stdout.splitlines()
    assert re.fullmatch(r"ROUTE +SERVICE +ID +STICKY +PATH", listing[0])
    rows = {line.split()[2]: line.split() for line in listing[1:]}
    assert rows[http_id] == [f"http:example-{name}.test", f"{name}-web", http_id, "false", "/"]
    assert rows[path_id] == [f"http:example-{name}.test", f"{name}-web", path_id, "true", "/api/"]
    assert rows[tcp_id] == [f"tcp:{port}", "echo", tcp_id]
    assert len(rows) == 4  # and the default route

    # a duplicate is the controller's conflict
    err = cli.fail("-a", name, "route", "add", "http", f"example-{name}.test")
    assert err.startswith("conflict: ")

    out = cli.ok("-a", name, "route", "update", http_id, "-s", "other-web", "--sticky")
    assert out.stdout == f"updated {http_id}\n"
    r = api.get_route(name, http_id)
    assert (r["service"], r["sticky"]) == ("other-web", True)
    out = cli.ok("-a", name, "route", "update", tcp_id, "-s", "echo2")
    assert out.stdout == f"{tcp_id} listening on port {port}\n"
    assert api.get_route(name, tcp_id)["service"] == "echo2"
    assert cli.fail("-a", name, "route", "update", tcp_id) == "No service name given\n"

    # the `/` route cannot go while a path route needs it
    assert cli.fail("-a", name, "route", "remove", http_id).startswith("validation_error: ")
    for rid in (path_id, http_id, tcp_id):
        assert cli.ok("-a", name, "route", "remove", rid).stdout == f"Route {rid} removed.\n"
    assert {f"{r['type']}/{r['id']}" for r in api.route_list(name)}.isdisjoint(
        {http_id, path_id, tcp_id}
    )
    assert cli.fail("-a", name, "route", "remove", http_id) == "controller: resource not found\n"


# --------------------------------------------------------------------------------------------
# providers and resources


class _Provider(http.server.BaseHTTPRequestHandler):
    made: dict[str, dict[str, str]]
    deleted: list[str]

    def log_message(self, *a: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rid = uuid.uuid4().hex[:8]
        env = {"TESTDB_URL": f"testdb://db-{rid}", "TESTDB_NAME": f"db-{rid}"}
        self.made[rid] = env
        body = json.dumps({"id": rid, "env": env}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_DELETE(self) -> None:
        self.deleted.append(self.path.split("id=", 1)[-1])
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def provider_url() -> Iterator[str]:
    handler: Any = type("P", (_Provider,), {"made": {}, "deleted": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/databases"
    finally:
        server.shutdown()
        server.server_close()


def test_providers_and_resources(cli: Home, api: Client, provider_url: str):
    pname = unique("testdb")
    assert cli.ok("provider", "add", pname, provider_url).stderr == f"Created provider {pname}.\n"
    provider = api.get_provider(pname)
    listing = cli.ok("provider").stdout.splitlines()
    assert re.fullmatch(r"ID +NAME +URL", listing[0])
    assert [provider["id"], pname, provider_url] in [line.split() for line in listing[1:]]

    name = create(cli)
    assert cli.ok("-a", name, "resource").stdout.splitlines() == ["ID  Provider ID  Provider Name"]
    out = cli.ok("-a", name, "resource", "add", pname)
    m = re.fullmatch(rf"Created resource ({UUID}) and release ({UUID})\.\n", out.stderr)
    assert m, out.stderr
    res_id, rid = m.groups()
    (res,) = api.app_resource_list(name)
    assert res["id"] == res_id
    release = api.app_release(name)
    assert release["id"] == rid and release["env"] == res["env"]
    listing = cli.ok("-a", name, "resource").stdout.splitlines()
    assert listing[1].split() == [res_id, provider["id"], pname]

    cli.ok("-a", name, "env", "set", "TESTDB_NAME=changed-by-hand")
    out = cli.ok("-a", name, "resource", "remove", pname, res_id)
    m = re.fullmatch(rf"Deleted resource {res_id}, created release ({UUID})\.\n", out.stderr)
    assert m, out.stderr
    assert api.app_resource_list(name) == []
    # only the variables still as the resource set them are unset
    assert api.app_release(name)["env"] == {"TESTDB_NAME": "changed-by-hand"}

    # deleting an app deprovisions its resources
    cli.ok("-a", name, "resource", "add", pname)
    out = cli.ok("-a", name, "delete", "-y")
    assert out.stderr == f"Deleted {name} (removed 1 routes, deprovisioned 1 resources)\n"


# --------------------------------------------------------------------------------------------
# failures of the connection itself


def test_a_wrong_key_is_the_controllers_401(home: Home, controller: ControllerProcess):
    home.ok("cluster", "add", "--no-git", "bad", controller.url, "not-the-key")
    assert home.fail("apps") == f"GET {controller.url}/apps: unexpected status 401\n"


def test_cluster_add_with_git_fetches_the_ca(home: Home, controller: ControllerProcess):
    home.ok("cluster", "add", "test", controller.url, controller.key)
    ca = (home.path / ".flynn" / "ca-certs" / "test.pem").read_text()
    assert ca == controller.env["CA_CERT"]


# --------------------------------------------------------------------------------------------
# the client's event stream against the real controller


def test_event_streams_replay_after_last_event_id(cli: Home, api: Client):
    name = create(cli)
    for value in ("1", "2", "3"):
        cli.ok("-a", name, "env", "set", f"N={value}")
    listed = api.list_events(app_id=name, object_types=["app_release"])
    assert len(listed) == 3 and listed[0]["id"] > listed[-1]["id"]  # newest first
    oldest = listed[-1]["id"]
    with api.events(app_id=name, object_types=["app_release"], last_event_id=oldest) as stream:
        replayed = [stream.next(timeout=10) for _ in range(2)]
        assert [e["id"] for e in replayed] == [e["id"] for e in reversed(listed[:2])]
        assert replayed[-1]["data"]["release"]["env"] == {"N": "3"}
        # and then live events
        cli.ok("-a", name, "env", "set", "N=4")
        live = stream.next(timeout=10)
        assert live["object_type"] == "app_release" and live["id"] > replayed[-1]["id"]
        assert stream.last_event_id == live["id"]
    with api.events(app_id=name, object_types=["app_release"], past=True) as stream:
        assert stream.next(timeout=10)["id"] == oldest


def test_status(api: Client):
    assert api.status()["status"] == "healthy"
    assert api.ping()


def test_process_type_env(cli: Home, api: Client):
    name = create(cli)
    cli.ok(
        "-a", name, "release", "add", "-f", "/dev/stdin", IMAGE, input='{"processes":{"web":{}}}'
    )
    cli.ok("-a", name, "env", "set", "SHARED=1")
    cli.ok("-a", name, "env", "set", "-t", "web", "ONLY_WEB=2")
    release = api.app_release(name)
    assert release["env"] == {"SHARED": "1"}
    assert release["processes"]["web"]["env"] == {"ONLY_WEB": "2"}
    assert release["artifact"]  # kept from the release it was made from
    assert cli.ok("-a", name, "env", "-t", "web").stdout == "ONLY_WEB=2\nSHARED=1\n"
    assert cli.ok("-a", name, "env", "get", "-t", "web", "ONLY_WEB").stdout == "2\n"
    err = cli.fail("-a", name, "env", "get", "-t", "worker", "X")
    assert err == f'process type "worker" not found in release {release["id"]}\n'


def _self_signed(domain: str) -> tuple[str, str]:
    from flynn_host.dev.certs import self_signed

    return self_signed(domain, days=1)


def test_tls_routes(cli: Home, api: Client, tmp_path: Path):
    name = create(cli)
    domain = f"secure-{name}.test"
    cert, key = _self_signed(domain)
    (tmp_path / "cert.pem").write_text(cert)
    (tmp_path / "key.pem").write_text(key)
    out = cli.ok(
        "-a", name, "route", "add", "http",
        "-c", str(tmp_path / "cert.pem"), "-k", str(tmp_path / "key.pem"), domain,
    )  # fmt: skip
    rid = out.stdout.strip()
    route = api.get_route(name, rid)
    assert route["tls_cert"].strip() == cert.strip() and route["tls_key"].strip() == key.strip()
    assert f"https:{domain}" in cli.ok("-a", name, "route").stdout
    # `info` shows the first HTTP route (newest first), with https for a TLS one
    assert cli.ok("-a", name, "info").stdout.endswith(f"Web URL:  https://{domain}\n")

    # both from stdin: the PEM blocks are picked by type
    other = f"other-{name}.test"
    cert2, key2 = _self_signed(other)
    out = cli.ok(
        "-a", name, "route", "add", "http", "-c", "-", "-k", "-", other, input=key2 + cert2
    )
    route2 = api.get_route(name, out.stdout.strip())
    assert route2["tls_cert"].strip() == cert2.strip()
    assert route2["tls_key"].strip() == key2.strip()

    # as in the 2015 CLI, an update without -c/-k removes TLS
    cli.ok("-a", name, "route", "update", rid)
    assert not api.get_route(name, rid).get("tls_cert")
    err = cli.fail("-a", name, "route", "add", "http", "-c", str(tmp_path / "cert.pem"), "x.test")
    assert err == "Both the TLS certificate AND private key need to be specified\n"
