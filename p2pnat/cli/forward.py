# -*- test-case-name: tests.unit.test_relay_loopback -*-
"""
``p2pnat forward``: forward a local TCP port to a device's TCP service
through the relay (for SSH and other non-HTTP services).

Each connection to the local port opens a TLS connection to the relay's
terminal port and asks ``CONNECT DEVICE[:SERVICE] HTTP/1.1``, with the
device's access credential when it has one; once the relay answers 200,
bytes flow both ways as they are, with back-pressure.  The request and
the answer's reading are L{p2pnat.peer.endpoint}'s, which the ``p2pnat:``
endpoint's device form shares.
"""

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
from p2pnat.peer.endpoint import (
    AnswerTooLong,
    connect_answer,
    connect_request,
    relay_tls,
)


class _RelaySide(Protocol):
    """The connection to the relay for one local connection."""

    def __init__(self, local, request):
        self.local = local
        self.request = request
        self.buf = b""
        self.open = False

    def connectionMade(self):
        nodelay(self.transport)
        self.gate = Gate(self.transport)
        self.local.fwd.active.add(self)
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.open:
            self.local.transport.write(data)
            return
        self.buf += data
        try:
            answer = connect_answer(self.buf)
        except AnswerTooLong:
            self.transport.abortConnection()
            return
        if answer is None:
            return
        status_line, ok, rest = answer
        if not ok:
            self.local.refused(status_line)
            self.transport.loseConnection()
            return
        self.open = True
        self.local.relay_ready(self)
        if rest:
            self.local.transport.write(rest)

    def connectionLost(self, reason):
        self.local.fwd.active.discard(self)
        self.local.relay_lost()


class _Local(Protocol):
    log = Logger(namespace="p2pnat.cli.forward")

    def __init__(self, forwarder):
        self.fwd = forwarder
        self.relay = None
        self.pending = []

    def connectionMade(self):
        nodelay(self.transport)
        self.gate = Gate(self.transport)
        self.transport.pauseProducing()  # until the relay said yes
        d = self.fwd.relay_endpoint().connect(OneShotFactory(_RelaySide(self, self.fwd.request)))
        d.addErrback(self._cannot)

    def _cannot(self, failure):
        self.log.warn("cannot reach the relay: {error}", error=failure.getErrorMessage())
        self.transport.loseConnection()

    def refused(self, status_line):
        self.log.warn("relay refused: {status}", status=status_line)
        self.transport.loseConnection()

    def relay_ready(self, relay):
        self.relay = relay
        relay.transport.registerProducer(self.gate, True)
        self.transport.registerProducer(relay.gate, True)
        self.transport.resumeProducing()

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.transport.write(data)

    def relay_lost(self):
        close_after_writes(self.transport)

    def connectionLost(self, reason):
        if self.relay is not None:
            close_after_writes(self.relay.transport)


class Forwarder(Factory):
    """
    Listens locally; each connection is carried to C{device}'s C{service}
    through the relay's terminal port.

    @param tls: client TLS options (relay certificate checked), or None for
        a plain-HTTP terminal port.
    """

    noisy = False

    def __init__(self, reactor, relay_host, relay_port, device, service="", credential=None,
                 tls=None):
        self.reactor = reactor
        #: connections to the relay now open
        self.active = set()
        self.relay_host = relay_host
        self.relay_port = relay_port
        self.tls = tls
        self.request = connect_request(device, service, credential)

    def relay_endpoint(self):
        ep = client_endpoint(self.reactor, self.relay_host, self.relay_port)
        return endpoints.wrapClientTLS(self.tls, ep) if self.tls is not None else ep

    def buildProtocol(self, addr):
        return _Local(self)


def client_tls(hostname, ca_file):
    """TLS options checking the relay's certificate (CA file, or the system's)."""
    try:
        return relay_tls(hostname, ca_file)
    except ValueError as e:
        raise CommandError(f"--ca: {e}")


def run(args):
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

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
    fwd = Forwarder(reactor, relay_host, relay_port, device, service, credential, tls)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        port = reactor.listenTCP(listen_port, fwd, interface=listen_host)
    except Exception as e:
        raise CommandError(f"cannot listen on {args.listen}: {e}")
    print(f"forwarding {port.getHost().host}:{port.getHost().port} to {args.target} through"
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
    p.set_defaults(func=run)
