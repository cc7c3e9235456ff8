# -*- test-case-name: tests.unit.test_quic_identity -*-
"""
Who a QUIC peer is: the deployment's certificates, read as peer identities.

Both ends of a p2pnat QUIC connection present a certificate issued by the
deployment's own CA (L{p2pnat.deployment.pki}).  A certificate names one
peer with one URI in its subjectAltName, equal to its common name:

- a device: ``p2pnat:device:<id>`` (what ``p2pnat device add`` issues);
- a lobby client: ``p2pnat:client:<id>`` (what ``p2pnat client add``
  issues: L{pki.issue_client_cert}).

A connection is made to reach one named peer, so a certificate that merely
chains to the CA is not enough: L{check_peer} also requires that it names
the identity we meant to reach (or one of the identities we accept).

Pure logic: certificates in, an identity or a L{PeerCertificateError} out.
The time against which validity is checked is passed in (the caller's
injected clock).
"""

import datetime
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from p2pnat.deployment import pki
from p2pnat.protocol import wire

#: The kinds of peer a certificate can name, with their URI prefixes.
KINDS = {"device": pki.DEVICE_URI_PREFIX, "client": pki.CLIENT_URI_PREFIX}

#: Issued by the deployment's CA (L{p2pnat.deployment.pki}); importable
#: from here as well, where peers' certificates are read.
issue_client_cert = pki.issue_client_cert
CLIENT_YEARS = pki.CLIENT_YEARS


class PeerCertificateError(Exception):
    """
    A peer's certificate was refused; the message says why, fit for a user
    (it names identities, never keys).
    """


@dataclass(frozen=True, order=True)
class PeerIdentity:
    """
    One peer of the deployment: C{kind} (``"device"`` or ``"client"``) and
    its ID.  Written ``kind:id`` (L{parse}, C{str}).
    """

    kind: str
    id: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown peer kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(self.id, str) or not wire.valid_key_id(self.id):
            raise ValueError(f"not a valid peer ID: {self.id!r}")

    def __str__(self):
        return f"{self.kind}:{self.id}"

    @property
    def uri(self):
        """The subjectAltName URI a certificate for this peer carries."""
        return KINDS[self.kind] + self.id

    @classmethod
    def parse(cls, text):
        """
        Read ``kind:id`` (``device:cam1``, ``client:alice``); a
        L{PeerIdentity} is returned as it is.

        @raise ValueError: with a message naming what is wrong.
        """
        if isinstance(text, cls):
            return text
        kind, sep, ident = str(text).partition(":")
        if not sep:
            raise ValueError(f"a peer is written kind:id (device:cam1, client:alice), "
                             f"not {text!r}")
        return cls(kind, ident)


def identity_of(cert):
    """
    The L{PeerIdentity} a certificate names, or None if it names none.

    It reads names and does not check signatures: call it on a certificate
    whose chain L{check_peer} verifies.  A peer certificate has exactly one
    p2pnat peer URI, an ID equal to its common name, and allows clientAuth
    (as every device certificate does).
    """
    cert = pki.as_cryptography(cert)
    try:
        return _identity_of(cert)
    except TypeError:  # unhashable: read it without the cache
        return _identity_of.__wrapped__(cert)


# The same peers present the same certificates again and again: what one
# names is read once.  A certificate compares and hashes by its DER bytes, so
# a cached answer is for exactly that certificate.
@functools.lru_cache(maxsize=256)
def _identity_of(cert):
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    found = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        for kind, prefix in KINDS.items():
            if uri.startswith(prefix):
                found.append((kind, uri[len(prefix):]))
    if len(found) != 1 or not wire.valid_key_id(found[0][1]):
        return None
    kind, ident = found[0]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [ident] or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return None
    return PeerIdentity(kind, ident)


def _describe(cert):
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return repr(names[0]) if names else "(no common name)"


def check_peer(cert, chain, ca_certs, expected, now):
    """
    Verify a peer's certificate for a connection and return whom it names.

    @param cert: the peer's certificate (cryptography).
    @param chain: further certificates the peer sent; treated as untrusted.
    @param ca_certs: the deployment's CA certificates, the only trust anchors.
    @param expected: the L{PeerIdentity} we meant to reach, or a collection of
        those we accept, or None to accept any peer of the deployment (only
        for a listener that checks the identity itself afterwards).
    @param now: POSIX seconds to check validity against.
    @return: the peer's L{PeerIdentity}.
    @raise PeerCertificateError: if it does not chain to one of C{ca_certs},
        is not valid at C{now}, names no peer, or names another peer than
        C{expected}.
    """
    store = crypto.X509Store()
    for ca in _anchors(ca_certs):
        store.add_cert(ca)
    store.set_time(datetime.datetime.fromtimestamp(now, datetime.UTC)
                   .replace(tzinfo=None))
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(cert),
                                  [crypto.X509.from_cryptography(c) for c in chain])
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as e:
        raise PeerCertificateError(
            f"peer certificate {_describe(cert)} refused: not issued by this deployment's CA "
            f"or not valid now ({e})") from None
    identity = identity_of(cert)
    if identity is None:
        raise PeerCertificateError(
            f"peer certificate {_describe(cert)} refused: it names no p2pnat peer")
    if expected is None:
        return identity
    accepted = {expected} if isinstance(expected, PeerIdentity) else set(expected)
    if identity not in accepted:
        wanted = ", ".join(sorted(str(a) for a in accepted)) or "(nobody)"
        raise PeerCertificateError(
            f"peer certificate names {identity}, expected {wanted}")
    return identity


def _anchors(ca_certs):
    """C{ca_certs} as pyOpenSSL certificates, converted once per set of CAs."""
    try:
        return _converted_anchors(tuple(ca_certs))
    except TypeError:  # unhashable certificates: convert them every time
        return _converted_anchors.__wrapped__(ca_certs)


# Only the conversion is cached: each check builds its own store, so that the
# time it is checked at belongs to that check alone.
@functools.lru_cache(maxsize=16)
def _converted_anchors(ca_certs):
    return tuple(crypto.X509.from_cryptography(pki.as_cryptography(ca)) for ca in ca_certs)


@dataclass(frozen=True)
class Credentials:
    """
    What one peer needs for QUIC: its certificate and private key, and the
    deployment's CA certificates it trusts.
    """

    cert: object
    key: object
    ca_certs: tuple

    @property
    def identity(self):
        """The L{PeerIdentity} our own certificate names (None if none)."""
        return identity_of(self.cert)

    @classmethod
    def from_files(cls, cert_file, key_file, ca_file):
        """
        Read a device bundle's (or client directory's) PEM files; the key
        file must be private (L{pki.read_secret}).

        @raise pki.PKIError: a file is missing, unreadable or not PEM.
        """
        return cls(pki.load_cert(cert_file), pki.load_key(key_file),
                   (pki.load_cert(ca_file),))
