# -*- test-case-name: tests.unit.test_provision -*-
"""
Provisioning as library calls: set up a deployment's CA and relay
certificate, and provision devices and lobby clients.  The ``p2pnat relay``,
``device`` and ``client`` commands (L{p2pnat.cli.provision}) are one
caller; the relay daemon (its first start) and ``p2pnat demo`` are others.

Every function takes plain parameters and raises L{ProvisionError} with a
one-line message fit for a user.  The messages name the settings as the
``p2pnat`` command spells its options (``--relay``, ``--force``), since
that is where a person meets them.

A relay state directory (mode 0700)::

    ca.crt            the deployment CA (public: goes into every device bundle)
    ca.key            its private key (0600)
    relay.crt         the relay's TLS server certificate for its hostname
    relay.key         its private key (0600)
    registry.sqlite3  devices and lobby clients (0600; plus -wal/-shm files)
    deployment.toml   hostname, UDP address, tunnel port given to `relay init`

A device bundle (L{add_device}'s C{out}, mode 0700)::

    agent.toml   run with: twistd -n device-agent --config OUT/agent.toml
    device.key   the device's private key (0600)
    device.crt   its client certificate, signed by the CA
    ca.crt       the CA, to check the relay's certificate
    mac.key      the 32-byte MAC key for UDP control frames, hex (0600)

A lobby client bundle (L{add_client}, mode 0700)::

    client.toml  run with: p2pnat peer wait|connect --config OUT/client.toml
    mac.key      the 32-byte MAC key for the lobby's UDP frames, hex (0600)
    client.key   the client's private key for QUIC between peers (0600)
    client.crt   its certificate (``p2pnat:client:<id>``), signed by the CA
    ca.crt       the CA, to check peers' certificates

A lobby's state directory holds the CA its clients' certificates come
from: the relay's (``relay init`` in the same directory, so that clients
and devices share one CA), or one that the first ``client add`` makes
there (``ca.crt``, ``ca.key`` 0600).

Nothing here returns or prints a private key or a MAC key; a generated
access credential is returned once, by the call that made it.
"""

import datetime
import functools
import json
import os
import secrets
import tomllib
from dataclasses import dataclass

from p2pnat.daemon.config import parse_hostport
from p2pnat.deployment import pki, registry
from p2pnat.protocol import wire

CA_CERT = pki.CA_CERT_FILE
CA_KEY = pki.CA_KEY_FILE
RELAY_CERT = pki.RELAY_CERT_FILE
RELAY_KEY = pki.RELAY_KEY_FILE
REGISTRY = registry.REGISTRY_FILE
DEPLOYMENT = "deployment.toml"
#: The relay's own secret (terminal_secret).
TERMINAL_SECRET = "terminal.secret"

AGENT_CONFIG = "agent.toml"
DEVICE_KEY = pki.DEVICE_KEY_FILE
DEVICE_CERT = pki.DEVICE_CERT_FILE
MAC_KEY = pki.MAC_KEY_FILE
CLIENT_CONFIG = "client.toml"
CLIENT_CERT = pki.CLIENT_CERT_FILE
CLIENT_KEY = pki.CLIENT_KEY_FILE

#: The files of a device bundle, and of a lobby client bundle.
DEVICE_BUNDLE = (AGENT_CONFIG, DEVICE_KEY, DEVICE_CERT, CA_CERT, MAC_KEY)
CLIENT_BUNDLE = (CLIENT_CONFIG, MAC_KEY, CLIENT_KEY, CLIENT_CERT, CA_CERT)


class ProvisionError(Exception):
    """
    A provisioning failure (bad parameter, missing or unusable state, a
    duplicate), with a one-line message fit for a user.
    """


def _user_errors(f):
    # The certificate and registry layers already word their errors for a
    # user; callers of this module need only catch ProvisionError.
    @functools.wraps(f)
    def wrapper(*args, **kw):
        try:
            return f(*args, **kw)
        except (pki.PKIError, registry.RegistryError) as e:
            raise ProvisionError(str(e)) from e

    return wrapper


# -- helpers -----------------------------------------------------------------

def format_time(t):
    """POSIX time C{t} as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), or None for None."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _toml_str(value):
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _hostport(text, what):
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        raise ProvisionError(f"{what}: {e}")
    if port == 0:
        raise ProvisionError(f"{what}: port 0 in {text!r}")
    return host, port


def _canonical_hostport(text, what):
    return wire.format_addr(_hostport(text, what))


def _open_registry(state_dir, create=False):
    path = os.path.join(state_dir, REGISTRY)
    if not create and not os.path.exists(path):
        raise ProvisionError(f"{path}: no registry; run `p2pnat relay init` first")
    return registry.Registry(path, create=create)


def _read_deployment(state_dir):
    path = os.path.join(state_dir, DEPLOYMENT)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("deployment", {})
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProvisionError(f"{path}: unreadable: {e}")


def _write_deployment(state_dir, hostname, udp, tunnel_port):
    lines = [
        "# Written by `p2pnat relay init`: what `p2pnat device add` uses for defaults.",
        "[deployment]",
        "# The relay's name, as in relay.crt.",
        f"hostname = {_toml_str(hostname)}",
    ]
    if udp is not None:
        lines += ["# The relay's UDP notify listen address.", f"udp = {_toml_str(udp)}"]
    if tunnel_port is not None:
        lines += ["# The relay's TLS port for device tunnels.", f"tunnel_port = {tunnel_port}"]
    pki.write_public(os.path.join(state_dir, DEPLOYMENT), "\n".join(lines) + "\n",
                     replace=True)


def _load_ca(state_dir):
    return (pki.load_cert(os.path.join(state_dir, CA_CERT)),
            pki.load_key(os.path.join(state_dir, CA_KEY)))


def _write_relay_cert(state_dir, cert, key, replace):
    pki.write_secret(os.path.join(state_dir, RELAY_KEY), pki.key_pem(key), replace=replace)
    pki.write_public(os.path.join(state_dir, RELAY_CERT), pki.cert_pem(cert), replace=replace)


def _refuse_existing(record, kind, key_id, replace, what_replace_does):
    if record is not None and not replace:
        state_text = (f"revoked {format_time(record.revoked)}" if record.revoked is not None
                      else "active")
        raise ProvisionError(f"{kind} {key_id} already exists ({state_text});"
                             f" --replace {what_replace_does}")


def _write_bundle(out, names, files, register):
    """
    Write C{files} (C{(name, data, secret)}: secret ones 0600, in this
    order) as new files in directory C{out} (made 0700), then call
    C{register()}.  None of C{names} (the bundle's files, in the order they
    are checked) may exist before.  If any step fails, what was written is
    removed again (and C{out}, if this made it), so that a failure leaves
    no half bundle behind.
    """
    assert sorted(names) == sorted(name for name, _, _ in files)
    for name in names:
        if os.path.lexists(os.path.join(out, name)):
            raise ProvisionError(f"{os.path.join(out, name)} already exists;"
                                 " choose an empty --out directory")
    made_dir = not os.path.exists(out)
    pki.make_private_dir(out)
    written = []
    try:
        for name, data, secret in files:
            write = pki.write_secret if secret else pki.write_public
            written.append(write(os.path.join(out, name), data))
        register()
    except BaseException:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        if made_dir:
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise


def _records(state_dir, kind):
    with _open_registry(state_dir) as reg:
        return getattr(reg, f"{kind}s")(include_revoked=True)


def _revoke(state_dir, kind, key_id):
    with _open_registry(state_dir) as reg:
        record = getattr(reg, kind)(key_id)
        if record is None:
            raise ProvisionError(f"no {kind} {key_id!r}")
        getattr(reg, f"revoke_{kind}")(key_id)
    return record


# -- the relay ---------------------------------------------------------------

def terminal_secret(state_dir):
    """
    The relay's own secret (0600): it signs terminals' login cookies, and a
    cluster's nodes derive their shared keys from it.  Made on first use
    (by ``p2pnat relay init``, or a relay's first start), read afterwards;
    every node of a cluster must have the same one.
    """
    path = os.path.join(state_dir, TERMINAL_SECRET)
    if os.path.exists(path):
        return bytes.fromhex(pki.read_secret(path).decode().strip())
    secret = os.urandom(32)
    pki.write_secret(path, secret.hex().encode() + b"\n")
    return secret


@_user_errors
def init_relay_state(state, hostname, *, udp=None, tunnel_port=None, replace=False):
    """
    Create a relay state directory's CA, relay certificate for C{hostname}
    and registry, with no checks of existing files beyond what C{replace}
    allows (the work of L{init_relay}; the relay daemon also calls it on a
    first start).

    @return: ``(ca_cert, relay_cert, active devices already registered)``.
    @raise ProvisionError: the directory or a file cannot be written, or a
        file exists and not C{replace}.
    """
    pki.make_private_dir(state)
    ca_cert, ca_key = pki.create_ca(f"p2pnat CA for {hostname}")
    relay_cert, relay_key = pki.issue_server_cert(ca_cert, ca_key, hostname)
    pki.write_secret(os.path.join(state, CA_KEY), pki.key_pem(ca_key), replace=replace)
    pki.write_public(os.path.join(state, CA_CERT), pki.cert_pem(ca_cert), replace=replace)
    _write_relay_cert(state, relay_cert, relay_key, replace)
    _write_deployment(state, hostname, udp, tunnel_port)
    # Now, not at the relay's first start: a cluster's nodes are copies of
    # this directory and must share it.  Kept when it exists (re-init).
    terminal_secret(state)
    with _open_registry(state, create=True) as reg:
        old_devices = len(reg.devices())
    return ca_cert, relay_cert, old_devices


@dataclass(frozen=True)
class RelayState:
    """
    What L{init_relay} made.

    @ivar udp: the recorded UDP notify address (canonical), or None.
    @ivar kept_registry: whether a registry was there before (it is kept).
    @ivar old_devices: active devices in a kept registry, certified by the
        CA this call replaced.
    """

    state_dir: str
    hostname: str
    udp: str | None
    tunnel_port: int | None
    ca_cert: object
    relay_cert: object
    kept_registry: bool
    old_devices: int


@_user_errors
def init_relay(state_dir, hostname, *, udp=None, tunnel_port=None, force=False):
    """
    Check the parameters, then L{init_relay_state} (``p2pnat relay init``).

    @param udp: the relay's UDP notify listen address, ``HOST:PORT``
        (recorded; its port is the default of L{add_device}'s C{relay}).
    @param tunnel_port: the relay's TLS port for device tunnels (recorded).
    @param force: replace an existing CA and relay certificate (every device
        must then be provisioned again); the registry is kept.
    @raise ProvisionError: a bad hostname, address or port; an existing CA
        without C{force}.
    """
    hostname = pki.normalize_hostname(hostname)
    if udp is not None:
        udp = _canonical_hostport(udp, "--udp")
    if tunnel_port is not None and not 1 <= tunnel_port <= 65535:
        raise ProvisionError(f"--tunnel-port: not a port number: {tunnel_port}")
    existing = [os.path.join(state_dir, name) for name in (CA_KEY, CA_CERT, RELAY_KEY, RELAY_CERT)
                if os.path.lexists(os.path.join(state_dir, name))]
    if existing and not force:
        raise ProvisionError(
            f"{existing[0]} already exists; --force replaces the CA and relay certificate"
            " (every device must then be provisioned again)")
    kept_registry = os.path.exists(os.path.join(state_dir, REGISTRY))
    ca_cert, relay_cert, old_devices = init_relay_state(
        state_dir, hostname, udp=udp, tunnel_port=tunnel_port, replace=force)
    return RelayState(state_dir, hostname, udp, tunnel_port, ca_cert, relay_cert,
                      kept_registry, old_devices)


@_user_errors
def reissue_relay_cert(state_dir, hostname=None):
    """
    Issue a new relay certificate from the existing CA (``p2pnat relay
    reissue-cert``), for C{hostname} or else the one in ``deployment.toml``
    (which records a new one).  The relay must be restarted to use it.

    @return: ``(hostname, certificate)``.
    """
    ca_cert, ca_key = _load_ca(state_dir)
    deployment = _read_deployment(state_dir)
    hostname = hostname or deployment.get("hostname")
    if not hostname:
        raise ProvisionError("--hostname is needed (no hostname in deployment.toml)")
    hostname = pki.normalize_hostname(hostname)
    cert, key = pki.issue_server_cert(ca_cert, ca_key, hostname)
    _write_relay_cert(state_dir, cert, key, True)
    if hostname != deployment.get("hostname"):
        _write_deployment(state_dir, hostname, deployment.get("udp"),
                          deployment.get("tunnel_port"))
    return hostname, cert


# -- devices -----------------------------------------------------------------

def read_credential(path):
    """
    The access credential in file C{path}: its bytes, less a final newline.

    @raise ProvisionError: unreadable or empty.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ProvisionError(f"{path}: cannot read: {e.strerror}")
    credential = data.rstrip(b"\r\n")
    if not credential:
        raise ProvisionError(f"{path}: empty credential")
    return credential


#: The fewest characters an access credential given at provisioning may
#: have (generated ones have 24).  The relay limits guesses, but a short
#: credential still falls to a patient attacker.  Devices provisioned with
#: shorter ones before this rule keep them, and they keep working.
MIN_CREDENTIAL = 12


def _credential(access, credential_file, generate):
    """``(credential or None, whether generated)`` for a device in mode C{access}."""
    if access == "device":
        if credential_file or generate:
            raise ProvisionError("an access credential is only used with --access relay")
        return None, False
    if generate:
        return secrets.token_urlsafe(18), True
    if not credential_file:
        raise ProvisionError("--access relay needs --credential-file F or --generate-credential")
    credential = read_credential(credential_file)
    n = len(credential.decode("utf-8", "replace"))
    if n < MIN_CREDENTIAL:
        raise ProvisionError(f"{credential_file}: the access credential has {n} characters;"
                             f" at least {MIN_CREDENTIAL} are needed (or --generate-credential)")
    return credential, False


def _agent_toml(device_id, relay, relay_hostname, service):
    return f"""\
# p2pnat device agent for device {device_id}, written by `p2pnat device add`.
# Run it with:
#     twistd -n device-agent --config DIR/agent.toml
# where DIR is the directory of this file; the file names below are relative
# to it.  device.key and mac.key are secrets (mode 0600): copy the directory
# to the device as it is, and keep it private.

[agent]
device_id = {_toml_str(device_id)}
# The relay's UDP notify address.
relay = {_toml_str(relay)}
# The name checked in the relay's TLS certificate.
relay_hostname = {_toml_str(relay_hostname)}
# 32-byte MAC key (hex) for the UDP control frames.
mac_key_file = "{MAC_KEY}"
# This device's client certificate and key, and the CA that signed the relay's.
cert_file = "{DEVICE_CERT}"
key_file = "{DEVICE_KEY}"
ca_file = "{CA_CERT}"
# The local web server (or any TCP service) that terminals are forwarded to.
service = {_toml_str(service)}
"""


@dataclass(frozen=True)
class DeviceBundle:
    """
    What L{add_device} made.

    @ivar out: the bundle's directory.
    @ivar cert: the device's new certificate.
    @ivar replaced: whether the device existed before (re-provisioned).
    @ivar credential: the generated access credential, or None (none was
        generated): the only time anything returns it.
    """

    device_id: str
    out: str
    cert: object
    access: str
    replaced: bool
    credential: str | None

    @property
    def config(self):
        """The absolute path of the bundle's ``agent.toml``."""
        return os.path.abspath(os.path.join(self.out, AGENT_CONFIG))


def _relay_address(relay, deployment):
    """The relay's UDP address as the device reaches it, canonical."""
    if relay is None:
        if not deployment.get("hostname") or not deployment.get("udp"):
            raise ProvisionError("--relay HOST:PORT is needed (`relay init` was given no --udp)")
        relay = wire.format_addr((deployment["hostname"],
                                  _hostport(deployment["udp"], DEPLOYMENT)[1]))
    return _hostport(relay, "--relay")


@_user_errors
def add_device(state_dir, device_id, out, *, service, relay=None, relay_hostname=None,
               access="device", credential_file=None, generate_credential=False,
               years=pki.DEVICE_YEARS, replace=False):
    """
    Register device C{device_id} in the relay state C{state_dir} and write
    its agent bundle to C{out} (``p2pnat device add``).

    @param service: the device's local web server (or TCP service),
        ``HOST:PORT``, that the agent forwards terminals to.
    @param relay: the relay's UDP notify address as the device reaches it,
        ``HOST:PORT`` (default: the hostname and UDP port recorded by
        L{init_relay}).
    @param relay_hostname: the name the agent checks in the relay's
        certificate (default: the relay's hostname); the relay's
        certificate must cover it.
    @param device_id: a lower-case DNS label (L{registry.check_new_device_id});
        with C{replace}, an existing device's ID as it is.
    @param access: ``"device"`` (the device's own web UI handles login) or
        ``"relay"`` (the relay asks for an access credential, read from
        C{credential_file} (at least L{MIN_CREDENTIAL} characters) or
        generated).
    @param years: certificate lifetime, 1 to 5.
    @param replace: re-provision an existing or revoked device with new keys.
    @raise ProvisionError: bad parameters, missing relay state, an existing
        device (and not C{replace}) or a non-empty C{out}; nothing is
        registered or left in C{out} then.
    """
    # A new ID becomes a host name; re-provisioning may keep an older kind.
    if replace:
        registry.check_id("device", device_id)
    else:
        registry.check_new_device_id(device_id)
    if not 1 <= years <= 5:
        raise ProvisionError(f"--years must be 1 to 5, got {years}")
    ca_cert, ca_key = _load_ca(state_dir)
    deployment = _read_deployment(state_dir)
    relay_host, relay_port = _relay_address(relay, deployment)
    relay = wire.format_addr((relay_host, relay_port))
    service = _canonical_hostport(service, "--service")
    relay_hostname = pki.normalize_hostname(
        relay_hostname or deployment.get("hostname") or relay_host)
    relay_cert_path = os.path.join(state_dir, RELAY_CERT)
    if os.path.exists(relay_cert_path) and not pki.covers_hostname(
            pki.load_cert(relay_cert_path), relay_hostname):
        raise ProvisionError(
            f"relay hostname {relay_hostname} is not in {relay_cert_path}; give"
            " --relay-hostname, or reissue it with `p2pnat relay reissue-cert`")
    credential, generated = _credential(access, credential_file, generate_credential)

    with _open_registry(state_dir) as reg:
        old = reg.device(device_id)
        _refuse_existing(old, "device", device_id, replace, "issues it new keys and certificate")
        mac_key = secrets.token_bytes(wire.KEY_LEN)
        cert, key = pki.issue_device_cert(ca_cert, ca_key, device_id, years=years)
        _write_bundle(out, DEVICE_BUNDLE, [
            (DEVICE_KEY, pki.key_pem(key), True),
            (MAC_KEY, mac_key.hex() + "\n", True),
            (DEVICE_CERT, pki.cert_pem(cert), False),
            (CA_CERT, pki.cert_pem(ca_cert), False),
            (AGENT_CONFIG, _agent_toml(device_id, relay, relay_hostname, service), False),
        ], lambda: reg.add_device(device_id, mac_key, pki.fingerprint(cert), access,
                                  credential, replace=replace))
    return DeviceBundle(device_id, out, cert, access, old is not None,
                        credential if generated else None)


@_user_errors
def devices(state_dir):
    """Every device of the relay state C{state_dir}, revoked ones included, by ID."""
    return _records(state_dir, "device")


@_user_errors
def remove_device(state_dir, device_id):
    """
    Revoke a device (``p2pnat device remove``); its row is kept, marked
    revoked, and a running relay refuses it once it notices.

    @return: the device's record as it was before: its C{revoked} is None
        if this call revoked it, else the time it was revoked already.
    @raise ProvisionError: no such device.
    """
    return _revoke(state_dir, "device", device_id)


# -- lobby clients -----------------------------------------------------------

def _client_toml(client_id, lobby):
    return f"""\
# p2pnat lobby client {client_id}, written by `p2pnat client add`.
# Paths are relative to this file; mac.key is a secret (mode 0600).

[client]
id = {_toml_str(client_id)}
# The lobby's UDP address.
lobby = {_toml_str(lobby)}
# 32-byte MAC key (hex) for the UDP control frames.
mac_key_file = "{MAC_KEY}"
# Certificate and key for end-to-end encrypted QUIC streams between peers,
# and the deployment's CA that peers' certificates must chain to.
cert_file = "{CLIENT_CERT}"
key_file = "{CLIENT_KEY}"
ca_file = "{CA_CERT}"
"""


def _client_ca(state_dir):
    """
    The CA of C{state_dir} for client certificates: the one there, or a
    new one made there for a lobby that has none (no relay shares the
    directory).  C{(cert, key, made)}.
    """
    if os.path.lexists(os.path.join(state_dir, CA_KEY)) or os.path.lexists(
            os.path.join(state_dir, CA_CERT)):
        return (*_load_ca(state_dir), False)
    ca_cert, ca_key = pki.create_ca("p2pnat CA for lobby clients")
    pki.write_secret(os.path.join(state_dir, CA_KEY), pki.key_pem(ca_key))
    pki.write_public(os.path.join(state_dir, CA_CERT), pki.cert_pem(ca_cert))
    return ca_cert, ca_key, True


@dataclass(frozen=True)
class ClientBundle:
    """
    What L{add_client} made.

    @ivar cert: the client's new certificate.
    @ivar replaced: whether the client existed before (re-provisioned).
    @ivar made_ca: whether this call made the state directory's CA.
    """

    client_id: str
    out: str
    cert: object
    replaced: bool
    made_ca: bool


@_user_errors
def add_client(state_dir, client_id, out, *, lobby, replace=False, years=pki.CLIENT_YEARS):
    """
    Register lobby client C{client_id} in C{state_dir} (made, with an empty
    registry, if missing) and write its bundle to C{out} (``p2pnat client
    add``): its MAC key for the lobby, and a certificate and key from the
    state directory's CA (made there if missing) for QUIC between peers.

    @param lobby: the lobby's UDP address, ``HOST:PORT``.
    @param replace: re-provision an existing or revoked client with a new
        key and certificate.
    @param years: certificate lifetime, 1 to 5.
    @return: a L{ClientBundle}.
    @raise ProvisionError: as for L{add_device}.
    """
    registry.check_id("client", client_id)
    lobby = _canonical_hostport(lobby, "--lobby")
    if not 1 <= years <= 5:
        raise ProvisionError(f"--years must be 1 to 5, got {years}")
    pki.make_private_dir(state_dir)
    with _open_registry(state_dir, create=True) as reg:
        old = reg.client(client_id)
        _refuse_existing(old, "client", client_id, replace,
                         "issues it a new key and certificate")
        ca_cert, ca_key, made_ca = _client_ca(state_dir)
        mac_key = secrets.token_bytes(wire.KEY_LEN)
        cert, key = pki.issue_client_cert(ca_cert, ca_key, client_id, years=years)
        _write_bundle(out, CLIENT_BUNDLE, [
            (MAC_KEY, mac_key.hex() + "\n", True),
            (CLIENT_KEY, pki.key_pem(key), True),
            (CLIENT_CERT, pki.cert_pem(cert), False),
            (CA_CERT, pki.cert_pem(ca_cert), False),
            (CLIENT_CONFIG, _client_toml(client_id, lobby), False),
        ], lambda: reg.add_client(client_id, mac_key, replace=replace))
    return ClientBundle(client_id, out, cert, old is not None, made_ca)


@_user_errors
def clients(state_dir):
    """Every lobby client of C{state_dir}, revoked ones included, by ID."""
    return _records(state_dir, "client")


@_user_errors
def remove_client(state_dir, client_id):
    """
    Revoke a lobby client (``p2pnat client remove``).

    @return: as for L{remove_device}.
    @raise ProvisionError: no such client.
    """
    return _revoke(state_dir, "client", client_id)
