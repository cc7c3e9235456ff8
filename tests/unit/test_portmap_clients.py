"""
Tests for the PCP, NAT-PMP and UPnP clients of p2pnat.portmap against fake
gateways on a task.Clock: what each asks, what it makes of the answers,
retransmission within the budget, and that every call ends within its
budget without an errback.  No sockets, no threads.

The fakes (FakeReactor, FakeGateway, FakeIGD) are shared with
test_portmap_mapper.
"""

import struct

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.portmap import common
from p2pnat.portmap.common import Mapping
from p2pnat.portmap.gateway import NatPmpClient, PcpClient
from p2pnat.portmap.upnp import UpnpClient
from tests.unit.test_portmap_codec import natpmp_map_response, pcp_map_response

LOCAL = "10.0.1.2"
GATEWAY = "10.0.1.1"
PUBLIC = "198.18.2.1"
RTT = 0.002


class FakePort:
    """A connected UDP port of the fake reactor."""

    def __init__(self, reactor, proto, number):
        self.reactor = reactor
        self.proto = proto
        self.number = number
        self.peer = None
        self.closed = False

    def connect(self, host, port):
        self.peer = (host, port)

    def getHost(self):
        return IPv4Address("UDP", LOCAL, self.number)

    def write(self, data, addr=None):
        assert not self.closed
        self.reactor.sent.append((data, addr or self.peer))
        gateway = self.reactor.gateway
        if gateway is None:
            return
        if addr is not None:  # unconnected: SSDP, multicast or unicast
            for reply in gateway.handle_ssdp(data, addr):
                self.reactor.callLater(RTT, self._deliver, reply, (GATEWAY, 1900))
            return
        if gateway.refuse:
            self.reactor.callLater(RTT, self._refused)
            return
        for reply in gateway.handle(data, self.number):
            self.reactor.callLater(RTT, self._deliver, reply, self.peer)

    def _deliver(self, data, source):
        if not self.closed:
            self.proto.datagramReceived(data, source)

    def _refused(self):
        if not self.closed:
            self.proto.connectionRefused()

    def stopListening(self):
        self.closed = True


class FakeReactor(task.Clock):
    """A Clock with listenUDP; datagrams go to ``gateway`` (or are lost)."""

    def __init__(self, gateway=None):
        super().__init__()
        self.gateway = gateway
        self.sent = []
        self.ports = []

    def listenUDP(self, port, proto, interface="", maxPacketSize=8192):
        p = FakePort(self, proto, 50000 + len(self.ports))
        self.ports.append(p)
        proto.makeConnection(p)
        return p

    def open_ports(self):
        return [p for p in self.ports if not p.closed]


class FakeGateway:
    """
    A PCP and NAT-PMP server (each switchable) that maps any internal port
    to ``next_port`` upwards, or answers ``refuse_with`` (a result code).
    ``mute`` drops requests without an answer.
    """

    def __init__(self, pcp=True, natpmp=True, ssdp=True):
        self.pcp = pcp
        self.natpmp = natpmp
        #: Whether an IGD answers SSDP searches, and its description's host.
        self.ssdp = ssdp
        self.ssdp_host = GATEWAY
        self.searches = []
        self.refuse = False
        self.mute = False
        self.refuse_with = 0
        self.epoch = 1000
        self.next_port = 30000
        self.mappings = {}  # (proto, internal port) -> (external port, lifetime, by)
        self.requests = []

    def _external(self, key, suggested):
        if key in self.mappings:
            return self.mappings[key][0]
        port = self.next_port
        self.next_port += 1
        return port

    def handle_ssdp(self, data, addr):
        self.searches.append((data, addr))
        if not self.ssdp or b"InternetGatewayDevice:1" not in data:
            return []
        return [b"NOTIFY * HTTP/1.1\r\nNT: upnp:rootdevice\r\n\r\n",
                (b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1"
                 b"\r\nLOCATION: http://%s:5000/rootDesc.xml\r\n\r\n" % self.ssdp_host.encode())]

    def handle(self, data, source_port):
        self.requests.append(data)
        if self.mute:
            return []
        version = data[0]
        if version == 2:
            if not self.pcp:
                if self.natpmp:
                    return [struct.pack("!BBHI", 0, 128 + data[1], 1, self.epoch)]
                return []
            return self._pcp(data)
        if version == 0 and self.natpmp:
            return self._natpmp(data)
        return []

    def _pcp(self, data):
        opcode = data[1]
        lifetime = struct.unpack_from("!I", data, 4)[0]
        if opcode == 0:
            return [struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, self.epoch) + bytes(12)]
        nonce = data[24:36]
        protocol, internal, suggested = struct.unpack_from("!B3xHH", data, 36)
        key = (protocol, internal)
        if self.refuse_with:
            return [pcp_map_response(result=self.refuse_with, lifetime=0, epoch=self.epoch,
                                     nonce=nonce, protocol=protocol, internal=internal,
                                     external=0, ip="0.0.0.0")]
        if lifetime == 0:
            self.mappings.pop(key, None)
            return [pcp_map_response(lifetime=0, epoch=self.epoch, nonce=nonce,
                                     protocol=protocol, internal=internal, external=0,
                                     ip="0.0.0.0")]
        external = self._external(key, suggested)
        self.mappings[key] = (external, lifetime, "pcp")
        return [pcp_map_response(lifetime=lifetime, epoch=self.epoch, nonce=nonce,
                                 protocol=protocol, internal=internal, external=external,
                                 ip=PUBLIC)]

    def _natpmp(self, data):
        opcode = data[1]
        if opcode == 0:
            return [struct.pack("!BBHI4s", 0, 128, 0, self.epoch, bytes([198, 18, 2, 1]))]
        _, _, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data)
        key = ({1: 17, 2: 6}[opcode], internal)
        if self.refuse_with:
            return [struct.pack("!BBHI", 0, 128 + opcode, self.refuse_with, self.epoch)]
        if lifetime == 0:
            self.mappings.pop(key, None)
            return [natpmp_map_response(opcode=opcode, epoch=self.epoch, internal=internal,
                                        external=0, lifetime=0)]
        external = self._external(key, suggested)
        self.mappings[key] = (external, lifetime, "nat-pmp")
        return [natpmp_map_response(opcode=opcode, epoch=self.epoch, internal=internal,
                                    external=external, lifetime=lifetime)]


class FakeIGD:
    """
    miniupnpc.UPnP's interface on a dict.  ``fail`` is the error text
    selecting the IGD raises (None: there is one); ``conflict`` holds external
    ports already taken by someone else; ``v2`` offers AddAnyPortMapping.
    """

    table = None  # shared by every instance a test makes (the router's table)

    def __init__(self, fail=None, v2=True, conflict=(), permanent_only=False):
        self.fail = fail
        self.v2 = v2
        self.conflict = set(conflict)
        self.permanent_only = permanent_only
        self.discoverdelay = None
        self.lanaddr = LOCAL
        self.table = {}
        self.calls = []

    def __call__(self):
        return self  # the factory: the client makes "a new" UPnP object

    def selectigd(self, location):
        self.calls.append(("select", location))
        if self.fail:
            raise Exception(self.fail)
        return location.replace("rootDesc.xml", "ctl/IPConn")

    def externalipaddress(self):
        return PUBLIC

    def addportmapping(self, eport, proto, host, iport, desc, remote, lease):
        self.calls.append(("add", eport, lease))
        if self.permanent_only and lease:
            raise Exception("OnlyPermanentLeasesSupported")
        if eport in self.conflict:
            raise Exception("ConflictInMappingEntry")
        self.table[eport] = (proto, host, iport, lease)
        return True

    def addanyportmapping(self, eport, proto, host, iport, desc, remote):
        if not self.v2:
            raise Exception("Invalid Action")
        port = max([eport, *self.conflict, *self.table]) + 1
        self.table[port] = (proto, host, iport, 0)
        return port

    def deleteportmapping(self, eport, proto):
        self.calls.append(("delete", eport))
        if self.table.pop(eport, None) is None:
            raise Exception("NoSuchEntryInArray")
        return True


def run_now(f, *args):
    """A runner that calls the blocking function at once (no thread)."""
    return defer.maybeDeferred(f, *args)


class Held:
    """A runner that holds every call until released (a slow router)."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def release(self):
        jobs, self.jobs = self.jobs, []
        for f, args, d in jobs:
            defer.maybeDeferred(f, *args).chainDeferred(d)


class PcpClientTests(SynchronousTestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.reactor = FakeReactor(self.gw)
        self.client = PcpClient(self.reactor, GATEWAY, nonce=bytes(range(12)))

    def test_grant(self):
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        attempt = self.successResultOf(d)
        self.assertEqual(attempt.mapping, Mapping("pcp", (PUBLIC, 30000), 4000, 7200.0, RTT))
        data, peer = self.reactor.sent[0]
        self.assertEqual(peer, (GATEWAY, 5351))
        # The client names the source address its connected socket has.
        self.assertEqual(data[20:24], bytes([10, 0, 1, 2]))
        self.assertEqual(self.reactor.open_ports(), [])

    def test_renew_and_delete_repeat_the_nonce(self):
        self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        d = self.client.request(4000, 7200, 1.0, external=(PUBLIC, 30000))
        self.reactor.advance(RTT)
        mapping = self.successResultOf(d).mapping
        self.assertEqual(mapping.external, (PUBLIC, 30000))
        d = self.client.delete(mapping, 1.0)
        self.reactor.advance(RTT)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.gw.mappings, {})
        nonces = {data[24:36] for data, _ in self.reactor.sent}
        self.assertEqual(nonces, {bytes(range(12))})
        self.assertEqual(struct.unpack_from("!I", self.reactor.sent[-1][0], 4)[0], 0)

    def test_refused_result(self):
        self.gw.refuse_with = 8
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).reason, "no-resources")

    def test_natpmp_only_gateway(self):
        self.gw.pcp = False
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).reason, "unsupported-version")

    def test_retransmits_within_budget_then_gives_up(self):
        self.gw.mute = True
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(0.999)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        self.assertEqual(self.successResultOf(d).reason, "no-answer")
        self.assertEqual(len(self.reactor.sent), 3)  # at 0, 0.25, 0.75
        self.assertEqual(self.reactor.open_ports(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_icmp_refused_ends_at_once(self):
        self.gw.refuse = True
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).reason, "refused")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_port_closed_by_the_reactor_is_refused(self):
        # What Twisted's epoll reactor does on an ICMP error.
        self.gw.mute = True
        d = self.client.request(4000, 7200, 1.0)
        port = self.reactor.ports[0]
        port.closed = True
        port.proto.doStop()
        self.assertEqual(self.successResultOf(d).reason, "refused")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_foreign_and_malformed_answers_are_ignored(self):
        self.gw.mute = True
        d = self.client.request(4000, 7200, 1.0)
        proto = self.reactor.ports[0].proto
        for data in (b"\x02\x81junk", pcp_map_response(nonce=bytes(12)),
                     struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 5) + bytes(12)):
            proto.datagramReceived(data, (GATEWAY, 5351))
        self.assertNoResult(d)
        proto.datagramReceived(pcp_map_response(nonce=bytes(range(12))), (GATEWAY, 5351))
        self.assertEqual(self.successResultOf(d).mapping.external, ("198.18.2.1", 4000))

    def test_epoch_restart_is_reported(self):
        self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        self.gw.epoch = 2  # went back: the gateway restarted
        d = self.client.request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        self.assertTrue(self.successResultOf(d).restarted)

    def test_cancel(self):
        self.gw.mute = True
        d = self.client.request(4000, 7200, 1.0)
        d.cancel()
        self.assertEqual(self.successResultOf(d).reason, "cancelled")
        self.assertEqual(self.reactor.open_ports(), [])

    def test_announce(self):
        d = self.client.announce(1.0)
        self.reactor.advance(RTT)
        self.assertTrue(self.successResultOf(d))
        self.gw.pcp = False
        d = self.client.announce(1.0)
        self.reactor.advance(RTT)
        self.assertFalse(self.successResultOf(d))


class NatPmpClientTests(SynchronousTestCase):
    def setUp(self):
        self.gw = FakeGateway(pcp=False)
        self.reactor = FakeReactor(self.gw)
        self.client = NatPmpClient(self.reactor, GATEWAY)

    def test_grant_with_address(self):
        d = self.client.request(4000, 3600, 1.0)
        self.reactor.advance(RTT)
        attempt = self.successResultOf(d)
        self.assertEqual(attempt.mapping, Mapping("nat-pmp", (PUBLIC, 30000), 4000, 3600.0, RTT))
        self.assertEqual({data[:2] for data, _ in self.reactor.sent}, {b"\x00\x00", b"\x00\x01"})

    def test_tcp(self):
        client = NatPmpClient(self.reactor, GATEWAY, transport="tcp")
        d = client.request(22, 3600, 1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).mapping.external, (PUBLIC, 30000))
        self.assertIn((6, 22), self.gw.mappings)

    def test_delete(self):
        d = self.client.request(4000, 3600, 1.0)
        self.reactor.advance(RTT)
        d = self.client.delete(self.successResultOf(d).mapping, 1.0)
        self.reactor.advance(RTT)
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.gw.mappings, {})

    def test_refused(self):
        self.gw.refuse_with = 2
        d = self.client.request(4000, 3600, 1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d).reason, "not-authorized")

    def test_nothing_there(self):
        self.gw.natpmp = False
        d = self.client.request(4000, 3600, 1.0)
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d).reason, "no-answer")
        self.assertEqual(self.reactor.open_ports(), [])

    def test_bad_transport(self):
        self.assertRaises(ValueError, NatPmpClient, self.reactor, GATEWAY, "sctp")


class UpnpClientTests(SynchronousTestCase):
    def setUp(self):
        self.gw = FakeGateway()
        self.reactor = FakeReactor(self.gw)
        self.igd = FakeIGD()

    def tearDown(self):
        self.assertEqual(self.reactor.open_ports(), [])

    def client(self, run=run_now, gateway=GATEWAY):
        return UpnpClient(self.reactor, gateway, run=run, igd_factory=self.igd)

    def request(self, client, *args, **kw):
        d = client.request(*args, **kw)
        self.reactor.advance(RTT)
        return self.successResultOf(d)

    def test_grant_and_delete(self):
        client = self.client()
        attempt = self.request(client, 4000, 7200, 1.0)
        self.assertEqual(attempt.mapping, Mapping("upnp", (PUBLIC, 4000), 4000, 7200.0, RTT))
        self.assertEqual(self.igd.table, {4000: ("UDP", LOCAL, 4000, 7200)})
        self.assertEqual(self.igd.calls[0], ("select", "http://10.0.1.1:5000/rootDesc.xml"))
        # One search per IGD version, to the SSDP group and to the gateway.
        self.assertEqual(sorted({addr for _, addr in self.gw.searches}),
                         [(GATEWAY, 1900), ("239.255.255.250", 1900)])
        self.assertEqual(len(self.gw.searches), 4)
        self.assertTrue(self.successResultOf(client.delete(attempt.mapping, 1.0)))
        self.assertEqual(self.igd.table, {})

    def test_renewal_reuses_the_igd(self):
        client = self.client()
        self.request(client, 4000, 7200, 1.0)
        self.successResultOf(client.request(4000, 7200, 1.0, external=(PUBLIC, 4000)))
        self.assertEqual(len(self.gw.searches), 4)
        self.assertEqual(self.igd.calls.count(("add", 4000, 7200)), 2)

    def test_conflict_v2_any_port(self):
        self.igd.conflict = {4000}
        self.assertEqual(self.request(self.client(), 4000, 7200, 1.0).mapping.external,
                         (PUBLIC, 4001))

    def test_conflict_v1_other_port(self):
        self.igd.conflict = {4000}
        self.igd.v2 = False
        port = self.request(self.client(), 4000, 7200, 1.0).mapping.external[1]
        self.assertNotEqual(port, 4000)
        self.assertTrue(1024 <= port <= 65535)
        self.assertEqual(self.igd.table[port][2], 4000)

    def test_permanent_leases_only(self):
        self.igd.permanent_only = True
        self.assertEqual(self.request(self.client(), 4000, 7200, 1.0).mapping.lifetime, 7200.0)
        self.assertEqual(self.igd.table[4000][3], 0)

    def test_no_igd_answers(self):
        self.gw.ssdp = False
        d = self.client().request(4000, 7200, 1.0)
        self.reactor.advance(0.6)
        attempt = self.successResultOf(d)
        self.assertEqual((attempt.mapping, attempt.reason), (None, "no-igd"))
        self.assertEqual(self.igd.calls, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_not_an_igd(self):
        self.igd.fail = "No UPnP device discovered"
        attempt = self.request(self.client(), 4000, 7200, 1.0)
        self.assertEqual((attempt.mapping, attempt.reason), (None, "No UPnP device discovered"))

    def test_igd_elsewhere_than_the_gateway_is_ignored(self):
        self.gw.ssdp_host = "10.0.1.7"
        d = self.client().request(4000, 7200, 1.0)
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d).reason, "no-igd")
        self.assertEqual(self.igd.table, {})

    def test_without_a_known_gateway_any_igd(self):
        self.gw.ssdp_host = "10.0.1.7"
        attempt = self.request(self.client(gateway=None), 4000, 7200, 1.0)
        self.assertEqual(attempt.mapping.protocol, "upnp")

    def test_late_grant_is_deleted(self):
        held = Held()
        client = self.client(run=held)
        d = client.request(4000, 7200, 1.0)
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d).reason, "no-answer")
        held.release()  # the router answers after the budget: map, then delete
        held.release()
        self.assertEqual(self.igd.table, {})
        self.assertIn(("delete", 4000), self.igd.calls)

    def test_cancel_gives_up(self):
        held = Held()
        d = self.client(run=held).request(4000, 7200, 1.0)
        self.reactor.advance(RTT)
        d.cancel()
        self.assertEqual(self.successResultOf(d).reason, "no-answer")
        held.release()
        held.release()
        self.assertEqual(self.igd.table, {})

    def test_without_miniupnpc(self):
        client = UpnpClient(self.reactor, GATEWAY, run=run_now)
        client._factory = None
        self.assertEqual(self.successResultOf(client.request(4000, 60, 1.0)).reason,
                         "no-miniupnpc")
        self.assertIsNone(self.successResultOf(client.external_address(1.0)))

    def test_external_address(self):
        d = self.client().external_address(1.0)
        self.reactor.advance(RTT)
        self.assertEqual(self.successResultOf(d), PUBLIC)
        self.igd.fail = "nothing"
        d = self.client().external_address(1.0)
        self.reactor.advance(RTT)
        self.assertIsNone(self.successResultOf(d))


class GatewayRouteTests(SynchronousTestCase):
    ROUTE = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0101000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    )

    def test_lowest_metric_default(self):
        self.assertEqual(common.parse_default_gateway(self.ROUTE), "10.0.1.1")

    def test_none(self):
        self.assertIsNone(common.parse_default_gateway(self.ROUTE.splitlines()[0]))
        self.assertIsNone(common.parse_default_gateway("garbage\nx y z\n\x00"))
        self.assertIsNone(common.default_gateway("/nonexistent/route"))

    def test_check_gateway(self):
        self.assertEqual(common.check_gateway("10.0.1.1"), "10.0.1.1")
        self.assertRaises(ValueError, common.check_gateway, "gateway.local")
