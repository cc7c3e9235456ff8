"""
Tests for L{p2pnat.quic.identity}: peer identities in certificates and
the check a connection makes of its peer's certificate.
"""

import datetime

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.deployment import pki
from p2pnat.quic.identity import (
    Credentials,
    PeerCertificateError,
    PeerIdentity,
    check_peer,
    identity_of,
    issue_client_cert,
)

T0 = 1_800_000_000


class PeerIdentityTests(SynchronousTestCase):

    def test_parse_and_format(self):
        peer = PeerIdentity.parse("device:cam1")
        self.assertEqual((peer.kind, peer.id, str(peer)), ("device", "cam1", "device:cam1"))
        self.assertEqual(peer.uri, "p2pnat:device:cam1")
        self.assertIs(PeerIdentity.parse(peer), peer)
        self.assertEqual(PeerIdentity.parse("client:alice"), PeerIdentity("client", "alice"))

    def test_invalid(self):
        for text in ("alice", "relay:x", "client:", "client:-a", "client:a b", "device:" + "a" * 65):
            self.assertRaises(ValueError, PeerIdentity.parse, text)


class CertificateTests(SynchronousTestCase):

    def setUp(self):
        self.ca, self.ca_key = pki.create_ca("test", now=T0)

    def test_identity_of(self):
        """Device and client certificates name their peer; a relay's names none."""
        device, _ = pki.issue_device_cert(self.ca, self.ca_key, "cam1", now=T0)
        client, _ = issue_client_cert(self.ca, self.ca_key, "alice", now=T0)
        relay, _ = pki.issue_server_cert(self.ca, self.ca_key, "relay.example", now=T0)
        self.assertEqual(identity_of(device), PeerIdentity("device", "cam1"))
        self.assertEqual(identity_of(client), PeerIdentity("client", "alice"))
        self.assertIsNone(identity_of(relay))
        self.assertIsNone(identity_of(self.ca))

    def test_client_cert_shape(self):
        """A client certificate has the device certificate's shape, with its own URI."""
        cert, key = issue_client_cert(self.ca, self.ca_key, "alice", now=T0)
        self.assertEqual(pki.device_id_of(cert), None)  # not a device
        self.assertEqual(Credentials(cert, key, (self.ca,)).identity, PeerIdentity("client", "alice"))
        self.assertRaises(pki.PKIError, issue_client_cert, self.ca, self.ca_key, "no spaces")

    def test_check_peer(self):
        cert, _ = issue_client_cert(self.ca, self.ca_key, "alice", now=T0)
        alice = PeerIdentity("client", "alice")
        self.assertEqual(check_peer(cert, [], [self.ca], alice, T0 + 10), alice)
        self.assertEqual(check_peer(cert, [], [self.ca], {alice, PeerIdentity("client", "b")},
                                    T0 + 10), alice)
        self.assertEqual(check_peer(cert, [], [self.ca], None, T0 + 10), alice)

    def test_wrong_name(self):
        cert, _ = issue_client_cert(self.ca, self.ca_key, "alice", now=T0)
        e = self.assertRaises(PeerCertificateError, check_peer, cert, [], [self.ca],
                              PeerIdentity("client", "bob"), T0 + 10)
        self.assertEqual(str(e), "peer certificate names client:alice, expected client:bob")
        # The same ID as another kind of peer is another peer.
        self.assertRaises(PeerCertificateError, check_peer, cert, [], [self.ca],
                          PeerIdentity("device", "alice"), T0 + 10)

    def test_other_ca(self):
        other, other_key = pki.create_ca("other", now=T0)
        cert, _ = issue_client_cert(other, other_key, "alice", now=T0)
        e = self.assertRaises(PeerCertificateError, check_peer, cert, [other], [self.ca],
                              PeerIdentity("client", "alice"), T0 + 10)
        self.assertIn("not issued by this deployment's CA", str(e))

    def test_validity_from_the_given_clock(self):
        """Validity is checked at the time given, not the machine's clock."""
        cert, _ = issue_client_cert(self.ca, self.ca_key, "alice", now=T0, years=1)
        alice = PeerIdentity("client", "alice")
        later = T0 + datetime.timedelta(days=400).total_seconds()
        self.assertRaises(PeerCertificateError, check_peer, cert, [], [self.ca], alice, later)
        earlier = T0 - datetime.timedelta(days=1).total_seconds()
        self.assertRaises(PeerCertificateError, check_peer, cert, [], [self.ca], alice, earlier)

    def test_no_peer_named(self):
        relay, _ = pki.issue_server_cert(self.ca, self.ca_key, "relay.example", now=T0)
        e = self.assertRaises(PeerCertificateError, check_peer, relay, [], [self.ca], None,
                              T0 + 10)
        self.assertIn("names no p2pnat peer", str(e))
