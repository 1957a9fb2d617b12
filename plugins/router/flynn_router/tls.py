"""TLS for the HTTPS listeners: one server context with the router's default certificate,
switched during the handshake (SNI) to the certificate of the route that serves the name the
client asked for.

ALPN offers only `http/1.1`: the data plane speaks HTTP/1.1, and a client that prefers h2
(every browser) must be told so in the handshake rather than fail afterwards. Certificates
and keys arrive as PEM text in route JSON; `ssl` loads them only from files, so they are
written to an anonymous in-memory file (memfd) that never appears in a directory, or, where
memfd is missing, to a private directory on tmpfs and deleted at once.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import warnings
from typing import Any

from flynn_router.table import RouteTable

log = logging.getLogger(__name__)

MAX_CONTEXTS = 4096  # per-route contexts kept; beyond that the cache starts over


class _SSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose `read`, `write` and `pending` are those of the C object it
    wraps: uvloop calls them for every TLS record, and the Python methods only pass their
    arguments on (a Python call less each)."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _SSLObject:
        self: _SSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        sslobj = self._sslobj  # type: ignore[attr-defined]
        self.read = sslobj.read  # type: ignore[method-assign]
        self.write = sslobj.write  # type: ignore[method-assign]
        self.pending = sslobj.pending  # type: ignore[method-assign]
        return self


class ServerTLS:
    """`context` is what the HTTPS listeners serve with. Per-route contexts are built on
    first use by the SNI callback and kept per (cert, key) text until the route that
    carried them goes away."""

    def __init__(self, table: RouteTable, cert_pem: str, key_pem: str, legacy: bool = False):
        self.table = table
        self.legacy = legacy
        self._contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self.context = self._make_context(cert_pem, key_pem)
        self.context.sni_callback = self._sni
        table.listeners.append(self._routes_changed)

    def context_for(self, cert_pem: str, key_pem: str) -> ssl.SSLContext:
        key = (cert_pem, key_pem)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.clear()
            ctx = self._contexts[key] = self._make_context(cert_pem, key_pem)
        return ctx

    def _make_context(self, cert_pem: str, key_pem: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.sslobject_class = _SSLObject
        if self.legacy:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # asked for by the operator
                ctx.minimum_version = ssl.TLSVersion.TLSv1
            # OpenSSL 3's default security level refuses TLS 1.0/1.1 outright
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        else:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        load_pem(ctx, cert_pem, key_pem)
        return ctx

    def _sni(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if not server_name:
            return
        route = self.table.tls_route(server_name)
        if route is None or not route.tls_cert or not route.tls_key:
            return
        try:
            sslobj.context = self.context_for(route.tls_cert, route.tls_key)
        except (ssl.SSLError, OSError, ValueError) as e:
            # a broken certificate on one route must not break the handshake: the default
            # certificate is served instead, as Flynn did
            log.warning("route %s: cannot load its certificate: %s", route.id, e)

    def _routes_changed(self, what: str) -> None:
        if what != "route" or not self._contexts:
            return
        live = {(r.tls_cert, r.tls_key) for r in self.table.routes.values() if r.tls_cert}
        for key in [k for k in self._contexts if k not in live]:
            del self._contexts[key]


def load_pem(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Load a certificate chain and its key from PEM text into `ctx`."""
    data = (cert_pem.strip() + "\n" + key_pem.strip() + "\n").encode()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("flynn-router-tls", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="flynn-router-tls-", dir=shm) as d:
        path = os.path.join(d, "pair.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
