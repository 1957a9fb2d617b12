"""The `flynn` command without a controller: usage and help as docopt gives them, commands
of later issues, `flynn cluster` on `~/.flynnrc`, `cluster add` fetching the CA from a small
canned server and configuring git, and the `git-credentials` helper (through real git)."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cli_home import FLYNN, Home
from flynn_cli.config import Config

CA_PEM = b"-----BEGIN CERTIFICATE-----\nMIIBcanned\n-----END CERTIFICATE-----\n"


def test_usage_errors_print_the_usage_and_exit_1(home: Home):
    err = home.fail()
    assert err.startswith("usage: flynn [-a <app>] [-c <cluster>] <command> [<args>...]")
    err = home.fail("env", "set")
    assert err.startswith("usage: flynn env [-t <proc>]\n")
    assert "Warning" not in err
    err = home.fail("route", "add", "udp")
    assert err.startswith("usage: flynn route\n")


def test_help(home: Home):
    out = home.ok("help").stdout
    assert out.startswith("usage: flynn [-a <app>]") and "route       manage routes" in out
    assert home.ok("--help").stdout.startswith("usage: flynn [-a <app>]")
    out = home.ok("help", "route").stdout
    assert out.startswith("usage: flynn route\n       flynn route add http")
    assert home.ok("route", "-h").stdout == out


def test_version(home: Home):
    from flynn_host import __version__

    assert home.ok("version").stdout == f"{__version__}\n"
    assert home.ok("--version").stdout == f"{__version__}\n"


@pytest.mark.parametrize("cmd", ["export", "import"])
def test_commands_of_later_issues_say_so(home: Home, cmd: str):
    assert home.fail(cmd) == f"'{cmd}' is not available in this version yet\n"


def test_unknown_commands(home: Home):
    assert home.fail("frobnicate") == "frobnicate is not a flynn command. See 'flynn help'\n"


def test_app_commands_need_a_cluster(home: Home):
    assert home.fail("-a", "web", "env") == "no clusters configured\n"
    assert home.fail("apps") == "no clusters configured\n"


def test_cluster_add_list_default_remove(home: Home):
    assert home.ok("cluster").stdout == "NAME  CONTROLLER URL  GIT URL\n"
    out = home.ok("cluster", "add", "--no-git", "dev", "dev.localflynn.com", "k1")
    assert out.stderr == 'Cluster "dev" added and set as default.\n'
    out = home.ok("cluster", "add", "--no-git", "-p", "cGlu", "local", "http://127.0.0.1:1", "k2")
    assert out.stderr == 'Cluster "local" added.\n'
    assert home.ok("cluster").stdout.splitlines() == [
        "NAME   CONTROLLER URL                         GIT URL",
        "dev    https://controller.dev.localflynn.com  https://git.dev.localflynn.com  (default)",
        "local  http://127.0.0.1:1                     http://git.127.0.0.1:1",
    ]
    assert home.flynnrc.read_text() == (
        'default = "dev"\n\n'
        "[[cluster]]\n"
        '  Name = "dev"\n'
        '  Key = "k1"\n'
        '  ControllerURL = "https://controller.dev.localflynn.com"\n'
        '  GitURL = "https://git.dev.localflynn.com"\n\n'
        "[[cluster]]\n"
        '  Name = "local"\n'
        '  Key = "k2"\n'
        '  TLSPin = "cGlu"\n'
        '  ControllerURL = "http://127.0.0.1:1"\n'
        '  GitURL = "http://git.127.0.0.1:1"\n\n'
    )
    err = home.fail("cluster", "add", "--no-git", "dev", "other.test", "k3")
    assert err == 'Cluster "dev" already exists in ~/.flynnrc\n'
    home.ok("cluster", "add", "--no-git", "-f", "-d", "dev", "other.test", "k3")
    assert home.ok("cluster", "default").stdout == (
        "NAME  URL\ndev   https://controller.other.test  (default)\n"
    )
    assert home.ok("cluster", "default", "local").stderr == '"local" is now the default cluster.\n'
    err = home.fail("cluster", "default", "nosuch")
    assert err == 'Cluster "nosuch" does not exist and cannot be set as default.\n'
    out = home.ok("cluster", "remove", "local")
    assert out.stderr == 'Cluster "local" removed and "dev" is now the default cluster.\n'
    assert home.ok("cluster", "remove", "nosuch").stderr == ""
    assert [c.name for c in Config.read(home.flynnrc).clusters] == ["dev"]
    assert home.fail("cluster", "backup") == "'cluster backup' is not supported yet\n"
    assert home.fail("cluster", "migrate-domain", "x.test").endswith("not supported yet\n")


def test_the_git_url_follows_the_controller_url(home: Home):
    home.ok("cluster", "add", "--no-git", "a", "http://controller.a.test:8080", "k")
    home.ok("cluster", "add", "--no-git", "--git-url", "http://g.b.test", "b", "http://b.test", "k")
    home.ok("cluster", "add", "--no-git", "c", "https://controller.c.test", "k")
    urls = [(c.controller_url, c.git_url) for c in Config.read(home.flynnrc).clusters]
    assert urls == [
        ("http://controller.a.test:8080", "http://git.a.test:8080"),
        ("http://b.test", "http://g.b.test"),
        ("https://controller.c.test", "https://git.c.test"),
    ]


# --------------------------------------------------------------------------------------------
# cluster add with git, against a canned controller that only knows /ca-cert


@dataclass
class CaCertServer:
    url: str
    auth: list[str] = field(default_factory=list)


@pytest.fixture
def ca_server() -> Iterator[CaCertServer]:
    seen = CaCertServer("")

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.auth.append(self.headers.get("Authorization", ""))
            if self.path != "/ca-cert":
                self.send_response(404)
                self.end_headers()
                return
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(b":k1").decode():
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-x509-ca-cert")
            self.send_header("Content-Length", str(len(CA_PEM)))
            self.end_headers()
            self.wfile.write(CA_PEM)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    server.daemon_threads = True
    seen.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()


def test_cluster_add_saves_the_ca_and_configures_git(home: Home, ca_server: CaCertServer):
    out = home.ok("cluster", "add", "dev", ca_server.url, "k1")
    assert out.stderr == 'Cluster "dev" added and set as default.\n'
    assert ca_server.auth == ["Basic " + base64.b64encode(b":k1").decode()]
    ca_file = home.path / ".flynn" / "ca-certs" / "dev.pem"
    assert ca_file.read_bytes() == CA_PEM
    git_url = "http://git." + ca_server.url.removeprefix("http://")
    assert home.git("config", "--global", f"http.{git_url}.sslCAInfo").strip() == str(ca_file)
    helper = home.git("config", "--global", f"credential.{git_url}.helper").strip()
    assert helper == f"{FLYNN} git-credentials"

    # git asks flynn for the password (the controller key) of that git host
    filled = home.git_input("credential", "fill", input=f"url={git_url}/web.git\n\n")
    assert "username=user\n" in filled and "password=k1\n" in filled

    # removing the cluster removes git's configuration for it
    home.ok("cluster", "remove", "dev")
    assert "credential" not in home.git("config", "--global", "--list")


def test_cluster_add_fails_when_the_ca_cannot_be_fetched(home: Home, ca_server: CaCertServer):
    err = home.fail("cluster", "add", "dev", ca_server.url, "wrong-key")
    assert (
        err == f"Error writing CA certificate: GET {ca_server.url}/ca-cert: unexpected status 401\n"
    )
    assert not home.flynnrc.exists()


def test_git_credentials_answers_only_for_a_clusters_git_host(home: Home):
    home.ok("cluster", "add", "--no-git", "a", "a.test", "ka")
    get = home.ok("git-credentials", "get", input="protocol=https\nhost=git.a.test\n\n").stdout
    assert get == "protocol=https\nusername=user\nhost=git.a.test\npassword=ka\n"
    for stdin in ("protocol=https\nhost=git.b.test\n\n", "protocol=http\nhost=git.a.test\n\n"):
        assert home.ok("git-credentials", "get", input=stdin).stdout == ""
    assert home.ok("git-credentials", "store", input="protocol=https\n\n").stdout == ""


def test_every_commands_usage_parses(home: Home):
    from flynn_cli.main import COMMANDS

    for cmd in COMMANDS:
        assert home.ok("help", cmd).stdout.startswith(f"usage: flynn {cmd}"), cmd
