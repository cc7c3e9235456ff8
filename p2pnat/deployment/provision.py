# -*- test-case-name: tests.unit.test_provision -*-
"""
``p2pnat relay``, ``p2pnat device`` and ``p2pnat client``: set up a
deployment's CA and relay certificate, and provision devices and lobby
clients.  Non-interactive, for scripts; failures are one line, status 2.

A relay state directory (mode 0700)::

    ca.crt            the deployment CA (public: goes into every device bundle)
    ca.key            its private key (0600)
    relay.crt         the relay's TLS server certificate for its hostname
    relay.key         its private key (0600)
    registry.sqlite3  devices and lobby clients (0600; plus -wal/-shm files)
    deployment.toml   hostname, UDP address, tunnel port given to `relay init`

A device bundle (``device add --out``, mode 0700)::

    agent.toml   run with: twistd -n device-agent --config OUT/agent.toml
    device.key   the device's private key (0600)
    device.crt   its client certificate, signed by the CA
    ca.crt       the CA, to check the relay's certificate
    mac.key      the 32-byte MAC key for UDP control frames, hex (0600)

A lobby client bundle (``client add --out``): ``client.toml`` and
``mac.key``.

No command prints a private key or a MAC key.  A generated access
credential is printed once, by the command that made it.
"""

import datetime
import json
import os
import secrets
import sys
import tomllib

from cryptography import x509

from p2pnat.cli import CommandError
from p2pnat.daemon.config import parse_hostport
from p2pnat.deployment import pki, registry
from p2pnat.protocol import wire

CA_CERT = pki.CA_CERT_FILE
CA_KEY = pki.CA_KEY_FILE
RELAY_CERT = pki.RELAY_CERT_FILE
RELAY_KEY = pki.RELAY_KEY_FILE
REGISTRY = registry.REGISTRY_FILE
DEPLOYMENT = "deployment.toml"

AGENT_CONFIG = "agent.toml"
DEVICE_KEY = pki.DEVICE_KEY_FILE
DEVICE_CERT = pki.DEVICE_CERT_FILE
MAC_KEY = pki.MAC_KEY_FILE
CLIENT_CONFIG = "client.toml"


# -- helpers -----------------------------------------------------------------

def _toml_str(value):
    # A JSON string with ASCII escapes is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _when(t):
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _hostport(text, what):
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        raise CommandError(f"{what}: {e}")
    if port == 0:
        raise CommandError(f"{what}: port 0 in {text!r}")
    return host, port


def _join_hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_id(kind, key_id):
    if not wire.valid_key_id(key_id):
        raise CommandError(
            f"invalid {kind} ID {key_id!r}: 1-{wire.MAX_KEY_ID} characters of"
            " A-Z a-z 0-9 . _ -, starting with a letter or digit")


def _open_registry(state_dir, create=False):
    path = os.path.join(state_dir, REGISTRY)
    if not create and not os.path.exists(path):
        raise CommandError(f"{path}: no registry; run `p2pnat relay init` first")
    try:
        return registry.Registry(path, create=create)
    except registry.RegistryError as e:
        raise CommandError(str(e))


def _read_deployment(state_dir):
    path = os.path.join(state_dir, DEPLOYMENT)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("deployment", {})
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CommandError(f"{path}: unreadable: {e}")


def _write_deployment(state_dir, hostname, udp, tunnel_port, replace):
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
                     replace=replace)


def _check_absent(paths, hint):
    for path in paths:
        if os.path.lexists(path):
            raise CommandError(f"{path} already exists; {hint}")


def _pki(call, *args, **kw):
    try:
        return call(*args, **kw)
    except pki.PKIError as e:
        raise CommandError(str(e))


class _Bundle:
    """
    Files written into an --out directory; removed again if a later step
    fails, so that a failed command leaves no half bundle behind.
    """

    def __init__(self, out):
        self.out = out
        self.made_dir = not os.path.exists(out)
        self.written = []

    def path(self, name):
        return os.path.join(self.out, name)

    def secret(self, name, data):
        self.written.append(_pki(pki.write_secret, self.path(name), data))

    def public(self, name, data):
        self.written.append(_pki(pki.write_public, self.path(name), data))

    def undo(self):
        for path in self.written:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.made_dir:
            try:
                os.rmdir(self.out)
            except OSError:
                pass


def _group(subparsers, name, help):
    parser = subparsers.add_parser(name, help=help, description=help)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    def no_action(args):
        parser.print_help(sys.stderr)
        return 2

    parser.set_defaults(func=no_action)
    return actions


def _state_dir(parser):
    parser.add_argument("--state-dir", required=True, metavar="DIR",
                        help="the relay's state directory (CA, certificates, registry)")


# -- relay -------------------------------------------------------------------

def init_relay_state(state, hostname, *, udp=None, tunnel_port=None, replace=False):
    """
    Create a relay state directory's CA, relay certificate for C{hostname}
    and registry (the work of ``p2pnat relay init``; the relay daemon also
    calls it on a first start).

    @return: ``(ca_cert, relay_cert, active devices already registered)``.
    """
    _pki(pki.make_private_dir, state)
    ca_cert, ca_key = pki.create_ca(f"p2pnat CA for {hostname}")
    relay_cert, relay_key = pki.issue_server_cert(ca_cert, ca_key, hostname)
    path = lambda name: os.path.join(state, name)  # noqa: E731
    _pki(pki.write_secret, path(CA_KEY), pki.key_pem(ca_key), replace=replace)
    _pki(pki.write_public, path(CA_CERT), pki.cert_pem(ca_cert), replace=replace)
    _pki(pki.write_secret, path(RELAY_KEY), pki.key_pem(relay_key), replace=replace)
    _pki(pki.write_public, path(RELAY_CERT), pki.cert_pem(relay_cert), replace=replace)
    _write_deployment(state, hostname, udp, tunnel_port, replace=True)
    with _open_registry(state, create=True) as reg:
        old_devices = len(reg.devices())
    return ca_cert, relay_cert, old_devices


def relay_init(args, out=None):
    out = out or sys.stdout
    state = args.state_dir
    hostname = _pki(pki.normalize_hostname, args.hostname)
    udp = None
    if args.udp is not None:
        udp = _join_hostport(*_hostport(args.udp, "--udp"))
    if args.tunnel_port is not None and not 1 <= args.tunnel_port <= 65535:
        raise CommandError(f"--tunnel-port: not a port number: {args.tunnel_port}")
    existing = [os.path.join(state, name) for name in (CA_KEY, CA_CERT, RELAY_KEY, RELAY_CERT)
                if os.path.lexists(os.path.join(state, name))]
    if existing and not args.force:
        raise CommandError(
            f"{existing[0]} already exists; --force replaces the CA and relay certificate"
            " (every device must then be provisioned again)")
    had_registry = os.path.exists(os.path.join(state, REGISTRY))
    ca_cert, relay_cert, old_devices = init_relay_state(
        state, hostname, udp=udp, tunnel_port=args.tunnel_port, replace=args.force)

    names = ", ".join(str(v.value) for v in relay_cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value)
    print(f"state directory {os.path.abspath(state)}:", file=out)
    print(f"  {CA_CERT}  CA certificate, SHA-256 {pki.fingerprint(ca_cert)},"
          f" valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  {CA_KEY}  CA private key (0600)", file=out)
    print(f"  {RELAY_CERT}  relay server certificate for {names},"
          f" valid until {relay_cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  {RELAY_KEY}  relay private key (0600)", file=out)
    print(f"  {REGISTRY}  device registry ({'kept' if had_registry else 'new, empty'})",
          file=out)
    print(f"  {DEPLOYMENT}  hostname {hostname}"
          + (f", UDP {udp}" if udp else "")
          + (f", tunnel port {args.tunnel_port}" if args.tunnel_port else ""), file=out)
    if had_registry and old_devices:
        print(f"note: the registry has {old_devices} active device(s) certified by the old CA;"
              " provision them again with `p2pnat device add ID --replace ...`", file=out)
    return 0


def relay_reissue(args, out=None):
    out = out or sys.stdout
    state = args.state_dir
    ca_cert = _pki(pki.load_cert, os.path.join(state, CA_CERT))
    ca_key = _pki(pki.load_key, os.path.join(state, CA_KEY))
    deployment = _read_deployment(state)
    hostname = args.hostname or deployment.get("hostname")
    if not hostname:
        raise CommandError("--hostname is needed (no hostname in deployment.toml)")
    hostname = _pki(pki.normalize_hostname, hostname)
    cert, key = pki.issue_server_cert(ca_cert, ca_key, hostname)
    _pki(pki.write_secret, os.path.join(state, RELAY_KEY), pki.key_pem(key), replace=True)
    _pki(pki.write_public, os.path.join(state, RELAY_CERT), pki.cert_pem(cert), replace=True)
    if hostname != deployment.get("hostname"):
        _write_deployment(state, hostname, deployment.get("udp"), deployment.get("tunnel_port"),
                          replace=True)
    print(f"{os.path.join(state, RELAY_CERT)}: new relay certificate for {hostname},"
          f" valid until {cert.not_valid_after_utc:%Y-%m-%d}; restart the relay", file=out)
    return 0


# -- devices -----------------------------------------------------------------

def _credential(args):
    if args.access == "device":
        if args.credential_file or args.generate_credential:
            raise CommandError("an access credential is only used with --access relay")
        return None, False
    if args.generate_credential:
        return secrets.token_urlsafe(18), True
    if not args.credential_file:
        raise CommandError("--access relay needs --credential-file F or --generate-credential")
    try:
        with open(args.credential_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CommandError(f"{args.credential_file}: cannot read: {e.strerror}")
    credential = data.rstrip(b"\r\n")
    if not credential:
        raise CommandError(f"{args.credential_file}: empty credential")
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


def device_add(args, out=None):
    out = out or sys.stdout
    device_id, state = args.id, args.state_dir
    _check_id("device", device_id)
    if not 1 <= args.years <= 5:
        raise CommandError(f"--years must be 1 to 5, got {args.years}")
    ca_cert = _pki(pki.load_cert, os.path.join(state, CA_CERT))
    ca_key = _pki(pki.load_key, os.path.join(state, CA_KEY))
    deployment = _read_deployment(state)

    relay = args.relay
    if relay is None:
        if not deployment.get("hostname") or not deployment.get("udp"):
            raise CommandError("--relay HOST:PORT is needed (`relay init` was given no --udp)")
        relay = _join_hostport(deployment["hostname"],
                               _hostport(deployment["udp"], DEPLOYMENT)[1])
    relay_host, relay_port = _hostport(relay, "--relay")
    relay = _join_hostport(relay_host, relay_port)
    service = _join_hostport(*_hostport(args.service, "--service"))
    relay_hostname = _pki(pki.normalize_hostname,
                          args.relay_hostname or deployment.get("hostname") or relay_host)
    relay_cert_path = os.path.join(state, RELAY_CERT)
    if os.path.exists(relay_cert_path):
        relay_cert = _pki(pki.load_cert, relay_cert_path)
        if not pki.covers_hostname(relay_cert, relay_hostname):
            raise CommandError(
                f"relay hostname {relay_hostname} is not in {relay_cert_path}; give"
                " --relay-hostname, or reissue it with `p2pnat relay reissue-cert`")
    credential, generated = _credential(args)

    with _open_registry(state) as reg:
        old = reg.device(device_id)
        if old is not None and not args.replace:
            state_text = f"revoked {_when(old.revoked)}" if old.revoked else "active"
            raise CommandError(f"device {device_id} already exists ({state_text});"
                               " --replace issues it new keys and certificate")
        bundle = _Bundle(args.out)
        _check_absent([bundle.path(n) for n in (AGENT_CONFIG, DEVICE_KEY, DEVICE_CERT,
                                                 CA_CERT, MAC_KEY)],
                      "choose an empty --out directory")
        mac_key = secrets.token_bytes(wire.KEY_LEN)
        cert, key = pki.issue_device_cert(ca_cert, ca_key, device_id, years=args.years)
        _pki(pki.make_private_dir, args.out)
        try:
            bundle.secret(DEVICE_KEY, pki.key_pem(key))
            bundle.secret(MAC_KEY, mac_key.hex() + "\n")
            bundle.public(DEVICE_CERT, pki.cert_pem(cert))
            bundle.public(CA_CERT, pki.cert_pem(ca_cert))
            bundle.public(AGENT_CONFIG, _agent_toml(device_id, relay, relay_hostname, service))
            reg.add_device(device_id, mac_key, pki.fingerprint(cert), args.access, credential,
                           replace=args.replace)
        except registry.RegistryError as e:
            bundle.undo()
            raise CommandError(str(e))
        except BaseException:
            bundle.undo()
            raise

    config = os.path.abspath(bundle.path(AGENT_CONFIG))
    print(f"device {device_id}: {'re-provisioned' if old else 'added'},"
          f" access mode {args.access}", file=out)
    print(f"  certificate SHA-256 {pki.fingerprint(cert)},"
          f" valid until {cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  bundle in {os.path.abspath(args.out)}: {AGENT_CONFIG}, {DEVICE_KEY} (0600),"
          f" {DEVICE_CERT}, {CA_CERT}, {MAC_KEY} (0600)", file=out)
    print(f"  run on the device: twistd -n device-agent --config {config}", file=out)
    if generated:
        print(f"access credential (shown only now; stored hashed): {credential}", file=out)
    return 0


def device_list(args, out=None):
    out = out or sys.stdout
    with _open_registry(args.state_dir) as reg:
        records = reg.devices(include_revoked=True)
    rows = [{
        "id": d.id,
        "access_mode": d.access_mode,
        "created": _when(d.created),
        "revoked": _when(d.revoked),
        "last_access": _when(d.last_access),
        "last_address": _join_hostport(*d.address) if d.address else None,
        "cert_fingerprint": d.cert_fingerprint,
    } for d in records]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    _table(out, ["ID", "ACCESS", "CREATED", "REVOKED", "LAST ACCESS", "LAST ADDRESS"],
           [[r["id"], r["access_mode"], r["created"], r["revoked"], r["last_access"],
             r["last_address"]] for r in rows])
    return 0


def _table(out, head, rows):
    rows = [[cell if cell is not None else "-" for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)


def device_remove(args, out=None):
    out = out or sys.stdout
    with _open_registry(args.state_dir) as reg:
        record = reg.device(args.id)
        if record is None:
            raise CommandError(f"no device {args.id!r}")
        if not reg.revoke_device(args.id):
            print(f"device {args.id}: already revoked {_when(record.revoked)}", file=out)
            return 0
    print(f"device {args.id}: revoked; a running relay refuses it once it notices",
          file=out)
    return 0


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
"""


def client_add(args, out=None):
    out = out or sys.stdout
    client_id = args.id
    _check_id("client", client_id)
    lobby = _join_hostport(*_hostport(args.lobby, "--lobby"))
    _pki(pki.make_private_dir, args.state_dir)
    with _open_registry(args.state_dir, create=True) as reg:
        old = reg.client(client_id)
        if old is not None and not args.replace:
            state_text = f"revoked {_when(old.revoked)}" if old.revoked else "active"
            raise CommandError(f"client {client_id} already exists ({state_text});"
                               " --replace issues it a new key")
        bundle = _Bundle(args.out)
        _check_absent([bundle.path(CLIENT_CONFIG), bundle.path(MAC_KEY)],
                      "choose an empty --out directory")
        mac_key = secrets.token_bytes(wire.KEY_LEN)
        _pki(pki.make_private_dir, args.out)
        try:
            bundle.secret(MAC_KEY, mac_key.hex() + "\n")
            bundle.public(CLIENT_CONFIG, _client_toml(client_id, lobby))
            reg.add_client(client_id, mac_key, replace=args.replace)
        except registry.RegistryError as e:
            bundle.undo()
            raise CommandError(str(e))
        except BaseException:
            bundle.undo()
            raise
    print(f"client {client_id}: {'re-provisioned' if old else 'added'};"
          f" {CLIENT_CONFIG} and {MAC_KEY} (0600) in {os.path.abspath(args.out)}", file=out)
    return 0


def client_list(args, out=None):
    out = out or sys.stdout
    with _open_registry(args.state_dir) as reg:
        records = reg.clients(include_revoked=True)
    rows = [{"id": c.id, "created": _when(c.created), "revoked": _when(c.revoked)}
            for c in records]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    _table(out, ["ID", "CREATED", "REVOKED"],
           [[r["id"], r["created"], r["revoked"]] for r in rows])
    return 0


def client_remove(args, out=None):
    out = out or sys.stdout
    with _open_registry(args.state_dir) as reg:
        record = reg.client(args.id)
        if record is None:
            raise CommandError(f"no client {args.id!r}")
        if not reg.revoke_client(args.id):
            print(f"client {args.id}: already revoked {_when(record.revoked)}", file=out)
            return 0
    print(f"client {args.id}: revoked", file=out)
    return 0


# -- registration ------------------------------------------------------------

def add_parser(subparsers):
    relay = _group(subparsers, "relay", "create the deployment's CA and relay certificate")
    p = relay.add_parser("init", help="create the CA, the relay certificate and the registry")
    _state_dir(p)
    p.add_argument("--hostname", required=True,
                   help="the relay's public DNS name (or IP address), put in its certificate")
    p.add_argument("--udp", metavar="HOST:PORT",
                   help="the relay's UDP notify listen address (recorded; its port is the"
                        " default for `device add --relay`)")
    p.add_argument("--tunnel-port", type=int, metavar="N",
                   help="the relay's TLS port for device tunnels (recorded)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing CA and relay certificate")
    p.set_defaults(func=relay_init)
    p = relay.add_parser("reissue-cert",
                         help="issue a new relay certificate from the existing CA")
    _state_dir(p)
    p.add_argument("--hostname", help="new hostname (default: the one in deployment.toml)")
    p.set_defaults(func=relay_reissue)

    device = _group(subparsers, "device", "provision, list and revoke devices")
    p = device.add_parser("add", help="register a device and write its agent bundle")
    p.add_argument("id", metavar="ID", help="the device ID")
    _state_dir(p)
    p.add_argument("--relay", metavar="HOST:PORT",
                   help="the relay's UDP notify address as the device reaches it"
                        " (default: the hostname and --udp port given to `relay init`)")
    p.add_argument("--service", required=True, metavar="HOST:PORT",
                   help="the device's local web server (or TCP service) to forward to")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the agent bundle (created 0700)")
    p.add_argument("--relay-hostname", metavar="NAME",
                   help="name the agent checks in the relay's certificate"
                        " (default: the relay's hostname)")
    p.add_argument("--access", choices=registry.ACCESS_MODES, default="device",
                   help="who asks the terminal to log in: the device's own web UI (device)"
                        " or the relay (relay, with an access credential)")
    cred = p.add_mutually_exclusive_group()
    cred.add_argument("--credential-file", metavar="F",
                      help="file holding the access credential for --access relay")
    cred.add_argument("--generate-credential", action="store_true",
                      help="generate an access credential and print it once")
    p.add_argument("--years", type=int, default=pki.DEVICE_YEARS,
                   help=f"certificate lifetime, 1-5 years (default {pki.DEVICE_YEARS})")
    p.add_argument("--replace", action="store_true",
                   help="re-provision an existing or revoked device with new keys")
    p.set_defaults(func=device_add)
    p = device.add_parser("list", help="list devices")
    _state_dir(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=device_list)
    p = device.add_parser("remove", help="revoke a device (its row is kept, marked revoked)")
    p.add_argument("id", metavar="ID")
    _state_dir(p)
    p.set_defaults(func=device_remove)

    client = _group(subparsers, "client", "provision, list and revoke lobby clients")
    p = client.add_parser("add", help="register a lobby client and write its bundle")
    p.add_argument("id", metavar="ID", help="the client ID")
    _state_dir(p)
    p.add_argument("--lobby", required=True, metavar="HOST:PORT",
                   help="the lobby's UDP address")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for client.toml and mac.key (created 0700)")
    p.add_argument("--replace", action="store_true",
                   help="re-provision an existing or revoked client with a new key")
    p.set_defaults(func=client_add)
    p = client.add_parser("list", help="list lobby clients")
    _state_dir(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=client_list)
    p = client.add_parser("remove", help="revoke a lobby client")
    p.add_argument("id", metavar="ID")
    _state_dir(p)
    p.set_defaults(func=client_remove)
