"""HTTPS: the default certificate, route certificates chosen by SNI (exact, wildcard, the
controller's `certificate` object and the legacy `tls_cert`/`tls_key`), ALPN that answers
HTTP/1.1 even to clients preferring h2, the TLS version floor, and no HTTPS listener
without a default certificate."""

from __future__ import annotations

import asyncio
import json
import ssl
import warnings

import pytest
from flynn_router.table import RouteTable
from flynn_router.tls import ServerTLS
from flynn_router.types import Route

from flynn_host.dev.host import free_ports


def client_context(*certs: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata="\n".join(certs))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def common_name(writer: asyncio.StreamWriter) -> str:
    cert = writer.get_extra_info("peercert")
    return dict(x[0] for x in cert["subject"])["commonName"]


@pytest.fixture
async def tls_setup(start_worker, servers, make_route, make_cert_pair):
    """A worker with a default certificate and three routes with their own."""
    default = make_cert_pair("default.test")
    a = make_cert_pair("a.example.com")
    b = make_cert_pair("b.example.com")
    wild = make_cert_pair("*.wild.test", "wild.test")
    w = await start_worker(tls_cert=default[0], tls_key=default[1])
    await w.routes(
        make_route("a.example.com", "web", tls_cert=a[0], tls_key=a[1]),
        make_route("b.example.com", "web", certificate={"id": "c1", "cert": b[0], "key": b[1]}),
        make_route("*.wild.test", "web", tls_cert=wild[0], tls_key=wild[1]),
        make_route("plain.test", "web"),
    )
    await w.backends("web", await servers.named("web"))
    return w, {"default": default, "a": a, "b": b, "wild": wild}


async def test_sni_chooses_the_route_certificate(tls_setup, raw_client) -> None:
    w, certs = tls_setup
    ctx = client_context(*(c[0] for c in certs.values()))
    cases = [
        ("a.example.com", "a.example.com"),
        ("b.example.com", "b.example.com"),
        ("x.wild.test", "*.wild.test"),
        ("plain.test", "default.test"),  # a route without a certificate
        ("unknown.test", "default.test"),
    ]
    for name, cn in cases:
        ctx.check_hostname = cn != "default.test"
        c = await raw_client(w.https_port, ssl=ctx, server_hostname=name)
        assert common_name(c.writer) == cn, name
        await c.send(b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
        status, _, body = await c.response()
        if name == "unknown.test":
            assert status == 404
            continue
        assert status == 200
        headers = json.loads(body)["headers"]
        assert headers["X-Forwarded-Proto"] == "https"
        assert headers["X-Forwarded-Port"] == str(w.https_port)


async def test_no_sni_gets_the_default_certificate(tls_setup, raw_client) -> None:
    w, certs = tls_setup
    ctx = client_context(certs["default"][0])
    ctx.check_hostname = False
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="")
    assert common_name(c.writer) == "default.test"


async def test_alpn_answers_http11_to_h2_clients(tls_setup, raw_client) -> None:
    w, certs = tls_setup
    ctx = client_context(certs["a"][0], alpn=["h2", "http/1.1"])
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="a.example.com")
    assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    await c.send(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
    assert (await c.response())[0] == 200
    # on the default certificate as well
    ctx = client_context(certs["default"][0], alpn=["h2", "http/1.1"])
    ctx.check_hostname = False
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="unknown.test")
    assert c.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"


def old_tls_client(*certs: str) -> ssl.SSLContext:
    """A client that speaks only TLS 1.0 and 1.1."""
    ctx = client_context(*certs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def test_tls_below_1_2_is_refused(tls_setup, raw_client) -> None:
    w, certs = tls_setup
    ctx = old_tls_client(certs["a"][0])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await raw_client(w.https_port, ssl=ctx, server_hostname="a.example.com")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="a.example.com")
    assert c.writer.get_extra_info("ssl_object").version() == "TLSv1.2"


async def test_legacy_tls_accepts_tls_1_1(start_worker, raw_client, make_cert_pair) -> None:
    default = make_cert_pair("default.test")
    w = await start_worker(tls_cert=default[0], tls_key=default[1], legacy_tls=True)
    ctx = old_tls_client(default[0])
    ctx.check_hostname = False
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="x.test")
    assert c.writer.get_extra_info("ssl_object").version() == "TLSv1.1"


async def test_changed_and_broken_certificates(tls_setup, raw_client, make_route, make_cert_pair):
    w, certs = tls_setup
    renewed = make_cert_pair("a.example.com", "renewed")
    # a new certificate for a route is served from the next handshake on
    await w.send(
        op="set",
        route=make_route("a.example.com", "web", id="a", tls_cert=renewed[0], tls_key=renewed[1]),
    )
    await w.sync()
    ctx = client_context(renewed[0], certs["default"][0])
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="a.example.com")
    cert = c.writer.get_extra_info("peercert")
    assert ("DNS", "renewed") in cert["subjectAltName"]
    # a certificate that does not load: the handshake goes on with the default one
    await w.send(
        op="set",
        route=make_route("broken.test", "web", tls_cert="garbage", tls_key="more garbage"),
    )
    await w.sync()
    ctx.check_hostname = False
    c = await raw_client(w.https_port, ssl=ctx, server_hostname="broken.test")
    assert common_name(c.writer) == "default.test"
    assert w.alive()


async def test_no_default_certificate_no_https(start_worker, raw_client, make_route) -> None:
    w = await start_worker(https_ports=free_ports(1))
    with pytest.raises(ConnectionRefusedError):
        await raw_client(w.settings["https_ports"][0])
    await w.routes(make_route("example.com", "nobody"))
    c = await raw_client(w.http_port)
    await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (await c.response())[0] == 503


def test_route_contexts_are_cached_and_dropped_with_their_routes(make_cert_pair) -> None:
    table = RouteTable()
    default = make_cert_pair("default.test")
    a = make_cert_pair("a.example.com")
    tls = ServerTLS(table, *default)
    route = Route.from_json(
        {"type": "http", "id": "r", "service": "s", "domain": "a.example.com", "tls_cert": a[0],
         "tls_key": a[1]}
    )  # fmt: skip
    table.set_route(route)
    ctx = tls.context_for(a[0], a[1])
    assert tls.context_for(a[0], a[1]) is ctx
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    table.remove_route("r")
    assert tls.context_for(a[0], a[1]) is not ctx  # dropped with the route, built anew
    legacy = ServerTLS(RouteTable(), *default, legacy=True)
    assert legacy.context.minimum_version == ssl.TLSVersion.TLSv1
