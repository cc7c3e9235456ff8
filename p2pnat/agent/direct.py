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
  terminal's address over about a second (L{PUNCH_SCHEDULE}), so that
  its NAT lets the terminal's QUIC Initial in through the very mapping
  the relay knows;
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

import hmac

from aioquic.quic.connection import QuicConnection
from twisted.internet.protocol import Factory

from p2pnat.daemon.logs import Logger, Throttle, redact
from p2pnat.net.udp import ControlProtocol
from p2pnat.peer import streams as S
from p2pnat.peer.direct import gather
from p2pnat.protocol import wire
from p2pnat.quic import QuicSocket, is_quic
from p2pnat.quic import connection as _connection
from p2pnat.quic.identity import PeerIdentity

#: The QUIC stream's service header name of a direct stream.
SERVICE = "p2pnat-direct"
#: The byte the agent sends once the stream is connected to the service.
ACCEPTED = b"\x00"
#: Seconds after the request at which the agent sends a punch datagram.
PUNCH_SCHEDULE = (0.0, 0.1, 0.3, 0.6, 1.0)
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


class AgentSocket(ControlProtocol):
    """
    The agent's notify socket: wire frames and STUN as before; QUIC
    datagrams (bit 0x40, see L{p2pnat.quic.endpoint}) go to its direct
    server, if it has one.
    """

    direct = None

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


class _SecretHalf(S._Half):
    """
    The stream half of a direct splice: its first L{wire.SECRET_LEN}
    bytes are the secret, which the server checks before anything else.
    """

    def __init__(self, splice, server):
        super().__init__(splice)
        self.server = server
        self.secret = b""
        self.offer = None

    def connectionMade(self):
        self.server.stream_opened(self)

    def dataReceived(self, data):
        if self.offer is None:
            need = wire.SECRET_LEN - len(self.secret)
            self.secret += data[:need]
            data = data[need:]
            if len(self.secret) < wire.SECRET_LEN:
                return
            self.server.secret_given(self)
            if self.offer is None:
                return
        if data:
            super().dataReceived(data)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self.offer is not None:
            self.server.sessions.finish(self.offer)


class _Splice(S._Splice):
    """A direct stream's splice: the server forgets it once both halves are closed."""

    def __init__(self, server):
        super().__init__(S._no_events, TERMINAL, "", "in")
        self.server = server

    def half_lost(self, half, reason):
        super().half_lost(half, reason)
        if self.tcp.closed and self.stream.closed:
            self.server.splices.discard(self)


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
        self.splices = set()  # direct streams joined (or joining) to a local service

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
        quic.datagramReceived(data, addr)

    # -- streams --------------------------------------------------------------------------------

    def stream_opened(self, half):
        pass  # the secret comes first

    def secret_given(self, half):
        offer = self.sessions.take(half.secret)
        stream = half.transport
        if offer is None:
            self._note("bad-secret", "a direct stream gave no valid secret; refused")
            stream.abortConnection()
            return
        half.offer = offer
        splice = half.splice
        self.splices.add(splice)
        splice.service = offer.service
        address = self.agent.local_services[offer.service]
        stream.pauseProducing()
        d = self.agent.local_endpoint(address).connect(S._Once(splice.tcp))

        def connected(_):
            if splice.stream.closed:
                splice.tcp.transport.loseConnection()
                return
            stream.write(ACCEPTED)
            self.agent.metrics.sessions.labels("direct").inc()
            self.log.info("direct session {oid} to service {service!r} from {terminal}",
                          oid=redact(offer.direct_id), service=offer.service,
                          terminal=wire.format_addr(offer.terminal))
            splice.join()
            stream.resumeProducing()

        def failed(reason):
            self.log.warn("local service {host}:{port} not answering: {error}",
                          host=address[0], port=address[1], error=reason.getErrorMessage())
            splice.fail(f"cannot connect to {address[0]}:{address[1]}")

        d.addCallbacks(connected, failed)

    def stop(self):
        """
        Stop punching, end every direct stream and QUIC connection: a
        Deferred that fires once their draining periods are over.
        """
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = set()
        for splice in list(self.splices):
            if splice.tcp.transport is not None:
                splice.tcp.transport.abortConnection()
        closing = []
        for proto, quic in self._sockets.items():
            closing.extend(e.closed for e in quic.endpoints)
            quic.close_all("device agent stopping")
            proto.direct = None
        self._sockets = {}
        return gather(closing)


class _StreamFactory(Factory):
    """Direct streams: each one's secret is checked, then it is spliced to the service."""

    def __init__(self, server):
        self.server = server

    def buildProtocol(self, addr):
        splice = _Splice(self.server)
        splice.stream = _SecretHalf(splice, self.server)
        return splice.stream


__all__ = ["ACCEPTED", "AgentSocket", "DirectServer", "DirectSessions", "SERVICE"]
