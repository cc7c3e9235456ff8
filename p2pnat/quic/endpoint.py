# -*- test-case-name: tests.unit.test_quic -*-
"""
QUIC over a UDP socket shared with other traffic, driven by Twisted.

L{QuicSocket} is the C{DatagramProtocol} of a UDP socket (a punched
socket, typically) that also carries p2pnat wire frames and STUN.  It
keeps the QUIC datagrams and hands every other datagram to C{other}:

    QUIC is what RFC 9443 says it is: a first byte with bit 0x40 set
    (64..127 short header, 192..255 long header).  STUN starts with 0..3
    and p2pnat frames with 0x0C (L{p2pnat.protocol.wire.MARKER}), both
    with that bit clear, so the split is exact
    (L{p2pnat.protocol.stun.demux}).  p2pnat does not relay TURN channel
    data on these sockets, which would also use 64..79.

QUIC datagrams are routed by destination connection ID to a
L{QuicEndpoint}, one per connection, which feeds aioquic
(L{p2pnat.quic.connection.PeerConnection}), sends what it returns, runs
its timer on the injected clock, and turns its events into:

- C{connected}, a Deferred that fires with the endpoint once both sides
  are authenticated (or fails with L{HandshakeFailed} saying why);
- C{writable}, a Deferred that fires with the endpoint as soon as it may
  carry the application's data: on the server with C{connected}; on the
  client one round trip earlier, once TLS completed on our side (the
  server's certificate checked, our own ``Finished`` going out), so that
  the first stream bytes and datagrams travel behind our ``Finished``,
  which the server reads first: a server that refuses our certificate
  never reads them, and C{connected} still fails (see L{_check_up}).
  It never fires when the handshake fails before (C{connected} says so);
- streams: L{QuicEndpoint.open_stream} connects a protocol to a new
  stream for a named service; incoming streams go to the factory the
  endpoint's C{services} maps their service name to
  (L{p2pnat.quic.header});
- datagrams (RFC 9221): L{QuicEndpoint.send_datagram}, C{on_datagram};
- liveness: a PING every C{keepalive_interval}; C{on_silent} when no
  authenticated packet (a PING's ACK, stream data, a datagram) arrived
  for C{silence_timeout} seconds, C{on_alive} when one does again; the
  connection itself ends after C{idle_timeout} seconds of silence.  With
  C{pings_when_idle=False} (a lobby path's connection) the PINGs run, and
  silence is declared, only while the application sends; idle, the
  connection is kept by whoever calls L{QuicEndpoint.ping} (the path's
  keepalive, at the interval it learns from its NATs: one keepalive, not
  two that together refresh the mappings twice as often), and
  C{on_heard} tells it of every sign of the peer;
- C{closed}, a Deferred that fires with a L{ConnectionClosed} once the
  connection is over, for whatever reason;
- C{counts}: UDP datagrams sent and received, and RFC 9221 datagrams
  sent and received, for the connection's life; logged when it ends
  (with the datagrams in which no packet passed authentication), so a
  run under loss can tell what left from what arrived.

A packet that fails authentication (forged, corrupted, from an old
connection) or repeats one already received is dropped by aioquic
without effect (a datagram with no packet that passed is counted in
C{QuicSocket.dropped["unauthenticated"]}); one that comes from a new
address with valid protection, and is the newest, moves the connection
there after path validation (RFC 9000 section 9), which is how a peer
whose NAT rebinds keeps its connection, on either side
(L{p2pnat.quic.connection.PeerConnection.receive_datagram}).
"""

import itertools

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.python import failure

from p2pnat.daemon.logs import Logger
from p2pnat.net.udp import DropLog, SendTo, no_fragmentation
from p2pnat.protocol import stun, wire
from p2pnat.quic import connection as _connection
from p2pnat.quic import header
from p2pnat.quic.identity import PeerIdentity
from p2pnat.quic.stream import StreamTransport, quietly

#: Connection IDs we issue are this long.
CID_LENGTH = 8
#: Connections (handshaking or up) one socket holds at most.
MAX_CONNECTIONS = 16
#: An incoming stream must name its service within this many seconds.
HEADER_TIMEOUT = 10.0
#: A client Initial datagram is at least this long (RFC 9000 section 14.1).
MIN_INITIAL = 1200

KEEPALIVE_INTERVAL = 5.0
SILENCE_TIMEOUT = 15.0
IDLE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0


def is_quic(data):
    """Whether a datagram on a shared socket is QUIC (see the module)."""
    return stun.demux(data) is stun.Kind.QUIC


class HandshakeFailed(ConnectionError):
    """The connection could not be set up; the message says why."""


class ConnectionClosed:
    """
    How a connection ended.

    @ivar reason: a sentence for people.
    @ivar error_code: QUIC's error code (0: closed normally).
    @ivar by_peer: whether the peer closed it (else we did, or silence).
    """

    def __init__(self, reason, error_code, by_peer):
        self.reason = reason
        self.error_code = error_code
        self.by_peer = by_peer

    def __repr__(self):
        return f"<ConnectionClosed {self.reason!r} code={self.error_code:#x}>"


class QuicEndpoint:
    """
    One QUIC connection to one peer (see the module).

    @ivar peer: the peer's L{PeerIdentity} once authenticated.
    @ivar services: service name -> C{IProtocolFactory} for the peer's
        streams; a service not in it is refused.
    @ivar on_datagram: called with each RFC 9221 datagram's payload.
    @ivar on_silent: called (no arguments) when the path fell silent.
    @ivar on_alive: called when it carries traffic again after that.
    @ivar silent: whether the path is silent now.
    @ivar counts: C{packets_sent} and C{packets_received} (UDP datagrams
        of this connection, each one QUIC packet or a few coalesced during
        the handshake), C{datagrams_sent} (handed to QUIC) and
        C{datagrams_received} (RFC 9221 datagrams).
    """

    log = Logger(namespace="p2pnat.quic")

    def __init__(self, socket, conn, addr, *, clock, services=None,
                 keepalive_interval=KEEPALIVE_INTERVAL, silence_timeout=SILENCE_TIMEOUT,
                 handshake_timeout=HANDSHAKE_TIMEOUT, pings_when_idle=True):
        if not 0 < keepalive_interval < silence_timeout:
            raise ValueError("keepalive_interval must be positive and below silence_timeout")
        self.socket = socket
        self.connection = conn
        self.clock = clock
        self.services = dict(services or {})
        self.keepalive_interval = keepalive_interval
        self.silence_timeout = silence_timeout
        self.peer = None
        self.on_datagram = lambda payload: None
        self.on_silent = lambda: None
        self.on_alive = lambda: None
        self.silent = False
        self.connected = defer.Deferred()
        self.writable = defer.Deferred()
        self.closed = defer.Deferred()
        self.datagrams_dropped = 0
        self.counts = dict.fromkeys(("packets_sent", "packets_received", "datagrams_sent",
                                     "datagrams_received"), 0)
        self._initial_addr = addr
        self._peer_addr = addr
        self._closing_locally = False
        self._cids = set()
        self._streams = {}
        self._incoming_closed = set()
        self._headers = {}  # stream ID -> (bytes so far, timeout call)
        self._ended = False
        self._up = False
        self._writable = False
        self._transmit_call = None
        self._timer = None
        self._ping_ids = itertools.count(1)
        self._ping_call = None
        self._silence_call = None
        #: Called (no arguments) on every sign of the peer: stream data, a
        #: datagram, the ACK of a PING.
        self.on_heard = lambda: None
        #: Without PINGs when idle: when the application last sent, and
        #: when the peer was last heard (L{_fell_silent}).
        self.pings_when_idle = pings_when_idle
        self._app_sent = None
        self._heard = clock.seconds()
        self._handshake_call = clock.callLater(handshake_timeout, self._handshake_timeout)

    # -- for applications ------------------------------------------------------------

    @property
    def peer_address(self):
        """The UDP address we send to now (it follows the peer's moves)."""
        return self._peer_addr

    @property
    def local_address(self):
        host = self.socket.transport.getHost() if self.socket.transport else None
        return (host.host, host.port) if host is not None else None

    def open_stream(self, service, protocol):
        """
        Open a stream to the peer's C{service} and connect C{protocol} to
        it.  Bytes can be written at once: the service header goes first.
        If the peer serves no such service, the protocol's
        C{connectionLost} gets a L{p2pnat.quic.stream.StreamRefused}.

        @return: the L{StreamTransport}.
        @raise header.HeaderError: for an invalid service name.
        @raise ConnectionError: if the connection is not writable yet
            (L{writable}) or is over.
        """
        first = header.encode(service)
        if not self._writable or self._ended:
            raise ConnectionError("the QUIC connection is not up")
        stream_id = self.connection.get_next_available_stream_id()
        self.connection.track_stream(stream_id)
        transport = StreamTransport(self, stream_id, service)
        self._streams[stream_id] = transport
        self.connection.send_stream_data(stream_id, first)
        self.schedule_transmit()
        transport.attach(protocol)
        return transport

    def send_datagram(self, payload):
        """
        Send one unreliable datagram (RFC 9221) of at most
        L{connection.MAX_DATAGRAM_PAYLOAD} bytes; dropped (and counted in
        C{datagrams_dropped}) if too many wait already.

        @raise ValueError: if it is too large.
        @raise ConnectionError: if the connection is not writable yet
            (L{writable}) or is over.
        """
        if len(payload) > _connection.MAX_DATAGRAM_PAYLOAD:
            raise ValueError(f"datagram larger than {_connection.MAX_DATAGRAM_PAYLOAD} bytes")
        if not self._writable or self._ended:
            raise ConnectionError("the QUIC connection is not up")
        if not self.connection.send_datagram_frame(bytes(payload)):
            self.datagrams_dropped += 1
            return
        self.counts["datagrams_sent"] += 1
        self.app_sent()
        self.schedule_transmit()

    def close(self, reason="closed"):
        """
        Close the connection (CONNECTION_CLOSE to the peer); C{closed}
        fires once QUIC's draining period is over.
        """
        if self._ended:
            return
        self._closing_locally = True
        self.connection.close(error_code=0, reason_phrase=reason)
        self.schedule_transmit()

    def move_to(self, socket):
        """
        Send from another local socket from now on (our address changed:
        a new port, a new interface).  The peer follows once it has
        validated the new path; a fresh connection ID is used on it when
        the peer gave us a spare (RFC 9000 section 9.5).
        """
        old, self.socket = self.socket, socket
        old.connection_ended(self)
        socket.adopt(self)
        for cid in self._cids:
            old.unregister(cid, self)
            socket.register(cid, self)
        self.connection.change_connection_id()
        self.connection.send_ping(next(self._ping_ids))
        self.connection.reset_datagram_size()  # the new route's MTU is unknown
        self.schedule_transmit()

    def route_changed(self):
        """
        The route to the peer changed below QUIC (the peer's address stays
        what QUIC knows, a lower layer moved its packets): probe the new
        route now (L{p2pnat.quic.connection.PeerConnection.probe_now}).
        """
        if not self._up or self._ended:
            return
        self.connection.probe_now()
        self.schedule_transmit()

    # -- driving aioquic ---------------------------------------------------------------

    def datagram_received(self, data, addr):
        """
        A QUIC datagram for this connection arrived (from the socket).

        @return: True if it brought the newest authenticated packet of the
            connection so far: the peer sends from C{addr} now.
        """
        if self._ended:
            return False
        conn = self.connection
        self.counts["packets_received"] += 1
        moves = conn.peer_moves
        if not conn.receive_datagram(data, addr, now=self.clock.seconds()):
            # Forged, corrupted, replayed, or for discarded keys: aioquic
            # changed nothing.
            self.socket.count_drop("unauthenticated", addr, f"{len(data)} bytes")
        if conn.peer_moves != moves:
            self.log.info("QUIC peer {peer} now sends from {addr}: following it",
                          peer=str(self.peer), addr=wire.format_addr(addr))
        # The packet that confirms the handshake to a client may carry the
        # server's first data (an answer to what we sent behind our
        # Finished): "connected" comes before it.
        self._check_up()
        self._process_events()
        self._check_up()
        self.schedule_transmit()
        return conn.fresh

    def flush(self):
        """Send what aioquic has now, not at the next reactor turn."""
        if self._transmit_call is not None and self._transmit_call.active():
            self._transmit_call.cancel()
        self._transmit()

    def resend_handshake(self):
        """
        Send our part of the handshake again now, if nothing came from the
        peer yet (L{p2pnat.quic.connection.PeerConnection.resend_handshake}).
        """
        if self._ended or self.counts["packets_received"]:
            return
        self.connection.resend_handshake(self.clock.seconds())
        self.schedule_transmit()

    def schedule_transmit(self):
        """Send what aioquic has, soon (coalescing many writes into one pass)."""
        if self._transmit_call is None and not self._ended:
            self._transmit_call = self.clock.callLater(0, self._transmit)

    def _transmit(self):
        self._transmit_call = None
        if self._ended:
            return
        for data, addr in self.connection.datagrams_to_send(now=self.clock.seconds()):
            self.counts["packets_sent"] += 1
            self._peer_addr = addr
            self.socket.write(data, addr)
        self._process_events()
        self._set_timer()
        for stream in list(self._streams.values()):
            if stream.waiting_to_drain:
                stream.drained()

    def _set_timer(self):
        when = self.connection.get_timer()
        if when is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, when - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._on_timer)

    def _on_timer(self):
        self._timer = None
        if self._ended:
            return
        self.connection.handle_timer(now=self.clock.seconds())
        self._process_events()
        self._transmit()

    # -- events --------------------------------------------------------------------------

    def _process_events(self):
        while not self._ended:
            event = self.connection.next_event()
            if event is None:
                return
            try:
                self._event(event)
            except Exception:
                self.log.failure("QUIC event {event} failed", event=type(event).__name__)

    def _event(self, event):
        if isinstance(event, events.StreamDataReceived):
            self._alive()
            self._stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, events.DatagramFrameReceived):
            self.counts["datagrams_received"] += 1
            self._alive()
            self.on_datagram(event.data)
        elif isinstance(event, events.PingAcknowledged):
            self._alive()
        elif isinstance(event, events.StreamReset):
            self._stream_reset(event.stream_id, event.error_code)
        elif isinstance(event, events.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.stop_sending_received(event.error_code)
        elif isinstance(event, events.ConnectionIdIssued):
            self._cids.add(event.connection_id)
            self.socket.register(event.connection_id, self)
        elif isinstance(event, events.ConnectionIdRetired):
            self._cids.discard(event.connection_id)
            self.socket.unregister(event.connection_id, self)
        elif isinstance(event, events.HandshakeCompleted):
            self._handshake_completed(event)
        elif isinstance(event, events.ConnectionTerminated):
            self._terminated(event)

    def _handshake_completed(self, event):
        conn = self.connection
        if event.alpn_protocol != _connection.ALPN or conn.peer_identity is None:
            conn.close(error_code=0x100 + 120,  # CRYPTO_ERROR no_application_protocol
                       reason_phrase=f"ALPN {_connection.ALPN} not negotiated")
            return
        self.peer = conn.peer_identity
        self._check_up()

    def _check_up(self):
        # TLS 1.3 completes on the client before the server has checked the
        # client's certificate: the client waits for the server's
        # HANDSHAKE_DONE (the handshake is then confirmed, RFC 9001 section
        # 4.1.2), so that "connected" means both sides accepted each other
        # and a refusal is reported as a failed connect, not a later close.
        # Writes are taken from TLS completion on ("writable"): 1-RTT keys
        # are there, and what we write leaves behind our Finished.
        if self._ended or self.peer is None:
            return
        if not self._writable:
            self._writable = True
            self.writable.callback(self)
            if self._ended:
                return  # the application closed it from its callback
        if self._up or not self.connection.handshake_confirmed:
            return
        self._up = True
        if self._handshake_call.active():
            self._handshake_call.cancel()
        self.log.info("QUIC connection to {peer} at {addr} up", peer=str(self.peer),
                      addr=wire.format_addr(self.peer_address))
        self._alive()
        self._ping_call = self.clock.callLater(self.keepalive_interval, self._keepalive)
        self.connected.callback(self)

    def _handshake_timeout(self):
        if not self._up and not self._ended:
            self._finish(ConnectionClosed("handshake timed out", 0, False))

    def _terminated(self, event):
        conn = self.connection
        by_peer = not (conn.refusal or self._closing_locally
                       or event.reason_phrase == "Idle timeout")
        if conn.refusal:
            reason = f"we refused the peer: {conn.refusal}"
        elif event.reason_phrase == "Idle timeout":
            reason = "the peer fell silent (idle timeout)"
        else:
            reason = event.reason_phrase or f"error {event.error_code:#x}"
            if by_peer:
                reason = (f"closed by the peer: {reason}" if self._up
                          else f"the peer refused the connection: {reason}")
        self._finish(ConnectionClosed(reason, event.error_code, by_peer))

    def _finish(self, closed):
        if self._ended:
            return
        self._ended = True
        for call in (self._transmit_call, self._timer, self._ping_call, self._silence_call,
                     self._handshake_call):
            if call is not None and call.active():
                call.cancel()
        for _, call in self._headers.values():
            if call.active():
                call.cancel()
        self._headers.clear()
        for cid in self._cids:
            self.socket.unregister(cid, self)
        self._cids.clear()
        self.socket.connection_ended(self)
        why = failure.Failure(error.ConnectionLost(f"QUIC connection closed: {closed.reason}"))
        for stream in list(self._streams.values()):
            stream.connection_lost(why)
        self._streams.clear()
        if self._up:
            self.log.info("QUIC connection to {peer} closed: {reason} (packets sent"
                          " {packets_sent}, received {packets_received}, unauthenticated"
                          " {unauthenticated}; datagrams sent {datagrams_sent}, received"
                          " {datagrams_received})", peer=str(self.peer), reason=closed.reason,
                          unauthenticated=self.connection.unauthenticated, **self.counts)
        else:
            self.log.info("QUIC handshake with {addr} failed: {reason}",
                          addr=wire.format_addr(self._initial_addr), reason=closed.reason)
            self.connected.errback(HandshakeFailed(closed.reason))
        self.closed.callback(closed)

    # -- liveness ------------------------------------------------------------------------

    def app_sent(self):
        """
        The application sent (stream data, a datagram): without PINGs when
        idle, PING every C{keepalive_interval} again and watch for silence.
        """
        if self.pings_when_idle or self._ended or not self._up:
            return
        self._app_sent = self.clock.seconds()
        if self._ping_call is None:
            self._ping_call = self.clock.callLater(self.keepalive_interval, self._keepalive)
        if self._silence_call is None:
            self._silence_call = self.clock.callLater(self.silence_timeout, self._fell_silent)

    def ping(self):
        """
        Send a PING now (its ACK is a sign of the peer, L{on_heard}).

        @return: whether it went (False once the connection is not up).
        """
        if self._ended or not self._up:
            return False
        self.connection.send_ping(next(self._ping_ids))
        self.schedule_transmit()
        return True

    def _idle(self):
        """Whether the PINGs stop now (see the module)."""
        if self.pings_when_idle:
            return False
        return (self._app_sent is None
                or self.clock.seconds() - self._app_sent >= self.silence_timeout)

    def _alive(self):
        self._heard = self.clock.seconds()
        self.on_heard()
        if self._silence_call is not None and self._silence_call.active():
            self._silence_call.reset(self.silence_timeout)
        elif not self._ended:
            self._silence_call = self.clock.callLater(self.silence_timeout, self._fell_silent)
        if self.silent:
            self.silent = False
            self.log.info("QUIC path to {peer} alive again", peer=str(self.peer))
            self.on_alive()

    def _fell_silent(self):
        self._silence_call = None
        if self._ended or self.silent:
            return
        if not self.pings_when_idle and (
                self._app_sent is None
                or self._app_sent <= self._heard - self.silence_timeout):
            # The application sent nothing for a silence timeout before we
            # last heard the peer: an idle connection, whose path's own
            # keepalives watch it.
            return
        self.silent = True
        self.log.info("QUIC path to {peer} silent for {secs}s", peer=str(self.peer),
                      secs=self.silence_timeout)
        self.on_silent()

    def _keepalive(self):
        self._ping_call = None
        if self._ended:
            return
        if self._idle():
            return  # app_sent() starts them again
        try:
            self.connection.send_ping(next(self._ping_ids))
            self.schedule_transmit()
        finally:
            self._ping_call = self.clock.callLater(self.keepalive_interval, self._keepalive)

    # -- streams ---------------------------------------------------------------------------

    def _peer_initiated(self, stream_id):
        # Bit 0 of a stream ID is 0 for client-initiated streams.
        return (stream_id & 1) == (1 if self.connection.configuration.is_client else 0)

    def _stream_data(self, stream_id, data, end_stream):
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.data_received(data, end_stream)
            return
        if not self._peer_initiated(stream_id) or stream_id in self._incoming_closed:
            return  # a stream we are done with: aioquic still finishes it
        self._incoming_header(stream_id, data, end_stream)

    def _incoming_header(self, stream_id, data, end_stream):
        conn = self.connection
        if stream_id in self._headers:
            so_far, call = self._headers.pop(stream_id)
        else:
            so_far = b""
            conn.track_stream(stream_id)
            call = self.clock.callLater(HEADER_TIMEOUT, self._header_late, stream_id)
        conn.consumed(stream_id, len(data))
        data = so_far + data
        try:
            parsed = header.decode(data)
        except header.HeaderError as e:
            call.cancel()
            return self._refuse(stream_id, f"bad stream header: {e}")
        if parsed is None:
            if end_stream:
                call.cancel()
                return self._refuse(stream_id, "stream ended inside its header")
            self._headers[stream_id] = (data, call)
            return
        call.cancel()
        service, rest = parsed
        factory = self.services.get(service)
        protocol = None
        transport = StreamTransport(self, stream_id, service)
        if factory is not None:
            try:
                protocol = factory.buildProtocol(transport.getPeer())
            except Exception:
                self.log.failure("building a protocol for service {service} failed",
                                 service=service)
        if protocol is None:
            return self._refuse(stream_id, f"no service {service!r} here")
        # The header was consumed; what follows is the protocol's to take.
        conn.consumed(stream_id, -len(rest))
        self._streams[stream_id] = transport
        transport.attach(protocol)
        if rest or end_stream:
            transport.data_received(rest, end_stream)

    def _header_late(self, stream_id):
        if self._headers.pop(stream_id, None) is not None:
            self._refuse(stream_id, f"no stream header within {HEADER_TIMEOUT:g}s")

    def _refuse(self, stream_id, why):
        self.log.info("stream {stream_id} from {peer} refused: {why}", stream_id=stream_id,
                      peer=str(self.peer), why=why)
        conn = self.connection
        for stop in (conn.reset_stream, conn.stop_stream):
            quietly(stop, stream_id, header.SERVICE_REFUSED)
        self._closed_incoming(stream_id)
        self.schedule_transmit()

    def _stream_reset(self, stream_id, error_code):
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.reset_by_peer(error_code)
        elif stream_id in self._headers:
            self._headers.pop(stream_id)[1].cancel()
            self._closed_incoming(stream_id)

    def _closed_incoming(self, stream_id):
        self.connection.forget_stream(stream_id)
        if self._peer_initiated(stream_id):
            if len(self._incoming_closed) > 4 * _connection.MAX_STREAMS:
                # aioquic forgets a stream once both sides finished: no
                # event can name it any more.
                live = self.connection._streams
                self._incoming_closed = {s for s in self._incoming_closed if s in live}
            self._incoming_closed.add(stream_id)

    def stream_ended(self, stream):
        """Called by a L{StreamTransport} when its protocol is done."""
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._closed_incoming(stream.stream_id)


class QuicSocket(DatagramProtocol):
    """
    The protocol of a UDP socket that carries QUIC connections beside other
    traffic (see the module).

    @param clock: an C{IReactorTime}.
    @param credentials: our L{p2pnat.quic.identity.Credentials}.
    @param other: called with C{(data, addr)} for every datagram that is not
        QUIC (a p2pnat C{ControlProtocol}'s C{datagramReceived}, say); by
        default those are dropped, with a rate-limited log.
    @param idle_timeout: seconds of silence after which a connection ends.
    """

    noisy = False
    log = Logger(namespace="p2pnat.quic")

    def __init__(self, clock, credentials, *, other=None, idle_timeout=IDLE_TIMEOUT,
                 stream_window=_connection.STREAM_WINDOW,
                 max_connections=MAX_CONNECTIONS, **endpoint_options):
        _connection.check_internals()
        self.clock = clock
        self.credentials = credentials
        self.other = other
        self.idle_timeout = idle_timeout
        self.stream_window = stream_window
        self.max_connections = max_connections
        self.endpoint_options = endpoint_options
        self.drop_log = DropLog(self.log, clock)
        self.dropped = {}
        self.send_errors = 0
        self._sendto = SendTo()
        self._routes = {}  # connection ID -> QuicEndpoint
        self._endpoints = set()
        self._accept = None

    # -- set up ----------------------------------------------------------------------------

    def connect(self, addr, peer, *, services=None, **options):
        """
        Open a QUIC connection to C{addr} for C{peer} (a L{PeerIdentity} or
        ``kind:id``): its certificate must name that peer.

        @return: a Deferred firing with the L{QuicEndpoint} once both sides
            are authenticated, or failing with L{HandshakeFailed}.
        """
        peer = PeerIdentity.parse(peer)
        conn = self._connection(is_client=True, expected=peer)
        endpoint = self._endpoint(conn, addr, services, options)
        conn.connect(addr, now=self.clock.seconds())
        self.register(conn.host_cid, endpoint)
        endpoint._cids.add(conn.host_cid)
        endpoint.schedule_transmit()
        return endpoint.connected

    def listen(self, peers, on_connection, *, services=None, **options):
        """
        Accept connections from the peers named in C{peers} (identities or
        ``kind:id`` strings); a peer whose certificate names anyone else is
        refused during the handshake.  C{on_connection} is called with each
        authenticated L{QuicEndpoint}.  Call it again to change the set;
        C{listen((), None)} stops accepting.
        """
        peers = frozenset(PeerIdentity.parse(p) for p in peers)
        self._accept = (peers, on_connection, services, options) if peers else None

    def _connection(self, *, is_client, expected, **kw):
        config = _connection.make_configuration(
            self.credentials, is_client=is_client, idle_timeout=self.idle_timeout,
            stream_window=self.stream_window)
        config.connection_id_length = CID_LENGTH
        return _connection.PeerConnection(
            configuration=config, credentials=self.credentials, expected=expected,
            clock=self.clock, stream_window=self.stream_window, **kw)

    def _endpoint(self, conn, addr, services, options):
        if len(self._endpoints) >= self.max_connections:
            raise ConnectionError(f"this socket already holds {self.max_connections} "
                                  f"QUIC connections")
        merged = dict(self.endpoint_options, **options)
        endpoint = QuicEndpoint(self, conn, addr, clock=self.clock, services=services,
                                **merged)
        self._endpoints.add(endpoint)
        return endpoint

    # -- routing -----------------------------------------------------------------------------

    def register(self, cid, endpoint):
        """Route datagrams for connection ID C{cid} to C{endpoint}."""
        self._routes[cid] = endpoint

    def unregister(self, cid, endpoint):
        if self._routes.get(cid) is endpoint:
            del self._routes[cid]

    def connection_ended(self, endpoint):
        """C{endpoint} is over, or moved to another socket."""
        self._endpoints.discard(endpoint)

    def adopt(self, endpoint):
        """C{endpoint} moved here from another socket (L{QuicEndpoint.move_to})."""
        self._endpoints.add(endpoint)

    @property
    def endpoints(self):
        """The connections on this socket now."""
        return frozenset(self._endpoints)

    def count_drop(self, reason, addr, detail=""):
        """A QUIC datagram was dropped: count it in C{dropped}, log (rate-limited)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.drop_log(reason, addr, detail)


    def startProtocol(self):
        # Path MTU probes must find what the path carries unfragmented.
        no_fragmentation(self.transport)

    def datagramReceived(self, data, addr):
        addr = addr[:2]
        if not is_quic(data):
            if self.other is not None:
                return self.other(data, addr)
            return self.count_drop("not-quic", addr)
        self.receive(data, addr)

    def receive(self, data, addr):
        """
        Handle one QUIC datagram from C{addr}.

        @return: True if it brought the newest authenticated packet of its
            connection so far (see L{QuicEndpoint.datagram_received}): a
            layer below QUIC may take that as proof that the peer sends
            from C{addr} now.
        """
        try:
            return bool(self._quic_received(data, addr))
        except Exception:
            self.dropped["internal-error"] = self.dropped.get("internal-error", 0) + 1
            self.log.failure("error handling a QUIC datagram from {addr}",
                             addr=wire.format_addr(addr))
            return False

    def owns(self, data):
        """Whether QUIC datagram C{data} is for one of this socket's connections (by its ID)."""
        try:
            head = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return False
        return head.destination_cid in self._routes

    def _quic_received(self, data, addr):
        if not data[0] & 0x80:
            # A short header (every packet after the handshake): the
            # destination CID is the next CID_LENGTH bytes, our own length.
            # Parsing the whole header here cost a tenth of a receiving
            # peer's CPU in bench/nebula_bulk.py, and aioquic parses it anyway.
            endpoint = self._routes.get(data[1:1 + CID_LENGTH])
            if endpoint is not None:
                return endpoint.datagram_received(data, addr)
        try:
            head = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError as e:
            return self.count_drop("bad-quic-header", addr, str(e))
        endpoint = self._routes.get(head.destination_cid)
        if endpoint is not None:
            return endpoint.datagram_received(data, addr)
        if head.packet_type != QuicPacketType.INITIAL or self._accept is None:
            return self.count_drop("unknown-connection", addr)
        if len(data) < MIN_INITIAL:
            return self.count_drop("short-initial", addr, f"{len(data)} bytes")
        if head.version not in (1, 0x6B3343CF):  # QUIC v1, v2
            return self.count_drop("quic-version", addr, f"{head.version:#x}")
        peers, on_connection, services, options = self._accept
        conn = self._connection(is_client=False, expected=peers,
                                original_destination_connection_id=head.destination_cid)
        try:
            endpoint = self._endpoint(conn, addr, services, options)
        except ConnectionError as e:
            return self.count_drop("too-many-connections", addr, str(e))
        for cid in (head.destination_cid, conn.host_cid):
            self.register(cid, endpoint)
            endpoint._cids.add(cid)
        if on_connection is not None:
            endpoint.connected.addCallback(self._accepted, on_connection)
        endpoint.connected.addErrback(lambda f: None)  # the endpoint logged it
        return endpoint.datagram_received(data, addr)

    def _accepted(self, endpoint, on_connection):
        try:
            on_connection(endpoint)
        except Exception:
            self.log.failure("on_connection failed for {peer}", peer=str(endpoint.peer))
        return endpoint

    def write(self, data, addr):
        """Send one datagram; a failed send is a lost packet, for QUIC to recover."""
        if self.transport is None:
            return
        try:
            self._sendto(self.transport, data, addr)
        except (OSError, error.MessageLengthError) as e:
            # EAGAIN on a full socket buffer, ENETUNREACH while an interface
            # changes: QUIC's loss recovery sends it again.
            self.send_errors += 1
            self.drop_log("send-failed", addr, str(e))

    def close_all(self, reason="closed"):
        """Close every connection on this socket (at shutdown)."""
        for endpoint in list(self._endpoints):
            endpoint.close(reason)
