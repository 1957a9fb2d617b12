"""The routing table a router worker serves from: routes by domain and path (HTTP) and by
port (TCP), the backends of each service, and the choice of a backend for a request.

HTTP matching is Flynn's: the request's host (lower-cased, port stripped) is looked up as an
exact domain, then as wildcards `*.<suffix>` from the longest suffix (at most 5 labels), then
`*`; within the domain the route with the longest path prefix wins (a route's path always
ends in `/`; `/foo/` also takes `/foo`). Backends are chosen round robin, skipping for
REFUSED_SKIP seconds one that refused a connection (unless all did); a sticky route prefers
the backend the client's cookie names while that backend lives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flynn_router.types import Backend, Route

MAX_WILDCARD_LABELS = 5
REFUSED_SKIP = 5.0  # seconds a backend that refused a connection is passed over
HOST_CACHE_SIZE = 4096


class _Domain:
    """One domain's routes, longest path first."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def put(self, route: Route) -> None:
        self.routes = [r for r in self.routes if r.id != route.id and r.path != route.path]
        self.routes.append(route)
        self.routes.sort(key=lambda r: len(r.path), reverse=True)

    def drop(self, route_id: str) -> None:
        self.routes = [r for r in self.routes if r.id != route_id]

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            rp = route.path
            if path.startswith(rp) or (len(path) + 1 == len(rp) and rp.startswith(path)):
                return route
        return None


class _Service:
    __slots__ = ("backends", "leader", "next")

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.leader: str | None = None
        self.next = 0


class RouteTable:
    """Routes and backends, changed by the worker as the supervisor's updates arrive and read
    by every connection the worker serves. `listeners` are called after each change with the
    kind of change ("route" or "backends")."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.routes: dict[str, Route] = {}
        self._domains: dict[str, _Domain] = {}
        self._tcp: dict[int, Route] = {}
        self._services: dict[str, _Service] = {}
        self._refused: dict[str, float] = {}
        self._refused_until = 0.0  # when the last mark lapses
        self._clock = clock
        self.listeners: list[Callable[[str], None]] = []
        # the domains a Host header value searches, in order (exact, wildcards, `*`): every
        # request does this lookup, and a worker sees few distinct hosts
        self._host_domains: dict[str, tuple[_Domain, ...]] = {}

    # --- changes ---------------------------------------------------------------------------

    def set_route(self, route: Route) -> None:
        old = self.routes.get(route.id)
        if old is not None:
            self._unindex(old)
        self.routes[route.id] = route
        if route.type == "tcp":
            self._tcp[route.port] = route
        else:
            self._domains.setdefault(route.domain, _Domain()).put(route)
        self._changed("route")

    def remove_route(self, route_id: str) -> Route | None:
        route = self.routes.pop(route_id, None)
        if route is not None:
            self._unindex(route)
            self._changed("route")
        return route

    def replace_routes(self, routes: Iterable[Route]) -> None:
        """Every route at once (a worker's start, a resync with the controller)."""
        self.routes, self._domains, self._tcp = {}, {}, {}
        for route in routes:
            self.routes[route.id] = route
            if route.type == "tcp":
                self._tcp[route.port] = route
            else:
                self._domains.setdefault(route.domain, _Domain()).put(route)
        self._changed("route")

    def set_backends(self, service: str, backends: list[Backend], leader: str | None) -> None:
        svc = self._services.setdefault(service, _Service())
        svc.backends = list(backends)
        svc.leader = leader
        self._changed("backends")

    def _unindex(self, route: Route) -> None:
        if route.type == "tcp":
            if self._tcp.get(route.port) is route:
                del self._tcp[route.port]
        else:
            domain = self._domains.get(route.domain)
            if domain is not None:
                domain.drop(route.id)
                if not domain.routes:
                    del self._domains[route.domain]

    def _changed(self, what: str) -> None:
        if what == "route":
            self._host_domains = {}
        for listener in list(self.listeners):
            listener(what)

    # --- lookups ---------------------------------------------------------------------------

    def lookup(self, host: str, path: str) -> Route | None:
        """The HTTP route for a request's Host header and path, or None (404)."""
        domains = self._host_domains.get(host)
        if domains is None:
            domains = self._search(host)
            if len(self._host_domains) >= HOST_CACHE_SIZE:
                self._host_domains = {}  # Host headers are the clients' choice: bounded
            self._host_domains[host] = domains
        for domain in domains:
            route = domain.match(path)
            if route is not None:
                return route
        return None

    def _search(self, host: str) -> tuple[_Domain, ...]:
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        host = host.lower().rstrip(".")
        labels = host.split(".")
        wild = min(len(labels), MAX_WILDCARD_LABELS + 1)
        names = [host, *("*." + ".".join(labels[i:]) for i in range(1, wild)), "*"]
        return tuple(d for d in map(self._domains.get, names) if d is not None)

    def tls_route(self, server_name: str) -> Route | None:
        """The route whose certificate serves `server_name` (SNI): its `/` route, else any
        of the domain's routes with a certificate, with the same wildcard order as lookup."""
        server_name = server_name.lower().rstrip(".")
        labels = server_name.split(".")
        names = [server_name] + [
            "*." + ".".join(labels[i:]) for i in range(1, min(len(labels), MAX_WILDCARD_LABELS + 1))
        ]
        for name in [*names, "*"]:
            domain = self._domains.get(name)
            if domain is None:
                continue
            for route in reversed(domain.routes):  # shortest path (`/`) first
                if route.tls_cert:
                    return route
        return None

    def tcp_routes(self) -> dict[int, Route]:
        return dict(self._tcp)

    def tcp_route(self, port: int) -> Route | None:
        return self._tcp.get(port)

    def backends(self, route: Route) -> list[Backend]:
        """The live backends of a route: its service's instances, or only the leader."""
        svc = self._services.get(route.service)
        if svc is None:
            return []
        if route.leader:
            return [b for b in svc.backends if b.addr == svc.leader]
        return svc.backends

    def pick(self, route: Route, prefer: str | None = None) -> Backend | None:
        """The backend for a new request or connection on `route` (None: no backend, 503).
        `prefer` is a sticky cookie's backend address, honoured while that backend lives."""
        svc = self._services.get(route.service)
        if svc is None:
            return None
        backends = svc.backends
        if route.leader:
            backends = [b for b in backends if b.addr == svc.leader]
        if not backends:
            return None
        if prefer is not None:
            for b in backends:
                if b.addr == prefer:
                    return b
        n = len(backends)
        if not self._refused:
            b = backends[svc.next % n]
            svc.next = (svc.next + 1) % n
            return b
        now = self._clock()
        if now >= self._refused_until:
            self._refused.clear()  # every mark has lapsed
        for _ in range(n):
            b = backends[svc.next % n]
            svc.next = (svc.next + 1) % n
            until = self._refused.get(b.addr)
            if until is None or until <= now:
                return b
        return backends[svc.next % n]  # every backend refused lately: try one anyway

    def mark_refused(self, addr: str) -> None:
        """`addr` refused a connection: pass it over for REFUSED_SKIP seconds."""
        until = self._refused[addr] = self._clock() + REFUSED_SKIP
        self._refused_until = max(self._refused_until, until)
        if len(self._refused) > 4096:
            now = self._clock()
            self._refused = {a: t for a, t in self._refused.items() if t > now}

    def service_names(self) -> set[str]:
        return {r.service for r in self.routes.values()}
