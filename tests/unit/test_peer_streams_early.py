"""
The connecting side's first datagrams on a path's QUIC channel
(L{p2pnat.peer.streams.connect_streams}): they leave behind alice's
``Finished``, one round trip before bob confirms the handshake, and when
bob refuses alice they are never read encrypted, and go in the clear
once, as datagrams that waited did before.
"""

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.peer import streams as S
from p2pnat.quic import HandshakeFailed
from tests.unit.test_peer_streams import MARKER, Peers
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
