"""The DNS layer on its own: a `DNSServer` on loopback answering from an in-memory registry view,
queried with the real `dig`, and forwarding other names to a tiny recursor started here (never
to an outside address)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from dnslib import EDNS0, OPCODE, QTYPE, RCODE, RR, A, DNSRecord
from flynn_discoverd.dns import DNSServer, _udp_limit, parse_recursor, system_recursors
from flynn_discoverd.types import Instance

from flynn_host.errors import not_found

pytestmark = pytest.mark.needs("dig")


class MemoryView:
    """The registry view as a dict: service -> instances, service -> leader."""

    def __init__(self) -> None:
        self.services: dict[str, list[Instance]] = {}
        self.leaders: dict[str, Instance] = {}

    async def instances(self, service: str) -> list[Instance] | None:
        return self.services.get(service)

    async def leader(self, service: str) -> Instance | None:
        return self.leaders.get(service)


class TinyRecursor:
    """A stand-in upstream resolver on 127.0.0.1 (UDP and TCP): `example.test A 192.0.2.7`,
    NXDOMAIN for everything else."""

    def __init__(self) -> None:
        self.port = 0
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def answer(self, data: bytes) -> bytes:
        self.queries += 1
        req = DNSRecord.parse(data)
        res = req.reply()
        if str(req.q.qname).lower() == "example.test." and req.q.qtype == QTYPE.A:
            res.add_answer(RR("example.test.", QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
        else:
            res.header.rcode = 3
        return res.pack()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        outer = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(outer.answer(data), addr)  # type: ignore[attr-defined]

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(n))
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
            writer.close()

        for _ in range(20):  # the free UDP port may be taken for TCP: pick another
            udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(serve, "127.0.0.1", port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise RuntimeError("no free port for the test recursor")

    async def stop(self) -> None:
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()


@dataclass
class Dig:
    status: str
    flags: set[str]
    answer: list[list[str]] = field(default_factory=list)
    authority: list[list[str]] = field(default_factory=list)
    additional: list[list[str]] = field(default_factory=list)

    def rdata(self, rtype: str) -> list[str]:
        return [" ".join(r[4:]) for r in self.answer if r[3] == rtype]


async def dig(port: int, name: str, qtype: str = "A", tcp: bool = False) -> Dig:
    """Run the real dig against the server (in a subprocess, so this loop keeps serving)."""
    args = ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=5", name, qtype]
    if tcp:
        args.append("+tcp")
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    status = re.search(r"status: (\w+)", text)
    flags = re.search(r";; flags: ([a-z ]+);", text)
    assert status and flags, text
    res = Dig(status.group(1), set(flags.group(1).split()))
    section: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith(";; ANSWER SECTION"):
            section = res.answer
        elif line.startswith(";; AUTHORITY SECTION"):
            section = res.authority
        elif line.startswith(";; ADDITIONAL SECTION"):
            section = res.additional
        elif not line.strip() or line.startswith(";"):
            section = None
        elif section is not None:
            section.append(line.split())
    return res


def inst(addr: str, proto: str = "tcp") -> Instance:
    return Instance(addr=addr, proto=proto)


@pytest.fixture
async def recursor() -> AsyncIterator[TinyRecursor]:
    r = TinyRecursor()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def view() -> MemoryView:
    v = MemoryView()
    v.services["web"] = [inst(f"10.0.0.{i}:80") for i in range(1, 6)]
    v.services["web"].append(inst("10.0.0.1:8080"))  # same IP as the first: one A record
    v.services["db"] = [inst("10.0.1.1:5432"), inst("10.0.1.2:5432"), inst("10.0.1.3:53", "udp")]
    v.services["v6"] = [inst("[fd00::1]:80")]
    v.services["empty"] = []
    v.leaders["db"] = v.services["db"][1]
    return v


@pytest.fixture
async def dns(view: MemoryView, recursor: TinyRecursor) -> AsyncIterator[DNSServer]:
    srv = DNSServer(view, [f"127.0.0.1:{recursor.port}"], recursor_timeout=0.5)
    await srv.start("127.0.0.1", 0)
    assert srv.port > 0
    yield srv
    await srv.stop()


async def test_service_a_dedups_shuffles_and_truncates_over_udp(dns: DNSServer) -> None:
    seen: set[tuple[str, ...]] = set()
    for _ in range(8):
        r = await dig(dns.port, "web.discoverd", "A")
        assert r.status == "NOERROR" and "aa" in r.flags
        ips = r.rdata("A")
        assert len(ips) == 3 and len(set(ips)) == 3
        assert set(ips) <= {f"10.0.0.{i}" for i in range(1, 6)}
        seen.add(tuple(ips))
    assert len(seen) > 1  # shuffled: 8 identical answers from 60 orderings would be a bug


async def test_service_a_over_tcp_gives_all(dns: DNSServer) -> None:
    r = await dig(dns.port, "WEB.discoverd", "A", tcp=True)  # names are case-insensitive
    assert sorted(r.rdata("A")) == [f"10.0.0.{i}" for i in range(1, 6)]


async def test_service_srv_targets_and_additional(dns: DNSServer, view: MemoryView) -> None:
    r = await dig(dns.port, "db.discoverd", "SRV", tcp=True)
    srv = sorted(r.rdata("SRV"))
    ids = {i.id: i for i in view.services["db"]}
    assert len(srv) == 3
    for rec in srv:
        prio, weight, port, target = rec.split()
        assert (prio, weight) == ("1", "1")
        iid = target.split(".")[0]
        assert target == f"{iid}.db._i.discoverd."
        assert int(port) == ids[iid].port
    extra = {r[0]: r[4] for r in r.additional if r[3] == "A"}
    assert extra == {f"{i.id}.db._i.discoverd.": i.host for i in view.services["db"]}
    udp = await dig(dns.port, "db.discoverd", "SRV")
    assert len(udp.rdata("SRV")) == 3 and not [x for x in udp.additional if x[3] == "A"]


async def test_srv_same_ip_keeps_each_port(dns: DNSServer) -> None:
    r = await dig(dns.port, "web.discoverd", "SRV", tcp=True)
    assert len(r.rdata("SRV")) == 6


async def test_rfc2782_srv_filtered_by_proto(dns: DNSServer, view: MemoryView) -> None:
    r = await dig(dns.port, "_db._udp.discoverd", "SRV", tcp=True)
    (rec,) = r.rdata("SRV")
    udp = view.services["db"][2]
    assert rec == f"1 1 53 {udp.id}.db._i.discoverd."
    r = await dig(dns.port, "_db._tcp.discoverd", "SRV", tcp=True)
    assert sorted(x.split()[2] for x in r.rdata("SRV")) == ["5432", "5432"]


async def test_any_gives_addresses_and_srv(dns: DNSServer) -> None:
    r = await dig(dns.port, "db.discoverd", "ANY", tcp=True)
    assert sorted(r.rdata("A")) == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
    assert len(r.rdata("SRV")) == 3


async def test_aaaa(dns: DNSServer) -> None:
    r = await dig(dns.port, "v6.discoverd", "AAAA")
    assert r.rdata("AAAA") == ["fd00::1"]
    r = await dig(dns.port, "v6.discoverd", "A")  # exists, no A record: empty, SOA in authority
    assert r.status == "NOERROR" and r.answer == [] and r.authority[0][3] == "SOA"


async def test_leader(dns: DNSServer, view: MemoryView) -> None:
    r = await dig(dns.port, "leader.db.discoverd", "A")
    assert r.rdata("A") == ["10.0.1.2"]
    r = await dig(dns.port, "leader.db.discoverd", "SRV", tcp=True)
    assert r.rdata("SRV") == ["1 1 5432 leader.db.discoverd."]
    assert [x[4] for x in r.additional if x[3] == "A"] == ["10.0.1.2"]
    r = await dig(dns.port, "leader.web.discoverd", "A")  # a service without a leader
    assert r.status == "NXDOMAIN"


async def test_instance_name(dns: DNSServer, view: MemoryView) -> None:
    target = view.services["web"][3]
    r = await dig(dns.port, f"{target.id}.web._i.discoverd", "A")
    assert r.rdata("A") == [target.host]
    r = await dig(dns.port, f"{'0' * 32}.web._i.discoverd", "A")
    assert r.status == "NXDOMAIN"


async def test_unknown_service_is_nxdomain_with_soa(dns: DNSServer) -> None:
    for name in ("nope.discoverd", "leader.nope.discoverd", "a.b.c.d.discoverd"):
        r = await dig(dns.port, name, "A")
        assert r.status == "NXDOMAIN" and "aa" in r.flags, name
        (soa,) = r.authority
        assert soa[0] == "discoverd." and soa[3] == "SOA"
        assert soa[4:6] == ["ns.discoverd.", "postmaster.discoverd."]
        assert soa[7:10] == ["3600", "600", "86400"]


async def test_known_empty_service_is_noerror(dns: DNSServer) -> None:
    r = await dig(dns.port, "empty.discoverd", "A")
    assert r.status == "NOERROR" and r.answer == [] and r.authority[0][3] == "SOA"
    r = await dig(dns.port, "empty.discoverd", "SOA")
    assert r.status == "NOERROR" and r.answer[0][3] == "SOA"


async def test_forwarding_udp_and_tcp(dns: DNSServer, recursor: TinyRecursor) -> None:
    for tcp in (False, True):
        r = await dig(dns.port, "example.test", "A", tcp=tcp)
        assert r.status == "NOERROR" and r.rdata("A") == ["192.0.2.7"]
    assert recursor.queries == 2
    r = await dig(dns.port, "other.test", "A")
    assert r.status == "NXDOMAIN"  # the recursor's answer, passed through


async def test_servfail_when_recursor_down(view: MemoryView) -> None:
    # one port that refuses (closed) and one that swallows queries (bound, never answers)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        recursors = [f"127.0.0.1:{closed}", f"127.0.0.1:{silent.getsockname()[1]}"]
        srv = DNSServer(view, recursors, recursor_timeout=0.3)
        await srv.start("127.0.0.1", 0)
        try:
            r = await dig(srv.port, "example.test", "A")
            assert r.status == "SERVFAIL"
            r = await dig(srv.port, "web.discoverd", "A")  # still serves its own zone
            assert r.status == "NOERROR"
        finally:
            await srv.stop()


async def test_next_recursor_answers(view: MemoryView, recursor: TinyRecursor) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{silent.getsockname()[1]}"
        srv = DNSServer(view, [dead, f"127.0.0.1:{recursor.port}"], recursor_timeout=0.3)
        await srv.start("127.0.0.1", 0)
        try:
            assert (await dig(srv.port, "example.test", "A")).rdata("A") == ["192.0.2.7"]
        finally:
            await srv.stop()


async def test_no_recursors_is_servfail(view: MemoryView) -> None:
    srv = DNSServer(view, [])
    await srv.start("127.0.0.1", 0)
    try:
        r = await dig(srv.port, "example.test", "A")
        assert r.status == "SERVFAIL"
        assert "ra" not in (await dig(srv.port, "web.discoverd", "A")).flags
    finally:
        await srv.stop()


async def test_registry_error_is_servfail(recursor: TinyRecursor) -> None:
    class Broken(MemoryView):
        async def instances(self, service: str) -> list[Instance] | None:
            raise RuntimeError("etcd is down")

    srv = DNSServer(Broken(), [f"127.0.0.1:{recursor.port}"])
    await srv.start("127.0.0.1", 0)
    try:
        assert (await dig(srv.port, "web.discoverd", "A")).status == "SERVFAIL"
    finally:
        await srv.stop()


async def test_view_raising_not_found_is_nxdomain(recursor: TinyRecursor) -> None:
    class StoreLike(MemoryView):  # the etcd store raises a 404 FlynnError for a missing service
        async def instances(self, service: str) -> list[Instance] | None:
            raise not_found(f"service {service!r} not found")

        async def leader(self, service: str) -> Instance | None:
            raise not_found(f"service {service!r} not found")

    srv = DNSServer(StoreLike(), [f"127.0.0.1:{recursor.port}"])
    await srv.start("127.0.0.1", 0)
    try:
        for name in ("web.discoverd", "leader.web.discoverd", "_web._tcp.discoverd"):
            assert (await dig(srv.port, name, "A")).status == "NXDOMAIN", name
    finally:
        await srv.stop()


async def test_stop_frees_port(view: MemoryView) -> None:
    srv = DNSServer(view, [])
    await srv.start("127.0.0.1", 0)
    port = srv.port
    await srv.stop()
    again = DNSServer(view, [])
    await again.start("127.0.0.1", port)
    await again.stop()


def test_recursor_parsing(tmp_path) -> None:
    assert parse_recursor("10.0.0.1") == ("10.0.0.1", 53)
    assert parse_recursor("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse_recursor("[fd00::1]:54") == ("fd00::1", 54)
    assert parse_recursor("fd00::1") == ("fd00::1", 53)
    with pytest.raises(ValueError):
        parse_recursor("not-an-ip:53")
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nsearch example\nnameserver 10.1.1.1\nnameserver fd00::53\n")
    assert system_recursors(str(conf)) == ["10.1.1.1:53", "[fd00::53]:53"]
    assert system_recursors(str(tmp_path / "missing")) == []
    default = DNSServer(MemoryView())  # recursors=None: the host's resolv.conf
    assert default.recursors == [parse_recursor(r) for r in system_recursors()]


async def test_malformed_and_unsupported_queries(view: MemoryView) -> None:
    srv = DNSServer(view, [])
    assert await srv.handle(b"\x00\x01garbage", tcp=False) is None
    notify = DNSRecord.question("web.discoverd")
    notify.header.opcode = OPCODE.NOTIFY
    res = DNSRecord.parse(await srv.handle(notify.pack(), tcp=False))
    assert res.header.rcode == RCODE.NOTIMP
    empty = DNSRecord()  # no question
    assert DNSRecord.parse(await srv.handle(empty.pack(), tcp=False)).header.rcode == RCODE.FORMERR
    q = DNSRecord.question("web.discoverd")
    assert _udp_limit(q) == 512
    q.add_ar(EDNS0(udp_len=4096))
    assert _udp_limit(q) == 4096
