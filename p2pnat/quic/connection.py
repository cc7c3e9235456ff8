# -*- test-case-name: tests.unit.test_quic_connection,tests.unit.test_quic -*-
"""
aioquic's sans-IO QUIC connection, made to authenticate both peers and to
apply real flow control.

L{PeerConnection} is an C{aioquic.quic.connection.QuicConnection} with
seven changes, all through aioquic internals that L{check_internals}
verifies (the package refuses to start on an aioquic whose internals
moved, with one clear message, rather than run without them):

- Mutual authentication: the side that accepts (QUIC's server) asks for
  the other's certificate, and both sides check the peer's certificate
  inside the TLS handshake with L{identity.check_peer}: issued by the
  deployment's CA and naming the peer this connection is for.  A refused
  certificate aborts the handshake with a TLS ``bad_certificate`` alert
  (``certificate_required`` if none was sent), so the peer learns why
  too, and no application data is ever exchanged.  aioquic's own check
  (a host name against a DNS entry) does not fit peer certificates and is
  replaced, not added to.
- Receive windows follow what the application consumed: aioquic doubles a
  stream's window whenever half of it has arrived, so a paused reader
  would buffer without bound.  Here a stream's window is what the
  application took plus C{stream_window}, announced again once half of it
  has been used; a stream whose reader is paused stops its sender after
  at most one window.
- Pacing in bursts a reactor's timers can keep (L{CoarsePacer}).
- Bounds: at most C{max_streams} streams the peer may have open at once,
  no unidirectional streams, at most L{MAX_PENDING_DATAGRAMS} datagrams
  waiting to be sent.
- One DATAGRAM frame per packet while few wait: aioquic fills a packet
  with as many waiting datagrams as fit, so datagrams sent together
  (three chat lines, a few forwarded UDP datagrams) were lost together
  when that one packet was.  Here, while at most L{DATAGRAMS_APART} wait,
  each leaves in a packet (and a UDP datagram) of its own, beside
  whatever else that packet carries, so each is lost with the link's own
  probability, independently, as over plain UDP.  A longer queue means
  the application sends faster than the pacer lets packets go (it paces
  packets, whatever their size): those fill packets as aioquic does, or
  small datagrams would be held to a few hundred a second at the start
  of a connection and dropped when the queue is full.
- Datagrams sent before the handshake is confirmed (behind the
  connecting side's Finished, which the peer must read first) are sent
  again if QUIC declares them lost, at most L{EARLY_RESENDS} in a
  connection: a lost Finished would otherwise take every one of them.
- The side that connected follows the other to a new address
  (L{PeerConnection.receive_datagram}).  RFC 9000 lets only clients
  migrate, and aioquic's client drops every packet from a server address
  it never sent to; but here the "server" is a peer behind a NAT that may
  rebind as well.  A packet from a new address that decrypts with the
  connection's keys, is not a duplicate and is the newest received moves
  the connection there, and that path is then validated (PATH_CHALLENGE)
  exactly as aioquic's server does for a client that moved: a path that
  does not answer in time is abandoned for the last validated one.
  Anything else from an unknown address changes nothing.  Counted:
  L{PeerConnection.unauthenticated} datagrams in which no packet passed.
- Bigger packets where the path carries them (DPLPMTUD, RFC 8899 and RFC
  9000 section 14.3): packets are L{BASE_DATAGRAM_SIZE} bytes (aioquic's
  size, which every QUIC path must carry) until the handshake is
  confirmed on a validated path; then one probe, a PING padded to a
  candidate size of L{PROBE_SIZES}, goes out, and once it is acknowledged
  every packet may be that large.  A probe is not congestion controlled
  and its loss is no congestion (section 14.4); L{MAX_PROBES} lost probes
  of one size make the next smaller candidate the one probed.  Back to the
  base size: when the route changes (L{PeerConnection.probe_now}, a new
  peer address, a new local socket: the new route is probed again) and
  when L{BLACK_HOLE_PTOS} probe timeouts in a row suggest that big packets
  no longer pass (probed again after L{PROBE_RETRY} seconds).
"""

import functools
import logging
import ssl

from aioquic import tls
from aioquic.quic import connection as _connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicFrameType, QuicPacketType
from aioquic.buffer import size_uint_var
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilderStop
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStreamSender

from p2pnat.quic import identity as _identity

#: The ALPN protocol both peers must offer.
ALPN = "p2pnat/1"
#: Default receive window per stream, bytes.
STREAM_WINDOW = 1 << 20
#: Default number of streams the peer may have open at once.
MAX_STREAMS = 32
#: Datagrams queued for sending beyond this are dropped (they are unreliable
#: by contract; a queue without bound would only add delay and memory).
MAX_PENDING_DATAGRAMS = 256
#: While at most this many datagrams wait to be sent, each goes in a packet
#: of its own; a longer queue fills packets (see the module).
DATAGRAMS_APART = 16
#: Datagrams sent before the handshake is confirmed are sent again if lost,
#: at most this many times in a connection (see L{PeerConnection}).
EARLY_RESENDS = 64
#: The largest DATAGRAM payload that fits a 1200-byte packet with a short
#: header, an 8-byte connection ID, the AEAD tag and the frame's own header.
MAX_DATAGRAM_PAYLOAD = 1150
#: Packets are this large until a larger size is probed (aioquic's default;
#: RFC 9000 section 14: every QUIC path carries it).
BASE_DATAGRAM_SIZE = 1200
#: Sizes probed, largest first: 1452 bytes is a 1500-byte Ethernet MTU less
#: an IPv6 and a UDP header (an IPv4 header is smaller), 1350 fits a path
#: with one tunnel's overhead (a VPN, PPPoE).  A relayed path carries them
#: in fragments (L{p2pnat.peer.streams.fragments}), at most two as for the
#: base size.
PROBE_SIZES = (1452, 1350)
#: Lost probes of one size before the next smaller one is tried.
MAX_PROBES = 3
#: Consecutive probe timeouts that send packets back to the base size.
BLACK_HOLE_PTOS = 2
#: Seconds after such a fall-back before the larger sizes are probed again.
PROBE_RETRY = 30.0


# aioquic logs through the standard library under "quic" (a refused peer at
# warning level, among others).  Our events go through twisted.logger; an
# application that configures stdlib logging still gets aioquic's, but
# nothing is printed on standard error by default.
logging.getLogger("quic").addHandler(logging.NullHandler())


class CoarsePacer(QuicPacketPacer):
    """
    aioquic's pacer with bursts sized for a reactor's timers.

    aioquic paces at the congestion window per RTT with bursts of at most
    16 packets, which assumes timers of microseconds; a Twisted reactor
    wakes up every millisecond at best, so a stream could not go faster
    than 16 packets per wake-up (under 19 MB/s, and far less on a busy
    machine).  The rate is the same here; a burst may be a quarter of the
    congestion window (RFC 9002 section 7.7 leaves the burst size to the
    sender).
    """

    def update_rate(self, congestion_window, smoothed_rtt):
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is None:
            return
        rate = self._max_datagram_size / self.packet_time  # bytes per second
        self.bucket_max = max(2 * self._max_datagram_size, congestion_window // 4) / rate
        # bucket_time may now grow to the new maximum over time, as before


class QuicUnavailable(RuntimeError):
    """The installed aioquic lacks an internal this package relies on."""


class _CertificateRequired(tls.Alert):
    description = tls.AlertDescription.certificate_required


_TLS_INTERNALS = ("_check_certificate_verify_signature", "_server_expect_finished",
                  "_request_client_certificate", "_peer_certificate",
                  "_peer_certificate_chain", "_supported_groups")
#: The one key exchange group the connecting side offers: the one an
#: accepting aioquic picks today anyway (the first of the client's shares it
#: supports), without the three other key pairs aioquic's client would make
#: and throw away on every handshake (P-384, X25519, X448: ~0.5 ms of CPU).
KEY_EXCHANGE_GROUP = tls.Group.SECP256R1
_CONNECTION_INTERNALS = ("_initialize", "_handshake_confirmed", "_loss", "_max_datagram_size",
                         "_write_stream_limits", "_datagrams_pending",
                         "_streams", "_local_max_streams_bidi", "_local_max_streams_uni",
                         "_on_max_stream_data_delivery", "_write_datagram_frame",
                         # following the peer to a new address:
                         "_payload_received", "_network_paths", "_add_network_path",
                         "_use_reserved_peer_cid", "_spaces", "_is_client",
                         # probing a new route at once:
                         "_send_probe",
                         # path MTU discovery:
                         "_flush_builder", "_packet_number", "_peer_cid", "host_cid",
                         "_cryptos", "_state", "_version")
#: QuicNetworkPath attributes the same relies on.
_PATH_INTERNALS = ("addr", "is_validated", "peer_cid", "local_challenge_sent",
                   "validation_deadline")


@functools.cache
def check_internals():
    """
    Check that the installed aioquic has every internal L{PeerConnection}
    uses (once per process: the answer cannot change).

    @raise QuicUnavailable: naming what is missing.
    """
    conn = _connection.QuicConnection(configuration=QuicConfiguration(is_client=True))
    context = tls.Context(is_client=True)
    missing = [f"QuicConnection.{name}" for name in _CONNECTION_INTERNALS
               if not hasattr(conn, name)]
    missing += [f"tls.Context.{name}" for name in _TLS_INTERNALS if not hasattr(context, name)]
    if not hasattr(_connection, "MAX_STREAM_DATA_FRAME_CAPACITY"):
        missing.append("connection.MAX_STREAM_DATA_FRAME_CAPACITY")
    pacer = getattr(getattr(conn, "_loss", None), "_pacer", None)
    if not all(hasattr(pacer, name) for name in ("packet_time", "bucket_max",
                                                  "_max_datagram_size")):
        missing.append("QuicPacketRecovery._pacer (packet_time, bucket_max)")
    if not hasattr(getattr(conn, "_loss", None), "_pto_count"):
        missing.append("QuicPacketRecovery._pto_count")
    if not hasattr(getattr(conn, "_loss", None), "reschedule_data"):
        missing.append("QuicPacketRecovery.reschedule_data")
    network_path = _connection.QuicNetworkPath(("192.0.2.1", 1))
    missing += [f"QuicNetworkPath.{name}" for name in _PATH_INTERNALS
                if not hasattr(network_path, name)]
    if not hasattr(_connection.QuicPacketBuilder, "packet_number"):
        missing.append("QuicPacketBuilder.packet_number")
    builder = _connection.QuicPacketBuilder(host_cid=b"", peer_cid=b"", version=1,
                                            is_client=True, max_datagram_size=1200)
    if not hasattr(builder, "_packet"):
        missing.append("QuicPacketBuilder._packet")
    if not hasattr(_connection, "END_STATES"):
        missing.append("connection.END_STATES")
    if not hasattr(QuicStreamSender(0, True), "_buffer_stop"):
        missing.append("QuicStreamSender._buffer_stop")
    if missing:
        raise QuicUnavailable(
            "this aioquic release lacks what p2pnat's QUIC layer needs ("
            + ", ".join(missing) + "); install the aioquic version setup.cfg names")


def make_configuration(credentials, *, is_client, idle_timeout=30.0,
                       stream_window=STREAM_WINDOW):
    """
    The aioquic configuration of one side: our certificate and key, ALPN
    L{ALPN}, RFC 9221 datagrams on, aioquic's own certificate check off
    (L{PeerConnection} does its own), and C{idle_timeout} seconds of
    silence before the connection is given up.
    """
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        certificate=credentials.cert,
        private_key=credentials.key,
        idle_timeout=idle_timeout,
        max_datagram_frame_size=65536,
        max_stream_data=stream_window,
        max_data=stream_window * 4,
        verify_mode=ssl.CERT_NONE,
    )


class PeerConnection(_connection.QuicConnection):
    """
    A QUIC connection to one peer of the deployment, mutually authenticated.

    @ivar peer_identity: the L{identity.PeerIdentity} the peer's verified
        certificate names, once the handshake got that far (else None).
    @ivar refusal: why we refused the peer's certificate, if we did.
    @ivar unauthenticated: datagrams received in which no packet passed
        authentication (forged, corrupted, replayed, or for keys already
        discarded): they changed nothing.
    @ivar peer_moves: how many times the connecting side followed the
        peer to a new address (see L{receive_datagram}).
    @ivar fresh: whether the last datagram received brought the newest
        authenticated 1-RTT packet so far.
    """

    def __init__(self, *, configuration, credentials, expected, clock,
                 stream_window=STREAM_WINDOW, max_streams=MAX_STREAMS, **kw):
        """
        @param credentials: our L{identity.Credentials} (its CAs are the
            only trust anchors).
        @param expected: the L{identity.PeerIdentity} to accept, or a
            collection of them.
        @param clock: an C{IReactorTime}: certificate validity is checked
            against its C{seconds()}.
        """
        super().__init__(configuration=configuration, **kw)
        self._p2p_credentials = credentials
        self._p2p_expected = expected
        self._p2p_clock = clock
        self.peer_identity = None
        self.refusal = None
        self.unauthenticated = 0
        self.peer_moves = 0
        self.fresh = False
        self._passed = []  # (network path, is_probing) of each packet that passed
        self._datagram_packet = None  # number of the last packet given a DATAGRAM frame
        self._early_resends = 0  # datagrams sent before confirmation, lost, sent again
        self.stream_window = stream_window
        # Bytes of each stream the application has taken: the window is
        # announced from there (see _write_stream_limits).
        self._consumed = {}
        self._loss._pacer = CoarsePacer(max_datagram_size=self._max_datagram_size)
        # Path MTU discovery (see the module): the sizes still to try, the
        # probe in flight (size, lost count), when probing may start, and
        # the network path the current size was found on.
        self._pmtu_candidates = list(PROBE_SIZES)
        self._pmtu_probe = None
        self._pmtu_lost = 0
        self._pmtu_not_before = None
        self._pmtu_path = None
        self.pmtu_probes = {"sent": 0, "acked": 0, "lost": 0, "fallbacks": 0}
        for limit, value in ((self._local_max_streams_bidi, max_streams),
                             (self._local_max_streams_uni, 0)):
            limit.value = limit.sent = value

    # -- authentication ----------------------------------------------------------

    def _initialize(self, peer_cid):
        super()._initialize(peer_cid)
        context = self.tls
        if not self._is_client:
            context._request_client_certificate = True
        else:
            context._supported_groups = [KEY_EXCHANGE_GROUP]
        check_signature = context._check_certificate_verify_signature
        expect_finished = context._server_expect_finished

        def check_certificate(verify):
            check_signature(verify)  # the peer holds the certificate's key
            self._check_peer(context)

        def server_expect_finished():
            if context._peer_certificate is None:
                self.refusal = "the peer sent no certificate"
                raise _CertificateRequired(self.refusal)
            expect_finished()

        context._check_certificate_verify_signature = check_certificate
        if not self._is_client:
            context._server_expect_finished = server_expect_finished

    def _check_peer(self, context):
        try:
            self.peer_identity = _identity.check_peer(
                context._peer_certificate, context._peer_certificate_chain,
                self._p2p_credentials.ca_certs, self._p2p_expected,
                self._p2p_clock.seconds())
        except _identity.PeerCertificateError as e:
            self.refusal = str(e)
            raise tls.AlertBadCertificate(str(e)) from None

    @property
    def handshake_confirmed(self):
        """
        Whether the handshake is confirmed (RFC 9001 section 4.1.2): on the
        client, the server accepted our certificate and said so.
        """
        return self._handshake_confirmed

    # -- the peer's address --------------------------------------------------------

    def receive_datagram(self, data, addr, now):
        """
        aioquic's C{receive_datagram}, which also counts datagrams that
        changed nothing and, on the connecting side, follows the peer to a
        new address (see the module).

        @return: True if at least one packet in it passed authentication;
            C{fresh} then says whether it brought the newest 1-RTT packet
            received so far (what proves that the peer sends from C{addr}
            now, where a delayed or replayed packet proves nothing).
        """
        passed = self._passed = []
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        largest = space.largest_received_packet if space is not None else None
        path = None
        if (self._is_client and self._handshake_confirmed and self._network_paths
                and self._network_paths[0].addr != addr):
            path = next((p for p in self._network_paths if p.addr == addr), None)
            if path is None:
                # aioquic's client would drop it at once: let it through on
                # a path of its own, which stays only if a packet passes.
                path = _connection.QuicNetworkPath(addr)
                self._add_network_path(path)
        super().receive_datagram(data, addr, now)
        if not passed:
            self.unauthenticated += 1
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        self.fresh = bool(passed) and space is not None and (
            largest is None or space.largest_received_packet > largest)
        if path is None or path not in self._network_paths:
            return bool(passed)
        mine = [probing for p, probing in passed if p is path]
        if not mine:
            if not (path.is_validated or path.local_challenge_sent or path.peer_cid):
                self._network_paths.remove(path)  # nothing came from there
        elif self.fresh and not all(mine):
            self._follow(path)
        return bool(passed)

    def _follow(self, network_path):
        # What aioquic's server does when a client's newest packet comes
        # from a new address (RFC 9000 section 9.3): send there from now on,
        # and validate the path; if the validation fails, the last validated
        # path is restored.
        self._network_paths.remove(network_path)
        self._network_paths.insert(0, network_path)
        if network_path.peer_cid is not None:
            self._use_reserved_peer_cid(network_path)
        if not network_path.is_validated:
            network_path.local_challenge_sent = False
            network_path.validation_deadline = None
        self.peer_moves += 1
        self.reset_datagram_size()

    def probe_now(self):
        """
        Send a probe (an ack-eliciting PING) at the next transmission, and
        forget the probe timeout's backoff: the route under the connection
        changed (a layer below QUIC moved it), and the backoff that grew
        while the old route was dead would otherwise hold back the first
        packets on the new one for seconds.  The probe's acknowledgement
        then lets loss recovery resend what was lost at once.
        """
        self._loss._pto_count = 0
        self._send_probe()
        self.reset_datagram_size()

    def resend_handshake(self, now):
        """
        Send our handshake's CRYPTO data again at the next transmission,
        without waiting for the probe timeout: its first copy went out
        before the route to the peer was known (L{p2pnat.peer.streams.EarlyDial})
        and may never have reached it.
        """
        self._loss.reschedule_data(now=now)

    def _payload_received(self, context, *args, **kwargs):
        # Called for each packet that decrypted and is not a duplicate.
        result = super()._payload_received(context, *args, **kwargs)
        self._passed.append((context.network_path, result[1]))
        return result

    # -- packet size --------------------------------------------------------------

    @property
    def datagram_size(self):
        """The largest UDP payload this connection sends now, bytes."""
        return self._max_datagram_size

    def reset_datagram_size(self, not_before=None):
        """
        Send base-size packets from now on (the route changed, or big
        packets seem to be lost), and probe the larger sizes again at the
        next transmission, or not before C{not_before} (the clock of
        C{datagrams_to_send}'s C{now}).
        """
        self._set_datagram_size(BASE_DATAGRAM_SIZE)
        self._pmtu_candidates = list(PROBE_SIZES)
        self._pmtu_probe = None  # one still in flight proves nothing now
        self._pmtu_lost = 0
        self._pmtu_not_before = not_before
        self._pmtu_path = None

    def _set_datagram_size(self, size):
        # The builder of each transmission and the pacer read it; the
        # congestion controller keeps counting its window in bytes (its
        # additive increase stays a base-size packet per RTT).
        self._max_datagram_size = size
        self._loss._pacer._max_datagram_size = size

    def datagrams_to_send(self, now):
        """aioquic's, plus path MTU discovery (see the module)."""
        paths = self._network_paths
        if self._pmtu_path is not None and (not paths or paths[0] is not self._pmtu_path):
            self.reset_datagram_size()  # a new path: its MTU is unknown
        elif (self._max_datagram_size > BASE_DATAGRAM_SIZE
              and self._loss._pto_count >= BLACK_HOLE_PTOS):
            self.pmtu_probes["fallbacks"] += 1
            self.reset_datagram_size(not_before=now + PROBE_RETRY)
        datagrams = super().datagrams_to_send(now)
        if self._pmtu_probe_due(now):
            datagrams += self._send_pmtu_probe(now)
        return datagrams

    def _pmtu_probe_due(self, now):
        return (self._pmtu_probe is None and bool(self._pmtu_candidates)
                and self._handshake_confirmed and self._state not in _connection.END_STATES
                and bool(self._network_paths) and self._network_paths[0].is_validated
                and (self._pmtu_not_before is None or now >= self._pmtu_not_before))

    def _send_pmtu_probe(self, now):
        size = self._pmtu_candidates[0]
        network_path = self._network_paths[0]
        builder = _connection.QuicPacketBuilder(
            host_cid=self.host_cid, is_client=self._is_client, max_datagram_size=size,
            packet_number=self._packet_number, peer_cid=self._peer_cid.cid,
            version=self._version)
        crypto = self._cryptos[tls.Epoch.ONE_RTT]
        if not crypto.send.is_valid():
            return []
        number = builder.packet_number
        builder.start_packet(QuicPacketType.ONE_RTT, crypto)
        buf = builder.start_frame(QuicFrameType.PING, capacity=1,
                                  handler=self._on_pmtu_probe,
                                  handler_args=(size, number, network_path))
        # PADDING frames (zero bytes) up to the size, the AEAD tag included.
        buf.push_bytes(bytes(builder.remaining_buffer_space))
        # Not in flight: neither counted against nor taken from the
        # congestion window when lost (RFC 9000 section 14.4).
        builder._packet.in_flight = False
        self._pmtu_probe = number
        self.pmtu_probes["sent"] += 1
        return self._flush_builder(builder=builder, network_path=network_path,
                                   peer_cid=self._peer_cid.cid, now=now)

    def _on_pmtu_probe(self, delivery, size, number, network_path):
        if self._pmtu_probe != number:
            return  # sent before a reset: it proves nothing about this route
        self._pmtu_probe = None
        if delivery == QuicDeliveryState.ACKED:
            self.pmtu_probes["acked"] += 1
            if size > self._max_datagram_size:
                self._set_datagram_size(size)
            self._pmtu_path = network_path
            # The largest fitting candidate is found: nothing left to try.
            self._pmtu_candidates = []
            self._pmtu_lost = 0
            return
        self.pmtu_probes["lost"] += 1
        self._pmtu_lost += 1
        if self._pmtu_lost >= MAX_PROBES:
            self._pmtu_candidates.pop(0)
            self._pmtu_lost = 0

    # -- flow control -------------------------------------------------------------

    def track_stream(self, stream_id):
        """
        Start counting what the application takes from C{stream_id}: from
        now on its window moves only as L{consumed} reports.
        """
        self._consumed.setdefault(stream_id, 0)

    def consumed(self, stream_id, count):
        """The application took C{count} more bytes of C{stream_id}."""
        if stream_id in self._consumed:
            self._consumed[stream_id] += count

    def forget_stream(self, stream_id):
        """The application is done with C{stream_id}'s data."""
        self._consumed.pop(stream_id, None)

    def _write_stream_limits(self, builder, space, stream):
        consumed = self._consumed.get(stream.stream_id)
        if consumed is None or not stream.max_stream_data_local:
            return super()._write_stream_limits(builder, space, stream)
        target = consumed + self.stream_window
        # Announce again once half the window has been used, not on every
        # packet.
        if target - stream.max_stream_data_local >= self.stream_window // 2:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=_connection.MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def unsent(self, stream_id):
        """
        Bytes given for C{stream_id} that have not been sent once yet (what
        waits for the congestion or flow-control window).
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender.highest_offset

    # -- datagrams ------------------------------------------------------------------

    def send_datagram_frame(self, data):
        """
        Queue a DATAGRAM frame; False (and nothing queued) if
        L{MAX_PENDING_DATAGRAMS} already wait.
        """
        if len(self._datagrams_pending) >= MAX_PENDING_DATAGRAMS:
            return False
        super().send_datagram_frame(data)
        return True

    def _write_datagram_frame(self, builder, data, frame_type):
        # aioquic writes waiting datagrams into the packet being built until
        # it is full; stopping after the first makes the builder end this
        # packet (short-header packets are never coalesced: one UDP datagram
        # each) and put the next datagram in a new one.  Packet numbers never
        # repeat within a connection, so the builder's number says which
        # packet this is.  (This datagram is still in the queue.)
        number = builder.packet_number
        if number == self._datagram_packet \
                and len(self._datagrams_pending) <= DATAGRAMS_APART:
            raise QuicPacketBuilderStop
        if self._handshake_confirmed:
            written = super()._write_datagram_frame(builder, data, frame_type)
        else:
            # Sent before the handshake is confirmed (behind our Finished):
            # if the peer could not read it yet (our Finished was lost, so
            # its 1-RTT keys were not in use), it is declared lost and goes
            # once more (L{_on_early_datagram_delivery}).
            length = len(data)
            buf = builder.start_frame(frame_type, capacity=1 + size_uint_var(length) + length,
                                      handler=self._on_early_datagram_delivery,
                                      handler_args=(data,))
            buf.push_uint_var(length)
            buf.push_bytes(data)
            written = True
        self._datagram_packet = number
        return written

    def _on_early_datagram_delivery(self, delivery, data):
        """
        A datagram sent before the handshake was confirmed was acknowledged
        or lost: a lost one is queued again, at most L{EARLY_RESENDS} in a
        connection (it may then arrive twice if only its acknowledgement
        was lost; datagrams promise no more).
        """
        if delivery == QuicDeliveryState.LOST and self._early_resends < EARLY_RESENDS \
                and len(self._datagrams_pending) < MAX_PENDING_DATAGRAMS:
            self._early_resends += 1
            self._datagrams_pending.appendleft(data)
