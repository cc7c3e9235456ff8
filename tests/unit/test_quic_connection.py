"""
Tests for the pure parts of L{p2pnat.quic}: the demultiplexing rule, the
stream header, and the aioquic internals L{PeerConnection} relies on.
"""

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import p2p as M
from p2pnat.protocol import stun, wire
from p2pnat.quic import connection, header, is_quic
from tests.support.quic import T0, Deployment


class DemuxTests(SynchronousTestCase):

    def test_split(self):
        """
        STUN and p2pnat frames are never QUIC; every first byte with bit
        0x40 set is, and nothing else.
        """
        _, request = stun.binding_request(b"\x01" * 12)
        self.assertFalse(is_quic(request))
        frame = wire.seal(M.PathKeepalive(), "alice", b"k" * wire.KEY_LEN, 1)
        self.assertFalse(is_quic(frame))
        for first in range(256):
            self.assertEqual(is_quic(bytes([first]) + b"\0" * 20), bool(first & 0x40), first)
        self.assertFalse(is_quic(b""))


class HeaderTests(SynchronousTestCase):

    def test_round_trip(self):
        self.assertEqual(header.encode("ssh"), b"\x03ssh")
        self.assertEqual(header.decode(b"\x03sshDATA"), ("ssh", b"DATA"))
        self.assertEqual(header.decode(b"\x04http"), ("http", b""))

    def test_incomplete(self):
        self.assertIsNone(header.decode(b""))
        self.assertIsNone(header.decode(b"\x03ss"))

    def test_invalid(self):
        for bad in (b"\x00", b"\x40" + b"a" * 64, b"\x03SSH", b"\x03s h", b"\x02\xff\xfe",
                    b"\x01-"):
            self.assertRaises(header.HeaderError, header.decode, bad)
        for name in ("", "SSH", "a" * 64, "-x", "s h", 3):
            self.assertRaises(header.HeaderError, header.encode, name)
        header.encode("a" * 63)
        header.encode("files.v2_x-y")


class ConnectionTests(SynchronousTestCase):

    def test_internals_present(self):
        """The installed aioquic has everything PeerConnection uses."""
        connection.check_internals()

    def test_bounds(self):
        """The peer may open at most max_streams streams; no unidirectional ones."""
        clock = task.Clock()
        clock.advance(T0)
        creds = Deployment(now=T0).client("alice")
        conn = connection.PeerConnection(
            configuration=connection.make_configuration(creds, is_client=True),
            credentials=creds, expected=None, clock=clock, max_streams=7)
        # What the transport parameters announce (checked before aioquic
        # serializes them at the handshake).
        self.assertEqual((conn._local_max_streams_bidi.value, conn._local_max_streams_bidi.sent),
                         (7, 7))
        self.assertEqual(conn._local_max_streams_uni.value, 0)
        self.assertEqual(conn.configuration.max_datagram_frame_size, 65536)
        self.assertEqual(conn.configuration.alpn_protocols, [connection.ALPN])

    def test_datagram_queue_bounded(self):
        clock = task.Clock()
        creds = Deployment().client("alice")
        conn = connection.PeerConnection(
            configuration=connection.make_configuration(creds, is_client=True),
            credentials=creds, expected=None, clock=clock)
        for _ in range(connection.MAX_PENDING_DATAGRAMS):
            self.assertTrue(conn.send_datagram_frame(b"x"))
        self.assertFalse(conn.send_datagram_frame(b"x"))

    def test_one_key_share(self):
        """
        The connecting side offers one key exchange group, P-256 (the one
        aioquic's accepting side picks among its default offers anyway),
        and makes no key pair for any other.
        """
        clock = task.Clock()
        clock.advance(T0)
        creds = Deployment(now=T0).client("alice")
        conn = connection.PeerConnection(
            configuration=connection.make_configuration(creds, is_client=True),
            credentials=creds, expected=None, clock=clock)
        conn.connect(("192.0.2.1", 4433), now=0.0)
        context = conn.tls
        self.assertEqual(context._supported_groups, [connection.KEY_EXCHANGE_GROUP])
        self.assertEqual([k.curve.name for k in context._ec_private_keys], ["secp256r1"])
        self.assertIsNone(context._x25519_private_key)
        self.assertIsNone(context._x448_private_key)
