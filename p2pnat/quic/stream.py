# -*- test-case-name: tests.unit.test_quic -*-
"""
A QUIC stream as a Twisted transport.

L{StreamTransport} is what a Twisted protocol connected to one stream of a
L{p2pnat.quic.endpoint.QuicEndpoint} sees: an C{ITransport} with
C{write}, C{loseConnection}, C{abortConnection}, half-close
(C{loseWriteConnection}; a protocol providing C{IHalfCloseableProtocol}
hears C{readConnectionLost} at the peer's end of stream), and producer
support both ways:

- writing: a producer registered with C{registerProducer} is paused while
  more than L{HIGH_WATER} bytes wait for QUIC's congestion and flow
  control windows, and resumed below L{LOW_WATER} (a pull producer is
  asked for more each time the stream drains below L{LOW_WATER});
- reading: C{pauseProducing} stops delivery, and the stream's receive
  window stops moving with it, so the peer stops sending after at most
  one window (L{p2pnat.quic.connection.PeerConnection}).

A 20 MB transfer therefore never holds more than a window or two in
memory on either side.
"""

from twisted.internet import error, interfaces
from twisted.python import failure
from zope.interface import implementer

from p2pnat.daemon.logs import Logger
from p2pnat.quic import header

#: Pause the writer's producer beyond this many unsent bytes.
HIGH_WATER = 512 * 1024
#: Resume it below this many.
LOW_WATER = 128 * 1024


@implementer(interfaces.IAddress)
class QuicStreamAddress:
    """
    One end of a QUIC stream: the peer (its L{PeerIdentity}, or None for
    our own end), its UDP address, the stream ID and the service.
    """

    def __init__(self, peer, udp, stream_id, service):
        self.peer = peer
        self.udp = udp
        self.stream_id = stream_id
        self.service = service

    def __repr__(self):
        who = self.peer if self.peer is not None else "local"
        return f"<QuicStreamAddress {who} {self.udp} stream {self.stream_id} {self.service}>"

    def __eq__(self, other):
        return isinstance(other, QuicStreamAddress) and (
            (self.peer, self.udp, self.stream_id, self.service)
            == (other.peer, other.udp, other.stream_id, other.service))

    def __hash__(self):
        return hash((self.peer, self.udp, self.stream_id, self.service))


def quietly(operation, *args, **kw):
    """
    Run an aioquic stream operation that has nothing left to do when that
    direction of the stream already finished (aioquic raises ValueError).
    """
    try:
        operation(*args, **kw)
    except ValueError:
        pass


class StreamRefused(error.ConnectionLost):
    """The peer refused the stream: nobody serves its service there."""


@implementer(interfaces.ITransport, interfaces.IPushProducer, interfaces.IConsumer,
             interfaces.IHalfCloseableDescriptor)
class StreamTransport:
    """
    The transport of one bidirectional QUIC stream (see the module).

    @ivar service: the service name the stream was opened for.
    @ivar stream_id: its QUIC stream ID.
    """

    log = Logger(namespace="p2pnat.quic.stream")

    def __init__(self, endpoint, stream_id, service):
        self.endpoint = endpoint
        self.stream_id = stream_id
        self.service = service
        self.protocol = None
        self.disconnecting = False
        self.connected = True
        self._conn = endpoint.connection
        self._inbox = []
        self._read_paused = False
        self._fin_received = False  # the peer ended its side
        self._read_done = False  # ... and we told the protocol
        self._write_done = False  # we ended (or reset) our side
        self._producer = None
        self._streaming = False
        self._producer_paused = False
        self._lost = False
        self._delivering = False

    def attach(self, protocol):
        """Connect C{protocol} to this stream (its C{makeConnection})."""
        self.protocol = protocol
        protocol.makeConnection(self)

    # -- ITransport ------------------------------------------------------------

    def write(self, data):
        if self._write_done or self._lost:
            return
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        if not data:
            return
        self._conn.send_stream_data(self.stream_id, data)
        self.endpoint.app_sent()
        self.endpoint.schedule_transmit()
        self._check_backlog()

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseWriteConnection(self):
        """End our side of the stream (FIN after what was written)."""
        if self._write_done or self._lost:
            return
        self._write_done = True
        quietly(self._conn.send_stream_data, self.stream_id, b"", end_stream=True)
        self.endpoint.schedule_transmit()
        self._maybe_done()

    def loseConnection(self):
        """
        End our side after what was written, and stop reading: if the
        peer is still sending, it is asked to stop (STOP_SENDING).
        """
        if self._lost or self.disconnecting:
            return
        self.disconnecting = True
        if not self._fin_received:
            quietly(self._conn.stop_stream, self.stream_id, header.STREAM_CLOSED)
            self._fin_received = self._read_done = True
            self._inbox = []
        else:
            self._read_done = True
        self.loseWriteConnection()
        self._maybe_done()

    def abortConnection(self):
        """Reset both directions at once; unsent data is dropped."""
        self._abort(header.STREAM_ABORTED,
                    failure.Failure(error.ConnectionAborted("stream aborted")))

    def _abort(self, code, why):
        if self._lost:
            return
        if not self._write_done:
            quietly(self._conn.reset_stream, self.stream_id, code)
        if not self._fin_received:
            quietly(self._conn.stop_stream, self.stream_id, code)
        self._write_done = self._fin_received = self._read_done = True
        self.endpoint.schedule_transmit()
        self._connection_lost(why)

    def getPeer(self):
        return QuicStreamAddress(self.endpoint.peer, self.endpoint.peer_address,
                                 self.stream_id, self.service)

    def getHost(self):
        return QuicStreamAddress(None, self.endpoint.local_address, self.stream_id,
                                 self.service)

    # -- IPushProducer: what we deliver to the protocol -----------------------------

    def pauseProducing(self):
        self._read_paused = True

    def resumeProducing(self):
        if not self._read_paused:
            return
        self._read_paused = False
        self._deliver()
        # The window moved: tell the peer.
        self.endpoint.schedule_transmit()

    def stopProducing(self):
        self.abortConnection()

    # -- IConsumer: producers of what we write ----------------------------------------

    def registerProducer(self, producer, streaming):
        if self._producer is not None:
            raise RuntimeError("a producer is already registered with this stream")
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if self._lost:
            producer.stopProducing()
        elif not streaming:
            producer.resumeProducing()
        else:
            self._check_backlog()

    def unregisterProducer(self):
        self._producer = None

    def _check_backlog(self):
        producer = self._producer
        if producer is None or not self._streaming or self._producer_paused:
            return
        if self._conn.unsent(self.stream_id) > HIGH_WATER:
            self._producer_paused = True
            producer.pauseProducing()

    def drained(self):
        """
        Called by the endpoint after it sent what it could: resume the
        writer's producer if the backlog fell below L{LOW_WATER}.
        """
        producer = self._producer
        if producer is None or self._lost:
            return
        if self._conn.unsent(self.stream_id) >= LOW_WATER:
            return
        if self._streaming:
            if self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
        else:
            producer.resumeProducing()

    @property
    def waiting_to_drain(self):
        """Whether a producer waits for this stream's backlog to fall."""
        return self._producer is not None and (self._producer_paused or not self._streaming)

    # -- from the endpoint ----------------------------------------------------------

    def data_received(self, data, end_stream):
        """Bytes (and perhaps the end) of the peer's side arrived."""
        if self._read_done:
            self._conn.consumed(self.stream_id, len(data))  # read side closed: discard
            return
        if data:
            self._inbox.append(data)
        if end_stream:
            self._fin_received = True
        self._deliver()

    def _deliver(self):
        if self._delivering:
            return  # a protocol called back into us from dataReceived
        self._delivering = True
        try:
            while self._inbox and not self._read_paused and not self._lost:
                data = self._inbox.pop(0)
                self._conn.consumed(self.stream_id, len(data))
                try:
                    self.protocol.dataReceived(data)
                except Exception:
                    self.log.failure("stream {service} {stream_id}: protocol failed",
                                     service=self.service, stream_id=self.stream_id)
                    self.abortConnection()
                    return
            if self._fin_received and not self._inbox and not self._read_done \
                    and not self._lost:
                self._read_done = True
                half = interfaces.IHalfCloseableProtocol(self.protocol, None)
                if half is not None:
                    half.readConnectionLost()
                    self._maybe_done()
                else:
                    self.loseConnection()
        finally:
            self._delivering = False

    def reset_by_peer(self, error_code):
        """The peer reset its side (RESET_STREAM)."""
        if error_code == header.SERVICE_REFUSED:
            why = StreamRefused(f"the peer refused service {self.service!r}")
        else:
            why = error.ConnectionLost(f"stream reset by the peer (code {error_code:#x})")
        self._inbox = []
        self._fin_received = self._read_done = True
        if not self._write_done:
            # A stream the peer reset while we still write: it no longer reads.
            quietly(self._conn.reset_stream, self.stream_id, header.STREAM_CLOSED)
            self._write_done = True
            self.endpoint.schedule_transmit()
        self._connection_lost(failure.Failure(why))

    def stop_sending_received(self, error_code):
        """The peer no longer reads our side (aioquic already reset it)."""
        if self._write_done:
            return
        self._write_done = True
        if error_code == header.SERVICE_REFUSED:
            return  # the RESET_STREAM that comes with it says so
        half = interfaces.IHalfCloseableProtocol(self.protocol, None)
        if half is not None and not self._read_done:
            half.writeConnectionLost()
        self._maybe_done()

    def connection_lost(self, reason):
        """The whole connection ended (C{reason}: a Failure)."""
        self._inbox = []
        self._write_done = self._fin_received = self._read_done = True
        self._connection_lost(reason)

    # -- ending ----------------------------------------------------------------------

    def _maybe_done(self):
        if self._write_done and self._read_done and not self._lost:
            self._connection_lost(failure.Failure(error.ConnectionDone()))

    def _connection_lost(self, reason):
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self.disconnecting = True
        self._conn.forget_stream(self.stream_id)
        self.endpoint.stream_ended(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(reason)
            except Exception:
                self.log.failure("stream {service} {stream_id}: connectionLost failed",
                                 service=self.service, stream_id=self.stream_id)
