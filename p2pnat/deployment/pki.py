# -*- test-case-name: tests.unit.test_pki -*-
"""
The deployment's own certificate authority, and secrets on disk.

A deployment trusts one CA of its own (made by ``p2pnat relay init``):

- the CA: EC P-256, ten years, ``basicConstraints CA:TRUE, pathlen:0``,
  ``keyUsage keyCertSign, cRLSign``;
- the relay's TLS server certificate: ``subjectAltName`` DNS
  ``hostname`` and ``*.hostname`` (an IP address instead gets an IP
  entry), ``extendedKeyUsage serverAuth``;
- one client certificate per device: common name = device ID, plus the
  URI ``p2pnat:device:<id>`` in ``subjectAltName``,
  ``extendedKeyUsage clientAuth``;
- one per lobby client (``p2pnat client add``), of the same shape with
  the URI ``p2pnat:client:<id>``: what a peer presents on QUIC
  (L{p2pnat.quic.identity}).

Revocation is not done with CRLs: the relay's registry keeps the SHA-256
L{fingerprint} of the one certificate each device may present, and a
revoked device keeps its row.

Private keys and MAC keys are written by L{write_secret}, which creates the
file with mode 0600 (never a wider mode followed by a chmod), and read by
L{read_secret}, which refuses a file that group or others can access.
Nothing in this module prints or logs a secret.
"""

import datetime
import hashlib
import ipaddress
import os
import secrets
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pnat.protocol import wire

# File names in a relay state directory (``p2pnat relay init``) and in a
# device bundle (``p2pnat device add``).
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
RELAY_CERT_FILE = "relay.crt"
RELAY_KEY_FILE = "relay.key"
DEVICE_CERT_FILE = "device.crt"
DEVICE_KEY_FILE = "device.key"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"
MAC_KEY_FILE = "mac.key"

#: URI put in a device certificate's subjectAltName, followed by the ID.
DEVICE_URI_PREFIX = "p2pnat:device:"
CLIENT_URI_PREFIX = "p2pnat:client:"

CA_YEARS = 10
SERVER_YEARS = 5
DEVICE_YEARS = 5
CLIENT_YEARS = 5
#: Certificates start this long before "now", for peers whose clock is behind.
BACKDATE = datetime.timedelta(hours=1)

_YEAR = datetime.timedelta(days=365)


class PKIError(Exception):
    """
    A certificate or secret-file problem, with a message fit for a user.
    """


# -- secrets on disk ---------------------------------------------------------

def make_private_dir(path):
    """
    Create directory C{path} (and its parents) with mode 0700 for the last
    component; an existing directory is left as it is.

    @raise PKIError: if C{path} exists and is not a directory.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise PKIError(f"{path}: exists and is not a directory")
    except OSError as e:
        raise PKIError(f"{path}: cannot create directory: {e.strerror}")
    return path


def _write(path, data, mode, replace):
    if isinstance(data, str):
        data = data.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    target = path
    if replace:
        # Write a fresh file beside the target and rename it over, so that a
        # reader never sees a half-written key and the mode is right from
        # the first byte.
        target = os.path.join(os.path.dirname(path) or ".",
                              f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise PKIError(f"{path}: already exists")
    except OSError as e:
        raise PKIError(f"{target}: cannot create: {e.strerror}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        try:
            os.unlink(target)
        except OSError:
            pass
        raise
    return path


def write_secret(path, data, *, replace=False):
    """
    Write C{data} (bytes, or str as UTF-8) to a new file C{path} created
    with mode 0600.

    @param replace: if false, an existing C{path} is an error; if true, the
        data goes to a new 0600 file that is then renamed over C{path}.
    @raise PKIError: if C{path} exists (and not C{replace}) or cannot be
        created.
    """
    return _write(path, data, 0o600, replace)


def write_public(path, data, *, replace=False):
    """
    Like L{write_secret} for files anyone may read (certificates, configs):
    mode 0644 (less the umask).
    """
    return _write(path, data, 0o644, replace)


def read_secret(path):
    """
    Return the bytes of secret file C{path}.

    @raise PKIError: if it is missing, not a regular file, or accessible by
        group or others (the message says how to fix it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file")
    except OSError as e:
        raise PKIError(f"{path}: cannot open: {e.strerror}")
    with os.fdopen(fd, "rb") as f:
        # fstat the open file, not the path: no window for a swap.
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PKIError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise PKIError(
                f"{path}: secret file is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        return f.read()


def write_mac_key(path, key, *, replace=False):
    """
    Write a 32-byte MAC key to C{path} as one line of hex, mode 0600.
    """
    if not isinstance(key, bytes) or len(key) != wire.KEY_LEN:
        raise PKIError(f"a MAC key is {wire.KEY_LEN} bytes")
    return write_secret(path, key.hex() + "\n", replace=replace)


def read_mac_key(path):
    """
    Read a MAC key written by L{write_mac_key}.

    @raise PKIError: bad mode, or not C{wire.KEY_LEN} bytes of hex.
    """
    text = read_secret(path).strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise PKIError(f"{path}: not a hex MAC key")
    if len(key) != wire.KEY_LEN:
        raise PKIError(f"{path}: MAC key must be {wire.KEY_LEN} bytes, got {len(key)}")
    return key


# -- PEM ---------------------------------------------------------------------

def generate_key():
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key):
    """PKCS#8 PEM of C{key}, unencrypted (protect the file instead)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert):
    """PEM of a certificate (cryptography or pyOpenSSL)."""
    return as_cryptography(cert).public_bytes(serialization.Encoding.PEM)


def load_key(path):
    """
    Read a PEM private key through L{read_secret} (so a key file with a
    wide mode is refused).
    """
    data = read_secret(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(f"{path}: not an unencrypted PEM private key ({e})")


def load_cert(path):
    """Read one PEM certificate (the first, if the file holds a chain)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file")
    except OSError as e:
        raise PKIError(f"{path}: cannot read: {e.strerror}")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM certificate ({e})")


# -- issuing -----------------------------------------------------------------

def _utcnow(now):
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if isinstance(now, (int, float)):
        return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return now


def _builder(subject, issuer, public_key, now, lifetime, limit=None):
    start = _utcnow(now) - BACKDATE
    end = start + BACKDATE + lifetime
    if limit is not None:
        end = min(end, limit)  # a leaf must not outlive its CA
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def _leaf_usage():
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)


def create_ca(name="p2pnat CA", *, now=None, years=CA_YEARS):
    """
    Make a new CA.

    @param name: the CA's common name.
    @param now: issue time (datetime or POSIX seconds); default: the clock.
    @return: C{(certificate, private_key)}, cryptography objects.
    """
    key = generate_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pnat"),
        x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
    ])
    cert = (_builder(subject, subject, key.public_key(), now, years * _YEAR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _issue(ca_cert, ca_key, subject, key, now, lifetime, usage, san):
    ca_cert = as_cryptography(ca_cert)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (_builder(subject, ca_cert.subject, key.public_key(), now, lifetime,
                        ca_cert.not_valid_after_utc)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_leaf_usage(), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectAlternativeName(san), critical=False))
    return builder.sign(ca_key, hashes.SHA256()), key


def normalize_hostname(hostname):
    """
    Check a relay host name (a DNS name or an IP address) and return it in
    canonical form (lower case, no trailing dot; IP addresses compressed).

    @raise PKIError: if it is neither.
    """
    if not isinstance(hostname, str) or not hostname:
        raise PKIError("the relay hostname is empty")
    try:
        return str(ipaddress.ip_address(hostname.strip("[]")))
    except ValueError:
        pass
    name = hostname.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or not all(
            1 <= len(label) <= 63 and label[0] != "-" and label[-1] != "-"
            and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
            for label in labels):
        raise PKIError(f"not a DNS name or IP address: {hostname!r}")
    return name


def issue_server_cert(ca_cert, ca_key, hostname, *, now=None, years=SERVER_YEARS):
    """
    Issue the relay's TLS server certificate for C{hostname}.

    A DNS name gets subjectAltName entries C{hostname} and C{*.hostname} (so
    that per-device names under it can be served); an IP address gets an IP
    entry only (an IP in a DNS entry makes service_identity reject the
    certificate).

    @return: C{(certificate, private_key)}.
    @raise PKIError: if C{hostname} is not a DNS name or IP address.
    """
    hostname = normalize_hostname(hostname)
    try:
        san = [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        san = [x509.DNSName(hostname), x509.DNSName(f"*.{hostname}")]
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pnat"),
        x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
    ])
    return _issue(ca_cert, ca_key, subject, generate_key(), now, years * _YEAR,
                  ExtendedKeyUsageOID.SERVER_AUTH, san)


def _issue_peer_cert(ca_cert, ca_key, kind, uri_prefix, peer_id, now, years):
    """A device's or lobby client's certificate (see the module)."""
    if not isinstance(peer_id, str) or not wire.valid_key_id(peer_id):
        raise PKIError(f"not a valid {kind} ID: {peer_id!r}")
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"p2pnat {kind}"),
        x509.NameAttribute(NameOID.COMMON_NAME, peer_id),
    ])
    return _issue(ca_cert, ca_key, subject, generate_key(), now, years * _YEAR,
                  ExtendedKeyUsageOID.CLIENT_AUTH,
                  [x509.UniformResourceIdentifier(uri_prefix + peer_id)])


def issue_device_cert(ca_cert, ca_key, device_id, *, now=None, years=DEVICE_YEARS):
    """
    Issue a device's TLS client certificate: common name C{device_id} and
    subjectAltName URI C{p2pnat:device:<device_id>}.

    @return: C{(certificate, private_key)}.
    @raise PKIError: if C{device_id} is not a valid key ID.
    """
    return _issue_peer_cert(ca_cert, ca_key, "device", DEVICE_URI_PREFIX, device_id, now, years)


def issue_client_cert(ca_cert, ca_key, client_id, *, now=None, years=CLIENT_YEARS):
    """
    Issue a lobby client's certificate, for QUIC between peers: common name
    C{client_id}, subjectAltName URI C{p2pnat:client:<client_id>},
    clientAuth; the same shape as a device's.

    @return: C{(certificate, private_key)}.
    @raise PKIError: if C{client_id} is not a valid key ID.
    """
    return _issue_peer_cert(ca_cert, ca_key, "client", CLIENT_URI_PREFIX, client_id, now, years)


# -- reading certificates ----------------------------------------------------

def as_cryptography(cert):
    """
    Accept a cryptography certificate, a pyOpenSSL C{X509}, or a Twisted
    L{twisted.internet.ssl.Certificate} (which wraps one in C{.original}).
    """
    if isinstance(cert, x509.Certificate):
        return cert
    original = getattr(cert, "original", None)
    if original is not None and hasattr(original, "to_cryptography"):
        cert = original
    if hasattr(cert, "to_cryptography"):
        return cert.to_cryptography()
    raise TypeError(f"not a certificate: {cert!r}")


def fingerprint(cert):
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    der = as_cryptography(cert).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def device_id_of(cert):
    """
    The device ID a device certificate names, or None if it is not a
    device certificate.

    Call it on a certificate whose chain to the deployment's CA has already
    been verified (by the TLS handshake): it reads names, it does not check
    signatures.  A device certificate carries exactly one
    C{p2pnat:device:<id>} URI, C{<id>} is a valid key ID equal to the
    common name, and it allows clientAuth.  (The relay's own certificate,
    for one, is not a device certificate.)

    @param cert: a cryptography certificate, a pyOpenSSL C{X509} or a
        Twisted C{Certificate}.
    @raise TypeError: if C{cert} is not a certificate at all.
    """
    cert = as_cryptography(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    ids = [uri[len(DEVICE_URI_PREFIX):]
           for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
           if uri.startswith(DEVICE_URI_PREFIX)]
    if len(ids) != 1 or not wire.valid_key_id(ids[0]):
        return None
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != ids or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return None
    return ids[0]


def covers_hostname(cert, hostname):
    """
    Whether a client checking C{hostname} (a DNS name or IP address) the
    way Twisted does (with service_identity) accepts server certificate
    C{cert}.
    """
    from service_identity import VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    cert = as_cryptography(cert)
    try:
        try:
            ip = ipaddress.ip_address(hostname.strip("[]"))
        except ValueError:
            verify_certificate_hostname(cert, hostname)
        else:
            verify_certificate_ip_address(cert, str(ip))
    except VerificationError:
        return False
    except Exception:  # CertificateError on malformed names and patterns
        return False
    return True
