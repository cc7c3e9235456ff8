"""
Tests for L{p2pnat.deployment.pki}.
"""

import datetime
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.deployment import pki


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _verifies(cert, ca_cert):
    """Whether pyOpenSSL verifies C{cert} against a store holding only C{ca_cert}."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca_cert))
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert))
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


class CATests(SynchronousTestCase):

    def setUp(self):
        self.ca_cert, self.ca_key = pki.create_ca("test CA")

    def test_ca(self):
        """The CA is a P-256 CA certificate for certSign, valid ten years."""
        cert = self.ca_cert
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertTrue(datetime.timedelta(days=3650) <= life <= datetime.timedelta(days=3655))
        self.assertTrue(_verifies(cert, cert))

    def test_server_cert(self):
        """
        The relay certificate verifies against the CA, names the host and
        its subdomains, is for serverAuth, and passes service_identity.
        """
        cert, key = pki.issue_server_cert(self.ca_cert, self.ca_key, "Relay.Example.ORG.")
        self.assertTrue(_verifies(cert, self.ca_cert))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName),
                         ["relay.example.org", "*.relay.example.org"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertTrue(pki.covers_hostname(cert, "relay.example.org"))
        self.assertTrue(pki.covers_hostname(cert, "cam-1.relay.example.org"))
        self.assertFalse(pki.covers_hostname(cert, "example.org"))
        self.assertFalse(pki.covers_hostname(cert, "a.b.relay.example.org"))
        # The key matches the certificate.
        self.assertEqual(cert.public_key().public_numbers(), key.public_key().public_numbers())

    def test_server_cert_ip(self):
        """An IP address gets an IP entry (and no DNS entry, which would break it)."""
        for ip in ("192.0.2.7", "2001:db8::1"):
            cert, _ = pki.issue_server_cert(self.ca_cert, self.ca_key, ip)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)], [ip])
            self.assertEqual(san.get_values_for_type(x509.DNSName), [])
            self.assertTrue(pki.covers_hostname(cert, ip))
            self.assertFalse(pki.covers_hostname(cert, "192.0.2.8"))

    def test_bad_hostname(self):
        for bad in ("", "a..b", "-a.example", "a_b.example", "exa mple.org", "x" * 64 + ".org"):
            self.assertRaises(pki.PKIError, pki.issue_server_cert, self.ca_cert, self.ca_key, bad)

    def test_device_cert(self):
        """
        A device certificate verifies against its CA, is for clientAuth,
        and device_id_of reads the ID back from any certificate type.
        """
        cert, key = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1.home", years=2)
        self.assertTrue(_verifies(cert, self.ca_cert))
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.UniformResourceIdentifier),
                         ["p2pnat:device:cam-1.home"])
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertTrue(datetime.timedelta(days=730) <= life <= datetime.timedelta(days=731))
        self.assertEqual(pki.device_id_of(cert), "cam-1.home")
        self.assertEqual(pki.device_id_of(crypto.X509.from_cryptography(cert)), "cam-1.home")
        self.assertEqual(pki.device_id_of(ssl.Certificate.loadPEM(pki.cert_pem(cert))),
                         "cam-1.home")

    def test_other_ca(self):
        """A device certificate from another CA does not verify against ours."""
        other_cert, other_key = pki.create_ca("test CA")  # same name, other key
        cert, _ = pki.issue_device_cert(other_cert, other_key, "cam-1")
        self.assertFalse(_verifies(cert, self.ca_cert))
        self.assertTrue(_verifies(cert, other_cert))

    def test_leaf_not_a_ca(self):
        """A certificate signed by a device's key does not verify: pathlen 0, CA:FALSE."""
        dev_cert, dev_key = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1")
        forged, _ = pki.issue_device_cert(dev_cert, dev_key, "cam-2")
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(self.ca_cert))
        ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(forged),
                                      [crypto.X509.from_cryptography(dev_cert)])
        self.assertRaises(crypto.X509StoreContextError, ctx.verify_certificate)

    def test_device_id_of_rejects(self):
        """device_id_of gives None for server and CA certificates."""
        server, _ = pki.issue_server_cert(self.ca_cert, self.ca_key, "relay.example.org")
        self.assertIsNone(pki.device_id_of(server))
        self.assertIsNone(pki.device_id_of(crypto.X509.from_cryptography(server)))
        self.assertIsNone(pki.device_id_of(self.ca_cert))
        self.assertRaises(TypeError, pki.device_id_of, b"not a certificate")

    def test_device_id_of_mismatch(self):
        """A certificate whose common name and device URI disagree names no device."""
        key = pki.generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-1")])
        ski = self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        base = (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                .serial_number(1)
                .not_valid_before(datetime.datetime(2020, 1, 1))
                .not_valid_after(datetime.datetime(2030, 1, 1))
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False))
        client = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        cases = [
            [x509.UniformResourceIdentifier("p2pnat:device:cam-2")],
            [x509.UniformResourceIdentifier("p2pnat:device:cam-1"),
             x509.UniformResourceIdentifier("p2pnat:device:cam-2")],
            [x509.UniformResourceIdentifier("p2pnat:device:-bad")],
        ]
        for san in cases:
            cert = (base.add_extension(x509.SubjectAlternativeName(san), False)
                    .add_extension(client, False).sign(self.ca_key, hashes.SHA256()))
            self.assertIsNone(pki.device_id_of(cert), san)
        # Right names, but not for client authentication.
        cert = (base.add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier("p2pnat:device:cam-1")]), False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
                .sign(self.ca_key, hashes.SHA256()))
        self.assertIsNone(pki.device_id_of(cert))

    def test_bad_device_id(self):
        for bad in ("", "-x", "a/b", "x" * 65, "caf\u00e9"):
            self.assertRaises(pki.PKIError, pki.issue_device_cert, self.ca_cert, self.ca_key, bad)

    def test_not_after_ca(self):
        """A leaf issued late in the CA's life ends with the CA."""
        late = self.ca_cert.not_valid_after_utc - datetime.timedelta(days=30)
        cert, _ = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1", now=late)
        self.assertEqual(cert.not_valid_after_utc, self.ca_cert.not_valid_after_utc)

    def test_fingerprint(self):
        cert, _ = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1")
        fp = pki.fingerprint(cert)
        self.assertEqual(len(fp), 64)
        self.assertEqual(fp, pki.fingerprint(crypto.X509.from_cryptography(cert)))
        digest = crypto.X509.from_cryptography(cert).digest("sha256").decode()
        self.assertEqual(fp, digest.replace(":", "").lower())


class SecretFileTests(SynchronousTestCase):

    def setUp(self):
        self.dir = pki.make_private_dir(self.mktemp())

    def test_private_dir(self):
        self.assertEqual(_mode(self.dir), 0o700)
        path = os.path.join(self.dir, "f")
        open(path, "w").close()
        self.assertRaises(pki.PKIError, pki.make_private_dir, path)

    def test_write_secret_mode(self):
        """
        A secret is 0600 from creation, even with a permissive umask (it is
        not chmodded afterwards), and read back.
        """
        path = os.path.join(self.dir, "k")
        old = os.umask(0)
        try:
            pki.write_secret(path, b"secret")
        finally:
            os.umask(old)
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(pki.read_secret(path), b"secret")

    def test_write_secret_exclusive(self):
        """An existing file is not overwritten unless asked."""
        path = os.path.join(self.dir, "k")
        pki.write_secret(path, "one")
        self.assertRaises(pki.PKIError, pki.write_secret, path, "two")
        self.assertEqual(pki.read_secret(path), b"one")
        pki.write_secret(path, "two", replace=True)
        self.assertEqual(pki.read_secret(path), b"two")
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(os.listdir(self.dir), ["k"])

    def test_write_secret_no_symlink(self):
        """A planted symlink is not followed."""
        target = os.path.join(self.dir, "target")
        path = os.path.join(self.dir, "k")
        os.symlink(target, path)
        self.assertRaises(pki.PKIError, pki.write_secret, path, "x")
        self.assertFalse(os.path.exists(target))

    def test_read_secret_refuses_wide_mode(self):
        """A 0644 (or 0640) key file is refused with a message that says what to do."""
        path = os.path.join(self.dir, "k")
        pki.write_public(path, "secret")
        for mode in (0o644, 0o640, 0o604):
            os.chmod(path, mode)
            e = self.assertRaises(pki.PKIError, pki.read_secret, path)
            self.assertIn(f"{mode:04o}", str(e))
            self.assertIn("chmod 600", str(e))

    def test_read_secret_missing(self):
        e = self.assertRaises(pki.PKIError, pki.read_secret, os.path.join(self.dir, "none"))
        self.assertIn("no such file", str(e))

    def test_keys_round_trip(self):
        """Keys and certificates written as PEM load back; load_key checks the mode."""
        ca_cert, ca_key = pki.create_ca()
        kpath, cpath = os.path.join(self.dir, "ca.key"), os.path.join(self.dir, "ca.crt")
        pki.write_secret(kpath, pki.key_pem(ca_key))
        pki.write_public(cpath, pki.cert_pem(ca_cert))
        self.assertEqual(pki.load_key(kpath).private_numbers(), ca_key.private_numbers())
        self.assertEqual(pki.load_cert(cpath), ca_cert)
        os.chmod(kpath, 0o644)
        self.assertRaises(pki.PKIError, pki.load_key, kpath)
        self.assertRaises(pki.PKIError, pki.load_cert, kpath + ".none")

    def test_mac_key(self):
        path = os.path.join(self.dir, "mac.key")
        key = bytes(range(32))
        pki.write_mac_key(path, key)
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(pki.read_mac_key(path), key)
        self.assertRaises(pki.PKIError, pki.write_mac_key, path + "2", b"short")
        pki.write_secret(path + "3", "abcd\n")
        self.assertRaises(pki.PKIError, pki.read_mac_key, path + "3")


class TLSHandshakeTests(SynchronousTestCase):
    """
    The certificates work in a real (in-memory) Twisted TLS handshake: the
    device checks the relay's name against the CA, the relay checks the
    device's certificate against the CA and reads its ID.
    """

    def setUp(self):
        self.ca_cert, self.ca_key = pki.create_ca("test CA")
        self.relay_cert, self.relay_key = pki.issue_server_cert(
            self.ca_cert, self.ca_key, "relay.example.org")

    def handshake(self, device_cert, device_key, hostname="relay.example.org"):
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.task import Clock
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test import iosim

        ca = ssl.Certificate.loadPEM(pki.cert_pem(self.ca_cert))
        server_opts = ssl.PrivateCertificate.loadPEM(
            pki.cert_pem(self.relay_cert) + pki.key_pem(self.relay_key)).options(ca)
        client_opts = ssl.optionsForClientTLS(
            hostname, trustRoot=ca,
            clientCertificate=ssl.PrivateCertificate.loadPEM(
                pki.cert_pem(device_cert) + pki.key_pem(device_key)))
        seen = {}

        class Server(Protocol):
            def dataReceived(self, data):
                seen["peer"] = self.transport.getPeerCertificate()
                self.transport.write(b"ok")

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"hello")

            def dataReceived(self, data):
                seen["reply"] = data

            def connectionLost(self, reason):
                seen["lost"] = reason

        clock = Clock()  # TLSMemoryBIOProtocol batches its writes with callLater
        server = TLSMemoryBIOFactory(server_opts, False, Factory.forProtocol(Server),
                                     clock=clock)
        client = TLSMemoryBIOFactory(client_opts, True, Factory.forProtocol(Client),
                                     clock=clock)
        _, _, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None),
            clock=clock)
        pump.flush()
        return seen

    def test_ok(self):
        cert, key = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1")
        seen = self.handshake(cert, key)
        self.assertEqual(seen.get("reply"), b"ok")
        self.assertEqual(pki.device_id_of(seen["peer"]), "cam-1")
        self.assertEqual(pki.fingerprint(seen["peer"]), pki.fingerprint(cert))

    def test_wrong_hostname(self):
        cert, key = pki.issue_device_cert(self.ca_cert, self.ca_key, "cam-1")
        seen = self.handshake(cert, key, hostname="other.example.org")
        self.assertNotIn("reply", seen)
        self.assertNotIn("peer", seen)
        self.assertIn("lost", seen)

    def test_device_of_other_ca(self):
        other_cert, other_key = pki.create_ca("test CA")
        cert, key = pki.issue_device_cert(other_cert, other_key, "cam-1")
        seen = self.handshake(cert, key)
        self.assertNotIn("peer", seen)
        self.assertNotIn("reply", seen)
        self.assertIn("lost", seen)
