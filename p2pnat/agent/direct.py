# -*- test-case-name: tests.unit.test_direct,tests.process.test_forward_direct -*-
"""
The device agent's end of a direct session: a terminal (``p2pnat
forward``, a ``p2pnat:`` device endpoint) reaches the device's service
over QUIC, without the relay in the data path.

The relay acts as the lobby.  For a terminal that asked for it, it sends
the agent a L{wire.DirectConnectRequest} through the device's notify
mapping, with the terminal's UDP address and a single-use secret, and
tells the terminal the device's mapping and the same secret.  The agent
then:

- punches: a few one-byte datagrams from its notify socket to the
  terminal's address over about a second (L{PUNCH_SCHEDULE}, two at
  once first), so that its NAT lets the terminal's QUIC Initial in
  through the very mapping the relay knows (the terminal sends its first
  flight a few times, since it may come just before the punch: exact
  copies are dropped here quietly, L{Copies});
- accepts one QUIC connection on that socket (QUIC is told from wire
  frames by bit 0x40 of the first byte, L{AgentSocket}), with its device
  certificate: the terminal checks it against the deployment's CA.  The
  terminal has no certificate; it proves itself with the secret, the
  first L{wire.SECRET_LEN} bytes of its stream (service L{SERVICE});
- connects that stream to the service the relay named, as a tunnel does
  (the same service map, the same refusals), and answers one byte
  (L{ACCEPTED}) once it is connected: until then the terminal keeps its
  relayed connection, so a refused or failed direct stream costs nothing
  but time.

Bounds: at most C{max_sessions} direct sessions per device, pending or
running; an offer not used within L{OFFER_TTL} seconds expires; a secret
is used once.  QUIC datagrams are taken only from the IP address of a
terminal the relay signed for: to anyone else the agent sends nothing, so
its QUIC server amplifies nothing.
"""

import hashlib
import hmac

from aioquic.quic.connection import QuicConnection
from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from p2pnat.daemon.logs import Logger, Throttle, redact
from p2pnat.net import streams
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import wire
from p2pnat.quic import QuicSocket, is_quic
from p2pnat.quic import connection as _connection
from p2pnat.quic.identity import PeerIdentity

#: The QUIC stream's service header name of a direct stream.
SERVICE = wire.DIRECT_SERVICE
#: The byte the agent sends once the stream is connected to the service.
ACCEPTED = wire.DIRECT_ACCEPTED
#: Seconds after the request at which the agent sends a punch datagram: two
#: at once (one lost costs the direct path's first attempt), then a few to
#: keep the way open while the terminal tries.
PUNCH_SCHEDULE = (0.0, 0.0, 0.1, 0.3, 0.6, 1.0)
#: Recent QUIC long-header datagrams remembered to drop exact copies (L{Copies}).
COPIES_KEPT = 64
#: What a punch datagram carries: one byte no receiver takes for anything.
PUNCH = bytes([wire.MARKER])
#: Seconds an offer waits for its terminal's stream.
OFFER_TTL = 30.0
#: Direct sessions (pending or running) one device has at most.
MAX_SESSIONS = 16
#: What the device's QUIC server calls a terminal (it has no certificate).
TERMINAL = PeerIdentity("client", "direct-terminal")


class Offer:
    """One direct offer: its secret, the service, the terminal's address."""

    def __init__(self, direct_id, secret, service, terminal, expires):
        self.direct_id = direct_id
        self.secret = secret
        self.service = service
        self.terminal = terminal
        self.expires = expires
        self.used = False


class DirectSessions:
    """
    The device's direct offers and sessions (pure: the clock is given).

    An offer is L{add}ed from a verified request, L{take}n once by the
    stream that presents its secret, and L{finish}ed when that stream
    ends; an offer never taken expires after C{ttl} seconds.  At most
    C{limit} exist at once.
    """

    def __init__(self, clock, ttl=OFFER_TTL, limit=MAX_SESSIONS):
        self.clock = clock
        self.ttl = ttl
        self.limit = limit
        self._offers = {}  # direct_id -> Offer

    def _expire(self):
        now = self.clock.seconds()
        for key in [k for k, o in self._offers.items() if not o.used and o.expires <= now]:
            del self._offers[key]

    def add(self, direct_id, secret, service, terminal):
        """A new offer; None when C{limit} are open already (or it is a repeat)."""
        self._expire()
        if direct_id in self._offers or len(self._offers) >= self.limit:
            return None
        offer = self._offers[direct_id] = Offer(direct_id, secret, service, terminal,
                                                self.clock.seconds() + self.ttl)
        return offer

    def take(self, secret):
        """The unused offer whose secret is C{secret} (now used), or None."""
        self._expire()
        found = None
        for offer in self._offers.values():
            # Every entry compared, in constant time each: no early exit tells which.
            if hmac.compare_digest(offer.secret, secret) and not offer.used:
                found = offer
        if found is not None:
            found.used = True
        return found

    def finish(self, offer):
        """The stream of C{offer} is over."""
        self._offers.pop(offer.direct_id, None)

    def allows(self, host):
        """Whether QUIC datagrams from IP C{host} may be answered: an offer names it."""
        self._expire()
        return any(o.terminal[0] == host for o in self._offers.values())

    def __len__(self):
        return len(self._offers)


class Copies:
    """
    Which QUIC long-header datagrams (handshake packets) came lately, to
    drop exact copies: a terminal sends its first flight more than once,
    as it is, because it cannot know when the punch opened the NAT (see
    L{p2pnat.peer.direct.first_flight_schedule}).  QUIC would discard a
    copy anyway, but count and log it as a packet that failed; here it is
    dropped quietly.  At most C{limit} datagrams are remembered.
    """

    def __init__(self, limit=COPIES_KEPT):
        self.limit = limit
        self._seen = {}  # (address, hash of the datagram) -> None, oldest first

    def repeated(self, data, addr):
        """Whether C{data} from C{addr} is a handshake datagram that came already."""
        if not data[0] & 0x80:
            return False  # a short header: QUIC's own duplicate detection serves
        key = (addr, hashlib.sha256(data).digest())
        if key in self._seen:
            return True
        if len(self._seen) >= self.limit:
            del self._seen[next(iter(self._seen))]
        self._seen[key] = None
        return False


class AgentSocket(ControlProtocol):
    """
    The agent's notify socket: wire frames and STUN as before; QUIC
    datagrams (bit 0x40, see L{p2pnat.quic.endpoint}) go to its direct
    server, if it has one.
    """

    direct = None

    def logPrefix(self):
        # "ControlProtocol starting on PORT", as before: operators and
        # scripts read the notify port from that line.
        return "ControlProtocol"

    def datagramReceived(self, data, addr):
        if self.direct is not None and data and is_quic(data):
            return self.direct.quic_received(data, addr[:2], self)
        return super().datagramReceived(data, addr)


class _ServerConnection(_connection.PeerConnection):
    """
    The device's side of a direct QUIC connection: authenticated by its
    certificate; the terminal presents none (its secret authorizes it).
    """

    def _initialize(self, peer_cid):
        # Not PeerConnection's: it would ask for and require a client certificate.
        QuicConnection._initialize(self, peer_cid)
        self.peer_identity = TERMINAL


class _DirectQuicSocket(QuicSocket):
    """A L{QuicSocket} whose server connections ask no client certificate."""

    def _connection(self, *, is_client, expected, **kw):
        config = _connection.make_configuration(
            self.credentials, is_client=is_client, idle_timeout=self.idle_timeout,
            stream_window=self.stream_window)
        config.connection_id_length = 8
        return _ServerConnection(
            configuration=config, credentials=self.credentials, expected=expected,
            clock=self.clock, stream_window=self.stream_window, **kw)


class _SocketTransport:
    """The QUIC socket's transport: the notify socket's own, counted as QUIC."""

    def __init__(self, proto):
        self.proto = proto

    def write(self, data, addr):
        self.proto.send(data, addr, "quic")

    def getHost(self):
        return self.proto.transport.getHost()


@implementer(interfaces.IHalfCloseableProtocol)
class _Stream(Protocol):
    """
    The device's end of one direct QUIC stream: its first
    L{wire.SECRET_LEN} bytes are the secret, which the server checks
    before anything else; then the bytes go to the local service and
    back, each side the producer of the other (back-pressure), the
    terminal's end of input passed on as a half-close.
    """

    def __init__(self, server):
        self.server = server
        self.secret = b""
        self.offer = None
        self.local = None
        self.early = []  # bytes after the secret, before the service is connected
        self.input_ended = False
        self.closed = False

    def dataReceived(self, data):
        if self.offer is None:
            need = wire.SECRET_LEN - len(self.secret)
            self.secret, data = self.secret + data[:need], data[need:]
            if len(self.secret) < wire.SECRET_LEN:
                return
            self.server.secret_given(self)
            if self.offer is None:
                return
        if not data:
            return
        if self.local is None:
            self.early.append(data)  # the stream is paused: at most a window
        elif self.local.transport is not None:
            self.local.transport.write(data)

    def local_connected(self, local):
        """The service is connected: say so, then pass bytes both ways."""
        self.local = local
        self.transport.write(ACCEPTED)
        for data in self.early:
            local.transport.write(data)
        self.early = []
        # Gates: pause and resume only.  A transport that ends stops its
        # producer, and the other side must end after what it has written,
        # not be aborted.
        self.transport.registerProducer(streams.Gate(local.transport), True)
        local.transport.registerProducer(streams.Gate(self.transport), True)
        self.transport.resumeProducing()
        if self.input_ended:
            self._end_local()

    def readConnectionLost(self):
        self.input_ended = True
        if self.local is not None:
            self._end_local()

    def _end_local(self):
        transport = self.local.transport
        if transport is not None and not transport.disconnected:
            # A TCP transport with a paused producer would wait for it
            # rather than send its FIN; nothing comes from the stream now.
            transport.unregisterProducer()
            transport.loseWriteConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.closed = True
        if self.offer is not None:
            self.server.stream_done(self)
        local = self.local
        if local is not None and local.transport is not None:
            local.transport.unregisterProducer()
            streams.close_after_writes(local.transport)


class _Local(Protocol):
    """The agent's connection to the local service for one direct stream."""

    def __init__(self, stream):
        self.stream = stream

    def connectionMade(self):
        streams.tune(self.transport)
        if self.stream.closed:
            self.transport.loseConnection()
            return
        self.stream.local_connected(self)

    def dataReceived(self, data):
        self.stream.transport.write(data)

    def connectionLost(self, reason):
        stream = self.stream.transport
        if stream is not None and not self.stream.closed:
            stream.unregisterProducer()
            stream.loseWriteConnection()  # our FIN after what was written


class DirectServer:
    """
    The agent's direct sessions (see the module).

    @param agent: the L{p2pnat.agent.tap.AgentService} (its clock,
        C{local_services}, C{local_endpoint}, C{metrics}).
    @param credentials: the device's L{p2pnat.quic.Credentials}.
    """

    log = Logger(namespace="p2pnat.agent.direct")

    def __init__(self, agent, credentials, max_sessions=MAX_SESSIONS):
        self.agent = agent
        self.clock = agent.clock
        self.credentials = credentials
        self.sessions = DirectSessions(self.clock, limit=max_sessions)
        self.max_sessions = max_sessions
        self._sockets = {}  # AgentSocket -> its _DirectQuicSocket
        self._calls = set()
        self._throttle = Throttle(self.clock)
        self.streams = set()  # direct streams whose secret was accepted
        self.copies = Copies()

    # -- the relay's request --------------------------------------------------------------

    def requested(self, message, relay_addr, proto):
        """A verified L{wire.DirectConnectRequest} arrived on notify socket C{proto}."""
        secret = wire.mask_secret(self.agent.notifier.mac_key, message.direct_id,
                                  message.secret)
        if message.service not in self.agent.local_services:
            # The tunnel answers this terminal (its refusal, as ever).
            return self._note("unknown-service", "direct request for unknown service"
                              f" {message.service!r}")
        offer = self.sessions.add(message.direct_id, secret, message.service, message.terminal)
        if offer is None:
            return self._note("too-many", f"{self.max_sessions} direct sessions open already;"
                              " the terminal goes through the relay")
        self._quic_on(proto)
        self.log.info("direct request {oid}: punching to {terminal} for service {service!r}",
                      oid=redact(message.direct_id), terminal=wire.format_addr(message.terminal),
                      service=message.service)
        for delay in PUNCH_SCHEDULE:
            call = self.clock.callLater(delay, self._punch, proto, offer)
            self._calls.add(call)

    def _punch(self, proto, offer):
        self._calls = {c for c in self._calls if c.active()}
        if offer.used or proto.transport is None:
            return
        try:
            proto.send(PUNCH, offer.terminal, "punch")
        except OSError as e:
            self._note("punch-failed", f"cannot punch to {wire.format_addr(offer.terminal)}:"
                                       f" {e}")

    def _note(self, key, text):
        held = self._throttle(("direct", key))
        if held is not None:
            self.log.info("{text} ({held} more since the last such line)", text=text, held=held)

    # -- QUIC -----------------------------------------------------------------------------------

    def _quic_on(self, proto):
        quic = self._sockets.get(proto)
        if quic is None:
            quic = _DirectQuicSocket(self.clock, self.credentials,
                                     max_connections=self.max_sessions)
            quic.makeConnection(_SocketTransport(proto))
            quic.listen([TERMINAL], None, services={SERVICE: _StreamFactory(self)})
            self._sockets[proto] = quic
            proto.direct = self
        return quic

    def quic_received(self, data, addr, proto):
        """A QUIC datagram on notify socket C{proto}: only from a terminal with an offer."""
        quic = self._sockets.get(proto)
        if quic is None:
            return
        known = any(e.peer_address == addr for e in quic.endpoints)
        if not known and not self.sessions.allows(addr[0]):
            quic.dropped["not-offered"] = quic.dropped.get("not-offered", 0) + 1
            return
        if self.copies.repeated(data, addr):
            quic.dropped["copy"] = quic.dropped.get("copy", 0) + 1
            return
        quic.datagramReceived(data, addr)

    # -- streams --------------------------------------------------------------------------------

    def secret_given(self, stream):
        offer = self.sessions.take(stream.secret)
        if offer is None:
            self._note("bad-secret", "a direct stream gave no valid secret; refused")
            stream.transport.abortConnection()
            return
        stream.offer = offer
        self.streams.add(stream)
        address = self.agent.local_services[offer.service]
        stream.transport.pauseProducing()  # until the service is there
        d = self.agent.local_endpoint(address).connect(streams.OneShotFactory(_Local(stream)))

        def failed(reason):
            self.log.warn("local service {host}:{port} not answering: {error}",
                          host=address[0], port=address[1], error=reason.getErrorMessage())
            if not stream.closed:
                stream.transport.abortConnection()  # the terminal goes through the relay

        d.addErrback(failed)
        self.agent.metrics.sessions.labels("direct").inc()
        self.log.info("direct session {oid} to service {service!r} from {terminal}",
                      oid=redact(offer.direct_id), service=offer.service,
                      terminal=wire.format_addr(offer.terminal))

    def stream_done(self, stream):
        self.streams.discard(stream)
        self.sessions.finish(stream.offer)

    def stop(self):
        """
        Stop punching, end every direct stream and QUIC connection: a
        Deferred that fires once their draining periods are over.
        """
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = set()
        for stream in list(self.streams):
            if stream.local is not None and stream.local.transport is not None:
                stream.local.transport.abortConnection()
        closing = []
        for proto, quic in self._sockets.items():
            closing.extend(e.closed for e in quic.endpoints)
            quic.close_all("device agent stopping")
            proto.direct = None
        self._sockets = {}
        return defer.DeferredList([d.addErrback(lambda f: None) for d in closing])


class _StreamFactory(Factory):
    """Direct streams: each one's secret is checked, then it goes to the service."""

    def __init__(self, server):
        self.server = server

    def buildProtocol(self, addr):
        return _Stream(self.server)


__all__ = ["ACCEPTED", "AgentSocket", "DirectServer", "DirectSessions", "SERVICE"]
