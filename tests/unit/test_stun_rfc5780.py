"""
What a standard RFC 5780 client needs from the daemons' STUN answers:
OTHER-ADDRESS and RESPONSE-ORIGIN in every Binding answer of a socket that
knows its alternate address (not only in answers to CHANGE-REQUEST), never
an answer to another address or port (RESPONSE-ADDRESS, RESPONSE-PORT),
the relay's sockets linked like the lobby's, and the size of every
request shape's answer as docs/stun.rst tables it.  Fake transports on a
L{Clock}, no sockets.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import stun
from p2pnat.protocol.stun import Attr, MessageClass
from p2pnat.relay.core import synchronous
from tests.support import procs
from tests.unit.test_taps import TapTestCase, UDPMemoryReactor
from tests.unit.test_udp_rfc5780 import A1, A2, CLIENT, P1, P2, Daemon

FOUR = [(A1, P1), (A1, P2), (A2, P1), (A2, P2)]
V6 = ("2001:db8::1", "2001:db8::2")
CLIENT6 = ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 40000)


def request(*, classic=False, fingerprint=False, change=None, extra=()):
    """A Binding request's bytes: ``change`` is CHANGE-REQUEST's flags, if any."""
    attrs = list(extra)
    if change is not None:
        attrs.insert(0, (Attr.CHANGE_REQUEST, stun.encode_change_request(*change)))
    tid = bytes(range(16 if classic else 12))
    return stun.encode_message(stun.Message(stun.Method.BINDING, MessageClass.REQUEST, tid,
                                            attrs), fingerprint=fingerprint)


def exchange(daemon, at, data, source=CLIENT):
    """
    Give socket ``at`` of ``daemon`` the datagram ``data`` from ``source``;
    return every ``(socket, answer, destination)`` written.
    """
    live = {addr: proto for addr, proto in daemon.sockets.items() if proto.transport}
    for proto in live.values():
        proto.transport.written.clear()
    daemon.sockets[at].datagramReceived(data, source)
    return [(addr, answer, to) for addr, proto in live.items()
            for answer, to in proto.transport.written]


class PlainAnswerTests(SynchronousTestCase):
    def test_every_socket_names_its_alternate(self):
        """
        Two IPs by two ports: a plain request (bare, with FINGERPRINT) to
        each socket is answered from that socket with RESPONSE-ORIGIN (the
        socket) and OTHER-ADDRESS (the one with the other IP and port).
        """
        d = Daemon(FOUR)
        for host, port in FOUR:
            alternate = (A2 if host == A1 else A1, P2 if port == P1 else P1)
            for fingerprint in (False, True):
                tid, data = stun.binding_request(fingerprint=fingerprint)
                [(origin, answer, to)] = exchange(d, (host, port), data)
                self.assertEqual((origin, to), ((host, port), CLIENT))
                self.assertEqual(stun.parse_binding_response(answer, tid),
                                 stun.BindingResult(CLIENT, (host, port), alternate))
                self.assertEqual(stun.parse_message(answer).has_fingerprint, fingerprint)

    def test_classic_plain_request(self):
        """An RFC 3489 client gets SOURCE-ADDRESS and CHANGED-ADDRESS, as RFC 3489 asks."""
        d = Daemon(FOUR)
        [(origin, answer, _)] = exchange(d, (A2, P1), request(classic=True))
        self.assertEqual(origin, (A2, P1))
        msg = stun.parse_message(answer)
        self.assertEqual(msg.types(), [Attr.MAPPED_ADDRESS, Attr.SOURCE_ADDRESS,
                                       Attr.CHANGED_ADDRESS])
        self.assertEqual(stun.decode_address(msg.get(Attr.SOURCE_ADDRESS)), (A2, P1))
        self.assertEqual(stun.decode_address(msg.get(Attr.CHANGED_ADDRESS)), (A1, P2))

    def test_ipv6(self):
        d = Daemon([(h, p) for h in V6 for p in (P1, P2)])
        tid, data = stun.binding_request()
        [(_, answer, _)] = exchange(d, (V6[1], P2), data, CLIENT6)
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT6, (V6[1], P2), (V6[0], P1)))

    def test_minimal_without_alternate(self):
        """
        No alternate address, no RFC 5780 attributes in a plain answer: one
        IP with two ports, wildcard sockets, an alternate of the other
        family only, sockets never linked, an alternate whose port stopped.
        """
        shapes = {
            "one IP, two ports": ([(A1, P1), (A1, P2)], True),
            "wildcard": ([("0.0.0.0", P1), ("0.0.0.0", P2), (A1, P1)], True),
            "families": ([(A1, P1), ("2001:db8::1", P2)], True),
            "unlinked": (FOUR, False),
        }
        for name, (addresses, link) in shapes.items():
            d = Daemon(addresses, link=link)
            for at in addresses:
                tid, data = stun.binding_request()
                source = CLIENT6 if ":" in at[0] else CLIENT
                [(origin, answer, _)] = exchange(d, at, data, source)
                self.assertEqual((origin, len(answer)), (at, 40 if source is CLIENT else 52),
                                 (name, at))
                self.assertEqual(stun.parse_binding_response(answer, tid),
                                 stun.BindingResult(source, None, None), (name, at))
        d = Daemon(FOUR)
        d.sockets[(A2, P2)].doStop()  # as when its port stops listening
        tid, data = stun.binding_request()
        [(_, answer, _)] = exchange(d, (A1, P1), data)
        self.assertEqual(stun.parse_binding_response(answer, tid).other_address, None)

    def test_rate_limited(self):
        """Plain answers with the RFC 5780 attributes count against the STUN limit."""
        d = Daemon(FOUR, stun_rate=1.0)
        got = [exchange(d, (A1, P1), stun.binding_request()[1]) for _ in range(3)]
        self.assertEqual([len(g) for g in got], [1, 1, 0])
        self.assertEqual(d.metrics.dropped.labels("stun-rate-limited")._value.get(), 1)


class ReflectionTests(SynchronousTestCase):
    def test_response_port_refused(self):
        """
        RESPONSE-PORT, alone or with CHANGE-REQUEST, gets a 420 naming it,
        from the socket asked, to the source's own port: nothing goes to
        the port it names.
        """
        d = Daemon(FOUR)
        port = stun.encode_response_port(CLIENT[1] + 1)
        for change in (None, (False, False), (True, True)):
            for fingerprint in (False, True):
                data = request(change=change, fingerprint=fingerprint,
                               extra=[(Attr.RESPONSE_PORT, port)])
                [(origin, answer, to)] = exchange(d, (A1, P1), data)
                self.assertEqual((origin, to), ((A1, P1), CLIENT))
                with self.assertRaises(stun.StunErrorResponse) as cm:
                    stun.parse_binding_response(answer, bytes(range(12)))
                self.assertEqual((cm.exception.code, cm.exception.unknown),
                                 (420, (Attr.RESPONSE_PORT,)))

    def test_response_address_refused(self):
        d = Daemon(FOUR)
        third = stun.encode_address("192.0.2.99", 53)
        for classic in (False, True):
            data = request(classic=classic, extra=[(Attr.RESPONSE_ADDRESS, third)])
            [(origin, answer, to)] = exchange(d, (A2, P2), data)
            self.assertEqual((origin, to), ((A2, P2), CLIENT))
            msg = stun.parse_message(answer)
            self.assertEqual(msg.msg_class, MessageClass.ERROR)
            self.assertEqual(stun.decode_unknown_attributes(msg.get(Attr.UNKNOWN_ATTRIBUTES))[0],
                             Attr.RESPONSE_ADDRESS)


class RelaySiblingsTests(TapTestCase):
    from p2pnat.relay import tap

    daemon = "relay"

    def test_relay_links_its_sockets(self):
        """
        A relay given two IPs by two ports answers RFC 5780 tests as the
        lobby does: OTHER-ADDRESS in a plain answer, a change request
        answered from the sibling asked for.
        """
        reactor = UDPMemoryReactor()
        state = os.path.join(self.tmpdir(), "state")
        options = self.options(
            "--config", self.etc(), "--relay-state-dir", state,
            "--udp-listen", ",".join(f"{h}:{p}" for h, p in FOUR),
            "--terminal-https", "", "--tunnel-listen", "tcp:17443:interface=127.0.0.1")
        svc = self.tap.makeService(options, reactor, run_blocking=synchronous,
                                   run_store=synchronous)
        self.start(svc)
        protos = {(u.host, u.portnum): u.protocol for u in svc.udp}
        self.assertEqual(protos[(A1, P1)].siblings, protos)
        tid, data = stun.binding_request()
        protos[(A1, P1)].transport.written.clear()
        protos[(A1, P1)].datagramReceived(data, CLIENT)
        [(answer, to)] = protos[(A1, P1)].transport.written
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, (A1, P1), (A2, P2)))
        tid, data = stun.binding_request(change_ip=True)
        protos[(A1, P1)].datagramReceived(data, CLIENT)
        [(answer, to)] = protos[(A2, P1)].transport.written
        self.assertEqual(stun.parse_binding_response(answer, tid),
                         stun.BindingResult(CLIENT, (A2, P1), (A2, P2)))


#: Each row of docs/stun.rst's size table: its label, the server (``plain``:
#: one socket; ``rfc5780``: two IPs by two ports; ``two-ports``: one IP,
#: two ports) and the request.
ROWS = [
    ("bare Binding request", "plain", request()),
    ("with FINGERPRINT", "plain", request(fingerprint=True)),
    ("classic (RFC 3489), CHANGE-REQUEST 0", "plain", request(classic=True, change=(0, 0))),
    ("change IP or port: 420", "plain", request(change=(1, 0))),
    ("change IP or port: 420, FINGERPRINT", "plain", request(change=(0, 1), fingerprint=True)),
    ("RESPONSE-PORT: 420", "rfc5780",
     request(extra=[(Attr.RESPONSE_PORT, stun.encode_response_port(9))])),
    ("one IP, two ports: change port", "two-ports", request(change=(0, 1))),
    ("RFC 5780: bare Binding request", "rfc5780", request()),
    ("RFC 5780: classic, no attribute", "rfc5780", request(classic=True)),
    ("RFC 5780: with FINGERPRINT", "rfc5780", request(fingerprint=True)),
    ("RFC 5780: any CHANGE-REQUEST", "rfc5780", request(change=(1, 1))),
    ("RFC 5780: CHANGE-REQUEST, FINGERPRINT", "rfc5780", request(change=(0, 1),
                                                                   fingerprint=True)),
]


def answer_size(server, hosts, client, data):
    """The size of the answer socket 0 of ``server`` (a ROWS kind) gives ``data``."""
    addresses = {"plain": [(hosts[0], P1)], "two-ports": [(hosts[0], P1), (hosts[0], P2)],
                 "rfc5780": [(h, p) for h in hosts for p in (P1, P2)]}[server]
    d = Daemon(addresses, link=server != "plain", stun_rate=1e9)
    [(_, answer, _)] = exchange(d, addresses[0], data, client)
    return len(answer)


class SizeTableTests(SynchronousTestCase):
    def table(self):
        path = os.path.join(procs.REPO, "docs", "stun.rst")
        with open(path) as f:
            return f.read()

    def test_documented_sizes(self):
        """Every row of docs/stun.rst's table is what the daemons send."""
        text = self.table()
        for label, server, data in ROWS:
            m = re.search(rf"^{re.escape(label)}\s+(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
            self.assertIsNotNone(m, f"no row {label!r} in docs/stun.rst")
            got = (len(data), answer_size(server, (A1, A2), CLIENT, data),
                   answer_size(server, V6, CLIENT6, data))
            self.assertEqual(tuple(int(g) for g in m.groups()), got, label)

    def test_padding_adds_nothing(self):
        """PADDING is echoed byte for byte: the answer grows as the request does."""
        for server in ("plain", "rfc5780"):
            for hosts, client in (((A1, A2), CLIENT), (V6, CLIENT6)):
                bare = answer_size(server, hosts, client, request()) - 20
                data = request(extra=[(Attr.PADDING, bytes(100))])
                self.assertEqual(answer_size(server, hosts, client, data) - len(data), bare)
