"""`flynn route`: an app's HTTP and TCP routes (list, add, update, remove).

A route's id on the command line is `<type>/<uuid>` (`http/…`, `tcp/…`), as the controller's
routes API addresses it.
"""

from __future__ import annotations

import base64
import re
import sys
import urllib.parse
from typing import Any

from flynn_cli.context import Context
from flynn_cli.output import CommandError, TabWriter

Args = dict[str, Any]

ROUTE_USAGE = """
usage: flynn route
       flynn route add http [-s <service>] [-c <tls-cert> -k <tls-key>] [--sticky] <domain>
       flynn route add tcp [-s <service>] [-p <port>]
       flynn route update <id> [-s <service>] [-c <tls-cert> -k <tls-key>] [--sticky] [--no-sticky]
       flynn route remove <id>

Manage routes for application.

Options:
	-s, --service=<service>    service name to route domain to (defaults to APPNAME-web)
	-c, --tls-cert=<tls-cert>  path to PEM encoded certificate for TLS, - for stdin (http only)
	-k, --tls-key=<tls-key>    path to PEM encoded private key for TLS, - for stdin (http only)
	--sticky                   enable cookie-based sticky routing (http only)
	--no-sticky                disable cookie-based sticky routing (update http only)
	-p, --port=<port>          port to accept traffic on (tcp only)

Commands:
	With no arguments, shows a list of routes.

	add     adds a route to an app
	update  updates a route's service, TLS certificate or stickiness
	remove  removes a route

Examples:

	$ flynn route add http example.com

	$ flynn route add http example.com/path/

	$ flynn route add tcp
"""

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def route_body(route: dict[str, Any]) -> dict[str, Any]:
    """A route as Go's `router.Route` marshals it: `type`, `service` and the times always
    (Go's zero time when unset), the other fields only when set."""
    body: dict[str, Any] = {"type": route.get("type", "")}
    for k in ("id", "parent_ref"):
        if route.get(k):
            body[k] = route[k]
    body["service"] = route.get("service", "")
    body["created_at"] = route.get("created_at") or GO_ZERO_TIME
    body["updated_at"] = route.get("updated_at") or GO_ZERO_TIME
    for k in ("domain", "tls_cert", "tls_key", "sticky", "path", "port"):
        if route.get(k):
            body[k] = route[k]
    return body


def formatted_id(route: dict[str, Any]) -> str:
    return f"{route.get('type', '')}/{route.get('id', '')}"


def run_route(args: Args, ctx: Context) -> None:
    if args["add"]:
        if args["http"]:
            run_route_add_http(args, ctx)
        else:
            run_route_add_tcp(args, ctx)
        return
    if args["update"]:
        typ = args["<id>"].split("/")[0]
        if typ == "http":
            run_route_update_http(args, ctx)
        elif typ == "tcp":
            run_route_update_tcp(args, ctx)
        else:
            raise CommandError(f"Route type {typ} not supported.")
        return
    if args["remove"]:
        app = ctx.app()
        ctx.client.delete_route(app, args["<id>"])
        print(f"Route {args['<id>']} removed.")
        return
    app = ctx.app()
    routes = ctx.client.route_list(app)
    with TabWriter() as w:
        w.row("ROUTE", "SERVICE", "ID", "STICKY", "PATH")
        for r in routes:
            sticky = path = ""
            if r.get("type") == "tcp":
                route = f"tcp:{r.get('port', 0)}"
            else:
                protocol = "https" if r.get("tls_cert") else "http"
                route = f"{protocol}:{r.get('domain', '')}"
                sticky = "true" if r.get("sticky") else "false"
                path = r.get("path", "")
            w.row(route, r.get("service", ""), formatted_id(r), sticky, path)


def _port(args: Args) -> int:
    if not args["--port"]:
        return 0
    try:
        return int(args["--port"])
    except ValueError:
        raise CommandError(
            f'strconv.ParseInt: parsing "{args["--port"]}": invalid syntax'
        ) from None


def run_route_add_tcp(args: Args, ctx: Context) -> None:
    app = ctx.app()
    service = args["--service"] or f"{app}-web"
    route: dict[str, Any] = {"type": "tcp", "service": service, "port": _port(args)}
    created = ctx.client.create_route(app, route_body(route))
    print(f"{formatted_id(created)} listening on port {created.get('port', 0)}")


def run_route_add_http(args: Args, ctx: Context) -> None:
    app = ctx.app()
    service = args["--service"] or f"{app}-web"
    tls_cert, tls_key = read_tls_cert(args)
    u = urllib.parse.urlsplit("http://" + args["<domain>"])
    if not u.netloc:
        raise CommandError(f"Failed to parse {args['<domain>']} as URL")
    route = {
        "type": "http",
        "service": service,
        "domain": u.netloc,
        "path": u.path,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "sticky": bool(args["--sticky"]),
    }
    created = ctx.client.create_route(app, route_body(route))
    print(formatted_id(created))


def run_route_update_tcp(args: Args, ctx: Context) -> None:
    app = ctx.app()
    route_id = args["<id>"]
    route = ctx.client.get_route(app, route_id)
    if not args["--service"]:
        raise CommandError("No service name given")
    route["service"] = args["--service"]
    updated = ctx.client.update_route(app, route_id, route_body(route)) or route
    print(f"{formatted_id(updated)} listening on port {updated.get('port', 0)}")


def run_route_update_http(args: Args, ctx: Context) -> None:
    app = ctx.app()
    route_id = args["<id>"]
    route = ctx.client.get_route(app, route_id)
    if args["--service"]:
        route["service"] = args["--service"]
    # as in the 2015 CLI, the certificate is always replaced: leaving -c/-k out removes TLS
    route["tls_cert"], route["tls_key"] = read_tls_cert(args)
    if args["--sticky"]:
        route["sticky"] = True
    elif args["--no-sticky"]:
        route["sticky"] = False
    updated = ctx.client.update_route(app, route_id, route_body(route)) or route
    print(f"updated {formatted_id(updated)}")


# --------------------------------------------------------------------------------------------
# TLS certificate and key files

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)


def _pem_blocks(data: str, typ: str) -> str:
    """The PEM blocks of type `typ` in `data`, re-encoded (headers dropped, as Go's
    pem.Encode of a decoded block without headers)."""
    out = []
    for m in _PEM_BLOCK.finditer(data):
        if m.group(1) != typ:
            continue
        lines = [ln for ln in m.group(2).splitlines() if ln and ":" not in ln]
        try:
            der = base64.b64decode("".join(lines))
        except ValueError:
            continue
        b64 = base64.b64encode(der).decode()
        body = "".join(b64[i : i + 64] + "\n" for i in range(0, len(b64), 64))
        out.append(f"-----BEGIN {typ}-----\n{body}-----END {typ}-----\n")
    return "".join(out)


def read_tls_cert(args: Args) -> tuple[str, str]:
    """The `-c`/`-k` certificate and key (files, or `-` for PEM blocks on stdin)."""
    cert_path = args["--tls-cert"] or ""
    key_path = args["--tls-key"] or ""
    if cert_path and key_path:
        stdin = ""
        if cert_path == "-" or key_path == "-":
            try:
                stdin = sys.stdin.read()
            except OSError as e:
                raise CommandError(f"Failed to read from stdin: {e}") from None

        def read(typ: str, path: str, what: str) -> str:
            if path == "-":
                blocks = _pem_blocks(stdin, typ)
                if not blocks:
                    raise CommandError(f"Failed to read TLS {what}: No PEM blocks found in stdin")
                return blocks
            try:
                with open(path) as f:
                    return f.read()
            except OSError as e:
                msg = f"Failed to read TLS {what}: open {path}: {e.strerror}"
                raise CommandError(msg) from None

        return read("CERTIFICATE", cert_path, "cert"), read("PRIVATE KEY", key_path, "key")
    if cert_path or key_path:
        raise CommandError("Both the TLS certificate AND private key need to be specified")
    return "", ""
