# -*- test-case-name: tests.unit.test_provision -*-
"""
``p2pnat relay``, ``p2pnat device`` and ``p2pnat client``: the commands of
L{p2pnat.deployment.provision}.  Non-interactive, for scripts; a failure is
one line, status 2.

No command prints a private key or a MAC key.  A generated access
credential is printed once, by the command that made it.
"""

import functools
import json
import os
import sys

from cryptography import x509

from p2pnat.cli import CommandError
from p2pnat.deployment import pki, provision, registry
from p2pnat.deployment.provision import (
    AGENT_CONFIG,
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_CONFIG,
    CLIENT_KEY,
    DEPLOYMENT,
    DEVICE_CERT,
    DEVICE_KEY,
    MAC_KEY,
    REGISTRY,
    RELAY_CERT,
    RELAY_KEY,
    ProvisionError,
    format_time,
)
from p2pnat.protocol import wire


def _command(f):
    """
    A command C{f(args, out)}: it prints to C{out} (default: standard
    output), and its L{ProvisionError} is the user's L{CommandError}.
    """
    @functools.wraps(f)
    def command(args, out=None):
        try:
            return f(args, out or sys.stdout)
        except ProvisionError as e:
            raise CommandError(str(e)) from e

    return command


def _table(out, head, rows):
    rows = [[cell if cell is not None else "-" for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [head] + rows) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip(), file=out)


def _listing(args, out, rows, head):
    """Print C{rows} (dicts) as JSON with --json, else as a table of C{head}: key."""
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        _table(out, list(head), [[r[key] for key in head.values()] for r in rows])
    return 0


def _removed(out, kind, key_id, before, consequence):
    if before.revoked is not None:
        print(f"{kind} {key_id}: already revoked {format_time(before.revoked)}", file=out)
    else:
        print(f"{kind} {key_id}: revoked{consequence}", file=out)
    return 0


# -- relay -------------------------------------------------------------------

@_command
def relay_init(args, out):
    made = provision.init_relay(args.state_dir, args.hostname, udp=args.udp,
                                tunnel_port=args.tunnel_port, force=args.force)
    ca_cert, relay_cert = made.ca_cert, made.relay_cert
    names = ", ".join(str(v.value) for v in relay_cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value)
    print(f"state directory {os.path.abspath(made.state_dir)}:", file=out)
    print(f"  {CA_CERT}  CA certificate, SHA-256 {pki.fingerprint(ca_cert)},"
          f" valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  {CA_KEY}  CA private key (0600)", file=out)
    print(f"  {RELAY_CERT}  relay server certificate for {names},"
          f" valid until {relay_cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  {RELAY_KEY}  relay private key (0600)", file=out)
    print(f"  {REGISTRY}  device registry ({'kept' if made.kept_registry else 'new, empty'})",
          file=out)
    print(f"  {DEPLOYMENT}  hostname {made.hostname}"
          + (f", UDP {made.udp}" if made.udp else "")
          + (f", tunnel port {made.tunnel_port}" if made.tunnel_port else ""), file=out)
    if made.kept_registry and made.old_devices:
        print(f"note: the registry has {made.old_devices} active device(s) certified by the"
              " old CA; provision them again with `p2pnat device add ID --replace ...`",
              file=out)
    return 0


@_command
def relay_reissue(args, out):
    hostname, cert = provision.reissue_relay_cert(args.state_dir, args.hostname)
    print(f"{os.path.join(args.state_dir, RELAY_CERT)}: new relay certificate for {hostname},"
          f" valid until {cert.not_valid_after_utc:%Y-%m-%d}; restart the relay", file=out)
    return 0


# -- devices -----------------------------------------------------------------

@_command
def device_add(args, out):
    bundle = provision.add_device(
        args.state_dir, args.id, args.out, service=args.service, relay=args.relay,
        relay_hostname=args.relay_hostname, access=args.access,
        credential_file=args.credential_file, generate_credential=args.generate_credential,
        years=args.years, replace=args.replace)
    cert = bundle.cert
    print(f"device {bundle.device_id}: {'re-provisioned' if bundle.replaced else 'added'},"
          f" access mode {bundle.access}", file=out)
    print(f"  certificate SHA-256 {pki.fingerprint(cert)},"
          f" valid until {cert.not_valid_after_utc:%Y-%m-%d}", file=out)
    print(f"  bundle in {os.path.abspath(bundle.out)}: {AGENT_CONFIG}, {DEVICE_KEY} (0600),"
          f" {DEVICE_CERT}, {CA_CERT}, {MAC_KEY} (0600)", file=out)
    print(f"  run on the device: twistd -n device-agent --config {bundle.config}", file=out)
    if bundle.credential is not None:
        print(f"access credential (shown only now; stored hashed): {bundle.credential}",
              file=out)
    return 0


@_command
def device_list(args, out):
    rows = [{
        "id": d.id,
        "access_mode": d.access_mode,
        "created": format_time(d.created),
        "revoked": format_time(d.revoked),
        "last_access": format_time(d.last_access),
        "last_address": wire.format_addr(d.address) if d.address else None,
        "cert_fingerprint": d.cert_fingerprint,
    } for d in provision.devices(args.state_dir)]
    return _listing(args, out, rows, {
        "ID": "id", "ACCESS": "access_mode", "CREATED": "created", "REVOKED": "revoked",
        "LAST ACCESS": "last_access", "LAST ADDRESS": "last_address"})


@_command
def device_remove(args, out):
    before = provision.remove_device(args.state_dir, args.id)
    return _removed(out, "device", args.id, before,
                    "; a running relay refuses it once it notices")


# -- lobby clients -----------------------------------------------------------

@_command
def client_add(args, out):
    bundle = provision.add_client(args.state_dir, args.id, args.out, lobby=args.lobby,
                                  replace=args.replace, years=args.years)
    if bundle.made_ca:
        print(f"made a CA for lobby clients: {os.path.join(args.state_dir, CA_CERT)}"
              f" and {CA_KEY} (0600)", file=out)
    print(f"client {args.id}: {'re-provisioned' if bundle.replaced else 'added'};"
          f" {CLIENT_CONFIG}, {MAC_KEY} (0600), {CLIENT_KEY} (0600), {CLIENT_CERT}"
          f" (valid until {bundle.cert.not_valid_after_utc:%Y-%m-%d}) and {CA_CERT} in"
          f" {os.path.abspath(args.out)}",
          file=out)
    return 0


@_command
def client_list(args, out):
    rows = [{"id": c.id, "created": format_time(c.created), "revoked": format_time(c.revoked)}
            for c in provision.clients(args.state_dir)]
    return _listing(args, out, rows, {"ID": "id", "CREATED": "created", "REVOKED": "revoked"})


@_command
def client_remove(args, out):
    before = provision.remove_client(args.state_dir, args.id)
    return _removed(out, "client", args.id, before, "")


# -- registration ------------------------------------------------------------

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


def _list_and_remove(group, kind, list_command, remove_command, remove_help):
    """The ``list`` and ``remove ID`` actions of a device or client group."""
    p = group.add_parser("list", help=f"list {kind}s")
    _state_dir(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=list_command)
    p = group.add_parser("remove", help=remove_help)
    p.add_argument("id", metavar="ID")
    _state_dir(p)
    p.set_defaults(func=remove_command)


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
    p.add_argument("id", metavar="ID",
                   help="the device ID: terminals reach the device at ID.RELAYHOST, so it is"
                        f" {registry.DEVICE_ID_RULE}")
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
                      help="file holding the access credential for --access relay"
                           f" (at least {provision.MIN_CREDENTIAL} characters)")
    cred.add_argument("--generate-credential", action="store_true",
                      help="generate an access credential and print it once")
    p.add_argument("--years", type=int, default=pki.DEVICE_YEARS,
                   help=f"certificate lifetime, 1-5 years (default {pki.DEVICE_YEARS})")
    p.add_argument("--replace", action="store_true",
                   help="re-provision an existing or revoked device with new keys")
    p.set_defaults(func=device_add)
    _list_and_remove(device, "device", device_list, device_remove,
                     "revoke a device (its row is kept, marked revoked)")

    client = _group(subparsers, "client", "provision, list and revoke lobby clients")
    p = client.add_parser("add", help="register a lobby client and write its bundle")
    p.add_argument("id", metavar="ID", help="the client ID")
    _state_dir(p)
    p.add_argument("--lobby", required=True, metavar="HOST:PORT",
                   help="the lobby's UDP address")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for client.toml, its keys and certificate (created 0700)")
    p.add_argument("--years", type=int, default=pki.CLIENT_YEARS,
                   help=f"certificate lifetime, 1-5 years (default {pki.CLIENT_YEARS})")
    p.add_argument("--replace", action="store_true",
                   help="re-provision an existing or revoked client with a new key and"
                        " certificate")
    p.set_defaults(func=client_add)
    _list_and_remove(client, "lobby client", client_list, client_remove, "revoke a lobby client")
