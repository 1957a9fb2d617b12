"""discoverd's DNS server (Flynn's `discoverd/server/dns.go`; docs/discoverd.md#dns).

It answers authoritatively for `discoverd.` from a registry view — anything with the small
`RegistryView` protocol below, normally the etcd-backed store — and forwards every other name to
the host's recursors, so a job can use discoverd as its only resolver. Names served:

* `<svc>.discoverd` — A/AAAA/ANY/SRV of all instances (IPs de-duplicated, shuffled, at most three
  over UDP; SRV targets are `<id>.<svc>._i.discoverd`, with their addresses added over TCP);
* `_<svc>._<proto>.discoverd` — the same, restricted to instances of that proto (RFC 2782);
* `leader.<svc>.discoverd` — the service leader;
* `<id>.<svc>._i.discoverd` — one instance.

An unknown service is NXDOMAIN; an empty answer carries the zone's SOA in the authority section.
dnslib does the wire format; asyncio serves UDP and TCP on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import struct
import time
from pathlib import Path
from typing import Protocol

from dnslib import AAAA, QTYPE, RCODE, RR, SOA, SRV, A, DNSError, DNSLabel, DNSRecord

from flynn_discoverd.types import Instance
from flynn_host.errors import FlynnError

log = logging.getLogger(__name__)

DOMAIN = "discoverd."
MAX_UDP_RECORDS = 3  # Flynn's maxUDPRecords: keeps UDP answers small and spreads load
RECURSOR_TIMEOUT = 2.0  # seconds to wait for one recursor before trying the next
TCP_IDLE_TIMEOUT = 10.0  # a TCP client may send several queries; close it when idle this long
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

_ADDR_TYPES = (QTYPE.A, QTYPE.AAAA, QTYPE.ANY, QTYPE.SRV)


class RegistryView(Protocol):
    """What the DNS server needs from the registry."""

    async def instances(self, service: str) -> list[Instance] | None:
        """The live instances of `service`; None when the service does not exist."""
        ...

    async def leader(self, service: str) -> Instance | None:
        """The leader of `service`; None when it has none (or does not exist)."""
        ...


# A view may also say "unknown service" by raising a 404 FlynnError (as the store does).
# an invalid service name is a name no service can have: NXDOMAIN too
_NOT_FOUND = ("not_found", "object_not_found", "validation_error")


def system_recursors(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The `nameserver` lines of resolv.conf as `ip:53` (IPv6 as `[ip]:53`)."""
    out = []
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(format_hostport(parts[1], 53))
    return out


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_recursor(addr: str) -> tuple[str, int]:
    """`ip:port`, `[ip6]:port`, or a bare IP (port 53), as Flynn's validateRecursors accepts."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif addr.count(":") == 1:
        host, port_s = addr.split(":")
        port = int(port_s)
    else:
        host, port = addr, 53  # bare IPv4, or bare IPv6 (too many colons)
    ipaddress.ip_address(host)  # raises ValueError on a bad address: fail at start-up
    return host, port


class _Addr:
    """An instance's address split for DNS: the IP, its record type, the port and the id."""

    def __init__(self, inst: Instance) -> None:
        self.id = inst.id
        self.port = inst.port
        self.ip = ipaddress.ip_address(inst.host)
        self.qtype = QTYPE.A if self.ip.version == 4 else QTYPE.AAAA

    def record(self, name: str) -> RR:
        rdata = A(str(self.ip)) if self.ip.version == 4 else AAAA(str(self.ip))
        return RR(name, self.qtype, rdata=rdata)


def _addr(inst: Instance) -> _Addr | None:
    try:
        return _Addr(inst)
    except ValueError:  # a host name rather than an IP: nothing to put in an A record
        return None


class DNSServer:
    """`DNSServer(view, recursors)`: `await start(host, port)`, then `port` is the bound port
    (UDP and TCP share it; port 0 picks a free one); `await stop()` closes both.

    `recursors` is a list of `ip:port`; None means the host's /etc/resolv.conf nameservers and
    [] disables forwarding (names outside the domain then get SERVFAIL)."""

    def __init__(
        self,
        view: RegistryView,
        recursors: list[str] | None = None,
        *,
        domain: str = DOMAIN,
        recursor_timeout: float = RECURSOR_TIMEOUT,
    ) -> None:
        self.view = view
        self.recursors = [
            parse_recursor(r) for r in (system_recursors() if recursors is None else recursors)
        ]
        self.domain = DNSLabel(domain)
        self.recursor_timeout = recursor_timeout
        self.host = ""
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_proto: _UDPProtocol | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 53) -> None:
        loop = asyncio.get_running_loop()
        # with port 0 the kernel picks a free UDP port, which may be taken for TCP: try again
        for attempt in range(10 if port == 0 else 1):
            transport, proto = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(host, port)
            )
            bound = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                transport.close()
                if attempt == 9 or port != 0:
                    raise
                continue
            self._udp, self._udp_proto, self.host, self.port = transport, proto, host, bound
            return

    async def stop(self) -> None:
        if self._udp is not None and self._udp_proto is not None:
            self._udp.close()
            await self._udp_proto.closed  # the socket is released one loop turn after close()
            self._udp = self._udp_proto = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DNSServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- transports ------------------------------------------------------------------------

    async def _answer_udp(self, data: bytes, peer: tuple[str, int]) -> None:
        reply = await self.handle(data, tcp=False)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, peer)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                reply = await self.handle(data, tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ---- query handling --------------------------------------------------------------------

    async def handle(self, data: bytes, tcp: bool) -> bytes | None:
        """The packed reply to one packed query; None for a packet that is not DNS at all."""
        try:
            req = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError):
            return None
        if req.header.qr or not req.questions or req.header.opcode != 0:
            res = req.reply(ra=int(bool(self.recursors)), aa=0)
            res.header.rcode = RCODE.NOTIMP if req.header.opcode else RCODE.FORMERR
            return res.pack()
        if not req.q.qname.matchSuffix(self.domain):
            return await self.recurse(req, data, tcp)
        try:
            res = await self.lookup(req, tcp)
        except Exception:
            # Flynn answers NXDOMAIN here; SERVFAIL is the honest answer (and is not cached)
            log.exception("discoverd: dns: registry lookup failed for %s", req.q.qname)
            res = req.reply(ra=int(bool(self.recursors)))
            res.header.rcode = RCODE.SERVFAIL
        packed = res.pack()
        if not tcp and len(packed) > _udp_limit(req):
            packed = res.truncate().pack()  # TC set: the client asks again over TCP
        return packed

    async def recurse(self, req: DNSRecord, data: bytes, tcp: bool) -> bytes:
        """Forward the query unchanged to each recursor in turn (same transport as the client);
        the first answer wins. SERVFAIL when none answers."""
        for host, port in self.recursors:
            try:
                async with asyncio.timeout(self.recursor_timeout):
                    raw = await (_ask_tcp if tcp else _ask_udp)(host, port, data)
                if DNSRecord.parse(raw).header.id == req.header.id:
                    return raw
            except (OSError, TimeoutError, DNSError, struct.error, asyncio.IncompleteReadError):
                continue
        res = req.reply(ra=1, aa=0)
        res.header.rcode = RCODE.SERVFAIL
        return res.pack()

    async def lookup(self, req: DNSRecord, tcp: bool) -> DNSRecord:
        """Answer a query for a name inside the domain (the logic of Flynn's ServiceLookup)."""
        qname, qtype = req.q.qname, req.q.qtype
        labels = [
            lab.decode(errors="replace").lower()
            for lab in qname.label[: len(qname.label) - len(self.domain.label)]
        ]
        res = req.reply(ra=int(bool(self.recursors)), aa=1)
        res.header.rcode = await self._fill(res, labels, str(qname), qtype, tcp)
        if res.header.rcode == RCODE.NOERROR and qtype == QTYPE.SOA:
            res.rr = [self.soa()]
        if not res.rr:
            res.auth = [self.soa()]
        return res

    async def _fill(
        self, res: DNSRecord, labels: list[str], name: str, qtype: int, tcp: bool
    ) -> int:
        """Add the answer records to `res`; return the rcode."""
        service = proto = instance_id = ""
        leader = False
        if not labels:
            return RCODE.NOERROR  # the zone apex: only its SOA (added by the caller)
        if len(labels) == 1:
            service = labels[0]
        elif len(labels) == 2 and labels[0].startswith("_") and labels[1].startswith("_"):
            service, proto = labels[0][1:], labels[1][1:]
        elif len(labels) == 3 and labels[2] == "_i":
            service, instance_id = labels[1], labels[0]
        elif len(labels) == 2 and labels[0] == "leader":
            service, leader = labels[1], True
        else:
            return RCODE.NXDOMAIN

        if leader or instance_id:
            if leader:
                inst = await self._leader(service)
            else:
                insts = await self._instances(service)
                inst = next((i for i in insts or [] if i.id == instance_id), None)
            addr = _addr(inst) if inst is not None else None
            if addr is None:
                return RCODE.NXDOMAIN
            if qtype not in _ADDR_TYPES or qtype in (QTYPE.A, QTYPE.AAAA) and qtype != addr.qtype:
                return RCODE.NOERROR  # the name exists, but has no record of this type
            if qtype != QTYPE.SRV:
                res.add_answer(addr.record(name))
            if qtype in (QTYPE.SRV, QTYPE.ANY):
                res.add_answer(self._srv(name, addr, target=name))
            if tcp and qtype == QTYPE.SRV:
                res.add_ar(addr.record(name))
            return RCODE.NOERROR

        instances = await self._instances(service)
        if instances is None:
            return RCODE.NXDOMAIN
        if qtype == QTYPE.SOA:
            return RCODE.NOERROR

        addrs: list[_Addr] = []
        seen: set[str] = set()
        for inst in instances:
            if proto and inst.proto != proto:
                continue
            addr = _addr(inst)
            if addr is None or str(addr.ip) in seen:
                continue
            if qtype in (QTYPE.A, QTYPE.AAAA) and qtype != addr.qtype:
                continue
            if qtype != QTYPE.SRV:
                seen.add(str(addr.ip))  # SRV keeps every instance: same IP, different ports
            addrs.append(addr)
        random.shuffle(addrs)
        if not tcp:
            addrs = addrs[:MAX_UDP_RECORDS]

        if qtype in (QTYPE.ANY, QTYPE.A, QTYPE.AAAA):
            for addr in addrs:
                res.add_answer(addr.record(name))
        if qtype in (QTYPE.ANY, QTYPE.SRV):
            for addr in addrs:
                res.add_answer(self._srv(name, addr, target=self.instance_name(service, addr.id)))
        if qtype == QTYPE.SRV and tcp:
            for addr in addrs:
                res.add_ar(addr.record(self.instance_name(service, addr.id)))
        return RCODE.NOERROR

    async def _instances(self, service: str) -> list[Instance] | None:
        try:
            return await self.view.instances(service)
        except FlynnError as e:
            if e.code in _NOT_FOUND:
                return None
            raise

    async def _leader(self, service: str) -> Instance | None:
        try:
            return await self.view.leader(service)
        except FlynnError as e:
            if e.code in _NOT_FOUND:
                return None
            raise

    def instance_name(self, service: str, instance_id: str) -> str:
        return f"{instance_id}.{service}._i.{self.domain}"

    def _srv(self, name: str, addr: _Addr, target: str) -> RR:
        return RR(name, QTYPE.SRV, rdata=SRV(priority=1, weight=1, port=addr.port, target=target))

    def soa(self) -> RR:
        serial = int(time.time()) & 0xFFFFFFFF
        times = (serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, 0)
        mname, rname = f"ns.{self.domain}", f"postmaster.{self.domain}"
        return RR(self.domain, QTYPE.SOA, rdata=SOA(mname, rname, times))


def _udp_limit(req: DNSRecord) -> int:
    """The largest UDP reply the client accepts: 512, or its EDNS buffer size."""
    for rr in req.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, rr.rclass)
    return 512


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._spawn(self.server._answer_udp(data, addr))


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _ask_udp(host: str, port: int, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_OneReply, remote_addr=(host, port))
    try:
        transport.sendto(data)
        return await proto.reply
    finally:
        transport.close()


async def _ask_tcp(host: str, port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
