"""
The connecting side's first datagrams on a path's QUIC channel
(L{p2pnat.peer.streams.connect_streams}): they leave behind alice's
``Finished``, one round trip before bob confirms the handshake, and when
bob refuses alice they are never read encrypted, and go in the clear
once, as datagrams that waited did before.  And the handshake itself
begins with the punch (L{p2pnat.peer.streams.EarlyDial}).
"""

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import punch as punch_module
from p2pnat.peer import streams as S
from p2pnat.protocol import stun
from p2pnat.quic import HandshakeFailed
from tests.unit.test_peer_client import CONE, SEQUENTIAL
from tests.unit.test_peer_streams import MARKER, Peers, payload
from tests.unit.test_peer_streams_datagrams import start_quic


class EarlyDatagramTests(SynchronousTestCase):

    def test_datagram_before_confirmation(self):
        """
        The marker alice sent while the handshake ran reaches bob before
        alice's connect_streams fired (before bob's confirmation reached
        her), encrypted; bob's answer comes back once it has.
        """
        p = Peers(self)
        path, incoming = p.connect()
        got_a, got_b = [], []
        path.on_datagram, incoming.on_datagram = got_a.append, got_b.append
        results, b, settled_a, _ = start_quic(p, path, incoming)
        path.send(MARKER + b" from alice")
        confirmed_when_bob_got_it = None
        for _ in range(400):
            p.w.clock.advance(0.0005)
            if got_b and confirmed_when_bob_got_it is None:
                confirmed_when_bob_got_it = bool(results)
                incoming.send(MARKER + b" from bob")
        self.assertEqual(got_b, [MARKER + b" from alice"])
        self.assertIs(confirmed_when_bob_got_it, False)
        self.assertIsInstance(results[0], S.PathStreams)
        p.streams.append(results[0])
        self.assertEqual(settled_a.calls, [(True, None)])
        self.assertEqual(got_a, [MARKER + b" from bob"])
        self.assertFalse([s for s in p.w.net.sent if MARKER in s.data])

    def test_refused_early_datagram_goes_clear_once(self):
        """
        bob refuses alice's certificate (it names carol): what alice sent
        behind her Finished was never read; it goes in the clear with the
        fallback, once, as before.
        """
        p = Peers(self)
        path, incoming = p.connect()
        got_b = []
        incoming.on_datagram = got_b.append
        results, b, settled_a, _ = start_quic(p, path, incoming, a_creds=p.creds("carol"))
        path.send(MARKER + b" from alice")
        p.w.advance(2)
        self.assertIsInstance(results[0].value, HandshakeFailed)
        [(encrypted, reason)] = settled_a.calls
        self.assertFalse(encrypted)
        self.assertIsInstance(path.channel, S.ClearDatagrams)
        self.assertEqual(got_b, [MARKER + b" from alice"])
        clear = [s for s in p.w.net.sent if MARKER in s.data]
        self.assertEqual(len(clear), 1)


class HandshakeWithPunchTests(SynchronousTestCase):
    """
    With credentials, the asking client begins the QUIC connection with
    the punch (L{S.EarlyDial}): its Initial leaves behind its first
    probes, and L{S.connect_streams} carries on with that connection.
    """

    def run_connect(self, early, nat=CONE, later=0.0):
        """
        alice connects to bob, who accepts QUIC on his path at once;
        alice's connect_streams is called as soon as her path fires (or
        C{later} seconds after).
        Returns (Peers, alice's PathStreams, seconds from alice's path to
        her connection up, index in the wire log of alice's path).
        """
        p = Peers(self, nat, nat)
        creds = p.creds("alice")
        if early:
            p.alice.credentials = creds

        def on_path(path):
            p.w.incoming["bob"].append(path)
            p.streams.append(S.accept_streams(path, p.creds("bob"), {"echo": p.sinks},
                                              on_connection=p.accepted.append))

        p.bob.on_path = on_path
        marks, results = {}, []

        def path_up(path):
            marks["path"], marks["wire"] = p.w.clock.seconds(), len(p.w.net.sent)
            marks["dial"] = path.early_dial

            def dial():
                S.connect_streams(path, creds).addBoth(results.append)
            if later:
                p.w.clock.callLater(later, dial)
            else:
                dial()
            return path

        p.alice.connect("bob").addCallback(path_up)
        for _ in range(4000):
            if results:
                break
            p.w.clock.advance(0.0005)
        self.assertIsInstance(results[0], S.PathStreams)
        p.streams.append(results[0])
        return p, results[0], p.w.clock.seconds() - marks["path"], marks

    def quic_from_alice(self, p):
        return [i for i, s in enumerate(p.w.net.sent)
                if s.src[0] == "203.0.113.1" and stun.demux(s.data) is stun.Kind.QUIC]

    def test_initial_rides_with_the_first_probes(self):
        """
        alice's Initial is on the wire before her punch found the path,
        and her streams run on that connection (no second one is made):
        when her path comes with bob's answer to her probe (bob's own
        probes, L{punch_module.CATCH_RTTS}, did not reach her first), the
        connection is up about one round trip after it, against two when
        the handshake begins with the path; a stream works.
        """
        self.patch(punch_module, "CATCH_RTTS", ())
        p, a, took, marks = self.run_connect(early=True)
        first = self.quic_from_alice(p)[0]
        self.assertLess(first, marks["wire"])
        self.assertIsNotNone(marks["dial"])
        self.assertIs(a.socket, marks["dial"].socket)
        self.assertIs(a.endpoint, marks["dial"].endpoint)
        _, _, late, _ = self.run_connect(early=False)
        rtt = 2 * 0.005  # the World's latency, each way
        self.assertLess(took + 0.5 * rtt, late, (took, late))
        data = payload(50_000, seed=5)
        self.assertEqual(p.transfer(a, data), (hashlib.sha256(data).hexdigest(), len(data)))

    def test_answer_before_connect_streams_is_kept(self):
        """
        alice's application opens QUIC a moment after her path came up:
        bob's answer to her Initial, which came meanwhile, was kept on the
        path and is read then; her handshake is not sent again.
        """
        self.patch(punch_module, "CATCH_RTTS", ())
        _, _, now, _ = self.run_connect(early=True)
        p, a, took, marks = self.run_connect(early=True, later=0.004)
        self.assertIs(a.endpoint, marks["dial"].endpoint)
        self.assertLess(took, now + 0.004 + 0.002, (took, now))
        initials = [s for s in p.w.net.sent if s.src[0] == "203.0.113.1"
                    and stun.demux(s.data) is stun.Kind.QUIC and s.data[0] & 0xB0 == 0x80]
        self.assertEqual(len(initials), 2)  # the ClientHello's, the Finished's

    def test_symmetric_nats(self):
        """Behind sequential symmetric NATs (a window of sockets and ports) it works alike."""
        p, a, took, marks = self.run_connect(early=True, nat=SEQUENTIAL)
        self.assertEqual(a.path.mode, "direct")
        self.assertIs(a.endpoint, marks["dial"].endpoint)
        data = payload(20_000, seed=6)
        self.assertEqual(p.transfer(a, data), (hashlib.sha256(data).hexdigest(), len(data)))

    def test_relayed_path_dials_afresh(self):
        """
        Nothing passes between the peers: the punch's connection is
        dropped with it, and QUIC over the relayed path is a new one.
        """
        p = Peers(self)
        creds = p.alice.credentials = p.creds("alice")
        blocked = {"203.0.113.1", "198.51.100.1"}
        p.w.net.lose = lambda src, dst, data: {src[0], dst[0]} == blocked
        path = p.w.connect("alice", "bob")
        self.assertEqual(path.mode, "relayed")
        self.assertIsNone(path.early_dial)
        p.w.advance(0.5)
        a, b = p.quic(path, p.w.incoming["bob"][-1], a_creds=creds)
        self.assertIsInstance(a, S.PathStreams)
        self.assertEqual(len(a.socket.endpoints), 1)
