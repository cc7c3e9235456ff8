# -*- test-case-name: tests.unit.test_relay_loopback,tests.process.test_forward_direct -*-
"""
``p2pnat forward``: forward a local TCP port to a device's TCP service
(for SSH and other non-HTTP services), directly when it can, else through
the relay.

Each connection to the local port opens a TLS connection to the relay's
terminal port and asks ``CONNECT DEVICE[:SERVICE] HTTP/1.1``, with the
device's access credential when it has one, and with the terminal's UDP
mapping to ask for a direct session; once the relay answers 200, the
connection goes over QUIC straight to the device if that comes up within
a short budget, else through the relay as it always did.  Bytes flow
both ways as they are, with back-pressure.  The path logic is
L{p2pnat.peer.direct}'s, which the ``p2pnat:`` endpoint's device form
shares.
"""

import json
import os
import sys

from twisted.internet import endpoints
from twisted.internet.protocol import Factory, Protocol

from p2pnat.cli import CommandError
from p2pnat.daemon import config as C
from p2pnat.daemon.logs import Logger
from p2pnat.net.streams import (
    Gate,
    OneShotFactory,
    client_endpoint,
    close_after_writes,
    nodelay,
)
from p2pnat.peer.direct import (
    DEFAULT_UDP_PORT,
    Direct,
    DirectFirstEndpoint,
    EarlyBytes,
    shared_socket,
)
from p2pnat.peer.endpoint import relay_tls

#: Seconds a local connection waits for the device (the relay's session
#: timeout is 10 s; the TLS connection and the request come first).
FORWARD_TIMEOUT = 30.0


class _Remote(Protocol):
    """The device's end for one local connection: direct (QUIC) or through the relay."""

    def __init__(self, local):
        self.local = local

    def connectionMade(self):
        nodelay(self.transport)
        self.gate = Gate(self.transport)
        self.local.fwd.active.add(self)
        self.local.remote_ready(self)

    def dataReceived(self, data):
        self.local.transport.write(data)

    def connectionLost(self, reason):
        self.local.fwd.active.discard(self)
        self.local.remote_lost()


class _Local(Protocol):
    log = Logger(namespace="p2pnat.cli.forward")

    def __init__(self, forwarder):
        self.fwd = forwarder
        self.remote = None

    def connectionMade(self):
        nodelay(self.transport)
        self.gate = Gate(self.transport)
        # Until the path is chosen the application's first bytes are held
        # (at most EarlyBytes' limit; beyond, the kernel holds them, with
        # back-pressure): the direct stream sends them with its secret, and
        # the relayed connection replays them if it serves.
        self.early = EarlyBytes()
        d = self.fwd.endpoint.connect(OneShotFactory(_Remote(self)), self.early)
        d.addErrback(self._cannot)

    def _cannot(self, failure):
        self.log.warn("{error}", error=failure.getErrorMessage())
        self.transport.loseConnection()

    def remote_ready(self, remote):
        self.remote = remote
        if self.transport.disconnected:
            # The application wrote (its bytes went first) and closed while
            # we chose: the device's end closes after them.
            close_after_writes(remote.transport)
            return
        remote.transport.registerProducer(self.gate, True)
        self.transport.registerProducer(remote.gate, True)
        self.transport.resumeProducing()

    def dataReceived(self, data):
        if self.remote is not None:
            self.remote.transport.write(data)
        elif not self.early.write(data):
            self.transport.pauseProducing()

    def remote_lost(self):
        close_after_writes(self.transport)

    def connectionLost(self, reason):
        if self.remote is not None and self.remote.transport is not None:
            close_after_writes(self.remote.transport)


class Forwarder(Factory):
    """
    Listens locally; each connection is carried to C{device}'s C{service},
    directly over QUIC when C{direct} (a L{p2pnat.peer.direct.Direct})
    reaches it within the budget, else through the relay's terminal port.

    @param tls: client TLS options (relay certificate checked), or None for
        a plain-HTTP terminal port.
    @param on_path: called as C{on_path(path, target, why)} for each
        connection (``direct`` or ``relayed``).
    """

    noisy = False
    log = Logger(namespace="p2pnat.cli.forward")

    def __init__(self, reactor, relay_host, relay_port, device, service="", credential=None,
                 tls=None, direct=None, on_path=None):
        self.reactor = reactor
        #: connections to the device (either path) now open
        self.active = set()
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.tls = tls
        self.endpoint = DirectFirstEndpoint(reactor, self.relay_endpoint(), device, service,
                                            credential, FORWARD_TIMEOUT, direct=direct,
                                            on_path=on_path or self._path)

    def relay_endpoint(self):
        ep = client_endpoint(self.reactor, self.relay_host, self.relay_port)
        return endpoints.wrapClientTLS(self.tls, ep) if self.tls is not None else ep

    def _path(self, path, target, why):
        self.log.info("connection to {target}: {path}{why}", target=target, path=path,
                      why=f" ({why})" if why else "")

    def buildProtocol(self, addr):
        return _Local(self)


def client_tls(hostname, ca_file):
    """TLS options checking the relay's certificate (CA file, or the system's)."""
    try:
        return relay_tls(hostname, ca_file)
    except ValueError as e:
        raise CommandError(f"--ca: {e}")


def direct_of(reactor, args, relay_host):
    """
    The direct path's settings (a L{Direct}), or None: C{--no-direct}, or
    no CA to check the device's certificate with (C{--device-ca}, else
    C{--ca}).
    """
    ca = args.device_ca or args.ca
    if args.no_direct or not ca:
        return None
    try:
        # Not "host:7478" parsed: an IPv6 relay's would be ambiguous.
        relay_udp = (C.parse_hostport(args.relay_udp) if args.relay_udp
                     else (relay_host, DEFAULT_UDP_PORT))
    except ValueError as e:
        raise CommandError(f"--relay-udp: {e}")
    try:
        return Direct(shared_socket(reactor, ca), relay_udp)
    except Exception as e:
        raise CommandError(f"--device-ca: {e}")


def run(args):
    from twisted.internet import reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    try:
        relay_host, relay_port = C.parse_hostport(args.relay)
        listen_host, listen_port = C.parse_hostport(args.listen, "127.0.0.1")
    except ValueError as e:
        raise CommandError(str(e))
    device, _, service = args.target.partition(":")
    credential = None
    if args.credential_file:
        try:
            with open(args.credential_file) as f:
                credential = f.read().strip()
        except OSError as e:
            raise CommandError(f"--credential-file: {e.strerror}")
    elif os.environ.get("P2PNAT_CREDENTIAL"):
        credential = os.environ["P2PNAT_CREDENTIAL"]
    tls = None if args.plain_http else client_tls(args.relay_hostname or relay_host, args.ca)
    direct = direct_of(reactor, args, relay_host)
    on_path = None
    if args.json:
        def on_path(path, target, why):
            event = {"event": "path", "path": path, "target": target}
            if why:
                event["why"] = why
            print(json.dumps(event), flush=True)
    fwd = Forwarder(reactor, relay_host, relay_port, device, service, credential, tls,
                    direct=direct, on_path=on_path)
    # Info and above; --verbose adds each connection's timing (debug).
    level = LogLevel.debug if args.verbose else LogLevel.info
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(level)])],
        redirectStandardIO=False)
    try:
        port = reactor.listenTCP(listen_port, fwd, interface=listen_host)
    except Exception as e:
        raise CommandError(f"cannot listen on {args.listen}: {e}")
    how = "directly or through" if direct is not None else "through"
    if args.json:
        print(json.dumps({"event": "forwarding", "host": port.getHost().host,
                          "port": port.getHost().port, "target": args.target,
                          "relay": args.relay, "direct": direct is not None}), flush=True)
    else:
        print(f"forwarding {port.getHost().host}:{port.getHost().port} to {args.target} {how}"
              f" {args.relay}", flush=True)
    reactor.run()
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "forward", help="forward a local TCP port to a device's TCP service through the relay",
        description="Forward a local TCP port to a device's service through the relay, e.g."
                    " p2pnat forward cam1:ssh --relay relay.example.org:8443 --ca ca.crt"
                    " --listen 127.0.0.1:2222, then ssh -p 2222 127.0.0.1. The device's access"
                    " credential, when it has one, comes from --credential-file or the"
                    " P2PNAT_CREDENTIAL environment variable (never the command line).")
    p.add_argument("target", help="DEVICE or DEVICE:SERVICE (a name from the agent's"
                                  " extra_services; none = its main service)")
    p.add_argument("--relay", required=True, help="the relay's terminal address HOST:PORT")
    p.add_argument("--relay-hostname", help="name checked in the relay's certificate"
                                            " (default: the host of --relay)")
    p.add_argument("--ca", help="CA certificate of the relay (default: the system's CAs)")
    p.add_argument("--listen", default="127.0.0.1:0", help="local HOST:PORT (default: any port"
                                                            " on 127.0.0.1)")
    p.add_argument("--credential-file", help="file holding the device's access credential")
    p.add_argument("--plain-http", action="store_true",
                   help="the relay's terminal port is plain HTTP (no TLS)")
    p.add_argument("--no-direct", action="store_true",
                   help="always through the relay (by default each connection goes directly"
                        " to the device over QUIC when it can, the relay as the lobby)")
    p.add_argument("--relay-udp", help="the relay's UDP port HOST:PORT, for the direct path"
                                       " (default: the host of --relay, port 7478)")
    p.add_argument("--device-ca", help="the deployment's CA certificate, which issued the"
                                       " devices' (default: --ca); without either, no direct"
                                       " path")
    p.add_argument("--json", action="store_true",
                   help="print JSON lines: the listening address, then which path each"
                        " connection took")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also log each connection's timing (relay, offer, QUIC, choice)")
    p.set_defaults(func=run)
