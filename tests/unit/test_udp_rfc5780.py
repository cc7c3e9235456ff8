"""
RFC 5780 on the daemons' UDP sockets: a STUN CHANGE-REQUEST is answered
from the sibling socket with the other port and/or IP, with RESPONSE-ORIGIN
and OTHER-ADDRESS; without a suitable sibling the answer stays a 420.
Fake transports on a L{Clock}, no sockets.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.daemon.metrics import Metrics
from p2pnat.net.udp import ControlProtocol, link_siblings
from p2pnat.protocol import stun, wire
from p2pnat.protocol.stun import Attr, MessageClass
from tests.support.udp import FakeUDPTransport

A1, A2 = "198.18.1.1", "198.18.1.2"
P1, P2 = 3478, 3479
CLIENT = ("203.0.113.7", 40000)


class NoHandler:
    def key_for(self, key_id, mtype):
        return None


class Daemon:
    """A daemon's sockets at C{addresses}, linked as siblings."""

    def __init__(self, addresses, link=True, stun_rate=20.0):
        self.clock = Clock()
        self.metrics = Metrics("lobby")
        replay = wire.ReplayGuard(self.clock)
        self.sockets = {}
        for host, port in addresses:
            proto = ControlProtocol(NoHandler(), self.clock, self.metrics, replay,
                                    name="lobby.udp", stun_rate=stun_rate)
            proto.makeConnection(FakeUDPTransport(None, host, port))
            self.sockets[(host, port)] = proto
        if link:
            self.siblings = link_siblings(list(self.sockets.values()))

    def ask(self, at, change_ip=False, change_port=False, source=CLIENT, classic=False,
            empty_change=False):
        """
        Send a Binding request to socket C{at}; return C{(socket the answer
        left from, the answer's raw bytes, transaction id)}, or None.
        """
        if classic or empty_change:
            tid = bytes(range(16 if classic else 12))
            attrs = [(Attr.CHANGE_REQUEST, stun.encode_change_request(change_ip, change_port))]
            data = stun.encode_message(stun.Message(stun.Method.BINDING, MessageClass.REQUEST,
                                                    tid, attrs))
        else:
            tid, data = stun.binding_request(change_ip=change_ip, change_port=change_port)
        for proto in self.sockets.values():
            if proto.transport:
                proto.transport.written.clear()
        self.sockets[at].datagramReceived(data, source)
        out = [(addr, proto.transport.written[0]) for addr, proto in self.sockets.items()
               if proto.transport and proto.transport.written]
        if not out:
            return None
        [(origin, (answer, dest))] = out
        assert dest == source, dest
        return origin, answer, tid


class ChangeRequestTests(SynchronousTestCase):
    FOUR = [(A1, P1), (A1, P2), (A2, P1), (A2, P2)]

    def test_siblings_mapping(self):
        d = Daemon(self.FOUR)
        self.assertEqual(sorted(d.siblings), sorted(self.FOUR))
        for proto in d.sockets.values():
            self.assertIs(proto.siblings, d.siblings)

    def test_answered_from_the_sibling_asked_for(self):
        """
        Each of the four flag combinations, at each of the four sockets:
        the answer leaves from the socket with the other IP and/or port,
        says where it left from and names the alternate address.
        """
        d = Daemon(self.FOUR)
        for host, port in self.FOUR:
            other_host = A2 if host == A1 else A1
            other_port = P2 if port == P1 else P1
            for change_ip in (False, True):
                for change_port in (False, True):
                    origin, answer, tid = d.ask((host, port), change_ip, change_port,
                                                empty_change=not (change_ip or change_port))
                    want = (other_host if change_ip else host, other_port if change_port else port)
                    self.assertEqual(origin, want, (host, port, change_ip, change_port))
                    result = stun.parse_binding_response(answer, tid)
                    self.assertEqual(result.mapped, CLIENT)
                    self.assertEqual(result.response_origin, want)
                    self.assertEqual(result.other_address, (other_host, other_port))
        self.assertEqual(
            d.metrics.packets_out.labels("stun")._value.get(), 16)

    def test_plain_request_advertises_other_address(self):
        """
        Without CHANGE-REQUEST the answer comes from this socket and, as
        RFC 5780 asks, names it and the alternate address (more in
        tests.unit.test_stun_rfc5780).
        """
        d = Daemon(self.FOUR)
        origin, answer, tid = d.ask((A1, P1))
        self.assertEqual(origin, (A1, P1))
        self.assertEqual(len(answer), 64)  # XOR-MAPPED-ADDRESS, two addresses, FINGERPRINT
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, (A1, P1), (A2, P2)))

    def test_one_ip_two_ports(self):
        """
        Two ports on one IP: change-port is honoured (no OTHER-ADDRESS: no
        alternate IP), change-IP gets the 420 of a server that cannot.
        """
        d = Daemon([(A1, P1), (A1, P2)])
        origin, answer, tid = d.ask((A1, P1), change_port=True)
        self.assertEqual(origin, (A1, P2))
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, (A1, P2), None))
        for flags in ((True, False), (True, True)):
            origin, answer, tid = d.ask((A1, P2), *flags)
            self.assertEqual(origin, (A1, P2))
            with self.assertRaises(stun.StunErrorResponse) as cm:
                stun.parse_binding_response(answer, tid)
            self.assertEqual((cm.exception.code, cm.exception.unknown),
                             (420, (Attr.CHANGE_REQUEST,)))

    def test_two_ips_one_port(self):
        d = Daemon([(A1, P1), (A2, P1)])
        origin, answer, tid = d.ask((A2, P1), change_ip=True)
        self.assertEqual(origin, (A1, P1))
        self.assertEqual(stun.parse_binding_response(answer, tid).response_origin, (A1, P1))
        self.assertIsNone(stun.parse_binding_response(answer, tid).other_address)
        origin, answer, _ = d.ask((A2, P1), change_port=True)
        self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)

    def test_no_flags_advertises_other_address(self):
        """
        A CHANGE-REQUEST without flags is answered from this socket with
        RESPONSE-ORIGIN and OTHER-ADDRESS: how a client learns the server
        can do RFC 5780.
        """
        d = Daemon(self.FOUR)
        origin, answer, tid = d.ask((A2, P2), empty_change=True)
        self.assertEqual(origin, (A2, P2))
        result = stun.parse_binding_response(answer, tid)
        self.assertEqual((result.response_origin, result.other_address), ((A2, P2), (A1, P1)))

    def test_wildcard_sockets(self):
        """
        Wildcard sockets (the lobby's default 0.0.0.0:3478 and :3479) can
        change port but not IP, and cannot tell where their answer leaves
        from: no RESPONSE-ORIGIN.
        """
        d = Daemon([("0.0.0.0", P1), ("0.0.0.0", P2), (A1, P1)])
        origin, answer, tid = d.ask(("0.0.0.0", P1), change_port=True)
        self.assertEqual(origin, ("0.0.0.0", P2))
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, None, None))
        origin, answer, _ = d.ask(("0.0.0.0", P1), change_ip=True)
        self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)
        origin, answer, _ = d.ask((A1, P1), change_ip=True)
        self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)

    def test_families_kept_apart(self):
        """An IPv6 socket is never the 'other IP' of an IPv4 one."""
        d = Daemon([(A1, P1), ("2001:db8::1", P2)])
        for flags in ((True, False), (False, True), (True, True)):
            origin, answer, _ = d.ask((A1, P1), *flags)
            self.assertEqual(origin, (A1, P1))
            self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)

    def test_unlinked_socket_refuses(self):
        """A socket without siblings (relay, agent) answers changes with 420, as before."""
        d = Daemon([(A1, P1), (A1, P2)], link=False)
        origin, answer, tid = d.ask((A1, P1), change_port=True)
        self.assertEqual(origin, (A1, P1))
        self.assertEqual(len(answer), 44)
        self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)
        origin, answer, tid = d.ask((A1, P1))  # CHANGE-REQUEST-free: plain answer
        self.assertEqual(stun.parse_binding_response(answer, tid).mapped, CLIENT)

    def test_stopped_sibling_not_used(self):
        d = Daemon([(A1, P1), (A1, P2)])
        d.sockets[(A1, P2)].doStop()  # as when its port stops listening
        origin, answer, _ = d.ask((A1, P1), change_port=True)
        self.assertEqual(origin, (A1, P1))
        self.assertEqual(stun.parse_message(answer).msg_class, MessageClass.ERROR)

    def test_classic_client(self):
        """An RFC 3489 client gets SOURCE-ADDRESS and CHANGED-ADDRESS instead."""
        d = Daemon(self.FOUR)
        origin, answer, tid = d.ask((A1, P1), True, True, classic=True)
        self.assertEqual(origin, (A2, P2))
        msg = stun.parse_message(answer)
        self.assertEqual(msg.msg_class, MessageClass.SUCCESS)
        self.assertEqual(stun.decode_address(msg.get(Attr.MAPPED_ADDRESS)), CLIENT)
        self.assertEqual(stun.decode_address(msg.get(Attr.SOURCE_ADDRESS)), (A2, P2))
        self.assertEqual(stun.decode_address(msg.get(Attr.CHANGED_ADDRESS)), (A2, P2))

    def test_rate_limit_counts_the_receiving_socket(self):
        """
        Answers from a sibling are rate-limited per source like any STUN
        answer: after the burst, dropped with a log line.
        """
        d = Daemon([(A1, P1), (A1, P2)], stun_rate=1.0)
        got = [d.ask((A1, P1), change_port=True) for _ in range(4)]
        self.assertEqual([g[0] if g else None for g in got], [(A1, P2), (A1, P2), None, None])
        self.assertEqual(d.metrics.dropped.labels("stun-rate-limited")._value.get(), 2)
        d.clock.advance(1.0)
        self.assertEqual(d.ask((A1, P1), change_port=True)[0], (A1, P2))

    def test_rate_limit_per_ipv6_slash64(self):
        """
        An IPv6 source is limited by its /64, not by its full address: a
        host (or someone forging its addresses) cannot multiply the answers
        aimed at one network by spreading over the addresses it owns.
        """
        d = Daemon([(A1, P1), (A1, P2)], stun_rate=1.0)
        got = [d.ask((A1, P1), source=(f"2001:2:0:7::{i}", 40000)) for i in range(1, 5)]
        self.assertEqual([bool(g) for g in got], [True, True, False, False])
        self.assertTrue(d.ask((A1, P1), source=("2001:2:0:8::1", 40000)))

    def test_malformed_dropped(self):
        d = Daemon(self.FOUR)
        _, data = stun.binding_request(change_port=True)
        d.sockets[(A1, P1)].datagramReceived(data[:-3], CLIENT)
        self.assertFalse(any(p.transport.written for p in d.sockets.values()))
        self.assertEqual(d.metrics.dropped.labels("stun-truncated")._value.get(), 1)


class AnswerBindingHonourTests(SynchronousTestCase):
    def test_honour_change(self):
        """answer_binding(honour_change=True) answers a CHANGE-REQUEST normally."""
        tid, data = stun.binding_request(change_ip=True, change_port=True)
        answer = stun.answer_binding(data, CLIENT, response_origin=(A2, P2),
                                     other_address=(A2, P2), honour_change=True)
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, (A2, P2), (A2, P2)))
        # Other unknown comprehension-required attributes still get 420.
        msg = stun.parse_message(data)
        msg.attributes.append((Attr.RESPONSE_PORT, stun.encode_response_port(9)))
        answer = stun.answer_binding(stun.encode_message(msg), CLIENT, honour_change=True)
        with self.assertRaises(stun.StunErrorResponse) as cm:
            stun.parse_binding_response(answer, tid)
        self.assertEqual(cm.exception.unknown, (Attr.RESPONSE_PORT,))


class SizeTests(SynchronousTestCase):
    """
    The largest STUN answer for its request's size, over every request
    shape the daemons answer, and what docs/stun.rst says of it (issue #9,
    item 9: the RFC 5780 path made it larger than documented).
    """

    V4 = (["198.18.1.1", "198.18.1.2"], ("203.0.113.7", 40000))
    V6 = (["2001:db8::1", "2001:db8::2"], ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 40000))

    @staticmethod
    def requests():
        for classic in (False, True):
            for change in (None, (False, False), (True, False), (False, True), (True, True)):
                for fingerprint in ((False,) if classic else (False, True)):
                    attrs = [] if change is None else [
                        (Attr.CHANGE_REQUEST, stun.encode_change_request(*change))]
                    yield stun.encode_message(stun.Message(
                        stun.Method.BINDING, MessageClass.REQUEST,
                        bytes(16 if classic else 12), attrs), fingerprint=fingerprint)

    def sizes(self, family, siblings=True):
        hosts, client = family
        # Without siblings: one socket, never linked (the relay).
        addresses = [(h, p) for h in hosts for p in (P1, P2)] if siblings else [(hosts[0], P1)]
        d = Daemon(addresses, link=siblings, stun_rate=1e9)
        for data in self.requests():
            for proto in d.sockets.values():
                proto.transport.written.clear()
            d.sockets[(hosts[0], P1)].datagramReceived(data, client)
            [(answer, to)] = [w for p in d.sockets.values() for w in p.transport.written]
            yield len(data), len(answer)

    def worst(self, family, siblings=True):
        return max(self.sizes(family, siblings), key=lambda s: (s[1] / s[0], s[1]))

    def test_worst_case(self):
        # A bare request, answered with three addresses (RFC 5780).
        self.assertEqual(self.worst(self.V6), (20, 92))
        self.assertEqual(self.worst(self.V4), (20, 56))
        self.assertEqual(self.worst(self.V6, siblings=False), (20, 44))
        self.assertEqual(max(b - a for family in (self.V4, self.V6)
                             for a, b in self.sizes(family)), 72)

    def test_documented(self):
        import os
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "..", "docs", "stun.rst")) as f:
            text = " ".join(f.read().split())
        request, answer = self.worst(self.V6)
        self.assertIn(f"a {answer}-byte answer, {answer / request:.1f} times the request"
                      f" ({answer - request} bytes more)", text)
        self.assertIn("No answer is more than 72 bytes larger than its request", text)
