# -*- test-case-name: tests.unit.test_peer_streams,tests.unit.test_peer_streams_datagrams -*-
"""
End-to-end encrypted streams between two peers, over the P2P path the
lobby set up: QUIC (L{p2pnat.quic}) on the path's own sockets, and TCP
port forwarding over its streams.

    path = yield client.connect("bob")                     # alice, who connected
    streams = yield connect_streams(path, credentials)     # QUIC to client:bob
    streams.open_stream("ssh", protocol)

    def on_path(path):                                     # bob, who was connected to
        accept_streams(path, credentials, {"ssh": factory})

The side that asked the lobby for the path opens the QUIC connection; the
other accepts exactly the peer the lobby introduced (``client:PEERID``):
a certificate from the deployment's CA naming anyone else is refused in
the handshake.  Neither the lobby nor a relay can read or alter what the
streams carry: they see QUIC packets only.

How the packets travel (L{PathStreams}):

- on a direct path, as QUIC datagrams on the punched socket itself, beside
  the path's p2pnat frames (the first byte tells them apart, as
  ``docs/quic.rst`` says: QUIC has bit 0x40 set, p2pnat frames and STUN do
  not);
- on a path the lobby relays, inside the path's own datagrams (the lobby
  relays nothing else): a QUIC packet is up to 1452 bytes and a path
  datagram carries at most L{M.MAX_PAYLOAD}, so each packet goes in
  fragments (L{fragments}, L{Reassembly}).  On such a path, the path's
  datagrams that begin with L{FRAGMENT} belong to QUIC; the application's
  other datagrams still reach C{on_datagram}.

The path's datagrams (L{p2pnat.peer.path.Path.send}, C{on_datagram}) move
onto the connection too: a L{PathStreams} is the path's C{channel}, and
each datagram goes in a QUIC DATAGRAM frame (RFC 9221), by either route.
Until the handshake is over they wait (L{DatagramQueue}); a path on
which QUIC cannot run (a side has no certificate: L{ClearDatagrams} says
so to the peer with L{CLEAR_HELLO}; or the handshake failed or never
came) falls back to the path's own frames, which the lobby could read,
and says so (C{on_settled}).  Once the connection is up, datagrams that
come in the clear are dropped: the lobby, which holds the path's session
key, could have forged them.

QUIC itself sees one fixed peer address: the path picks the route of each
packet (direct when it is, else relayed) and follows a later upgrade from
relayed to direct, so the connection carries on across it without QUIC's
own migration.  The peer's NAT rebinding is followed as soon as QUIC
authenticates a packet from the new address (L{PathStreams.packet_from});
a direct route that falls silent for QUIC (a new port that our NAT
filters) starts the path's recovery over the relay at once
(L{PathStreams._quic_silent}), long before QUIC's idle timeout.

The TCP side: L{TcpForwardFactory} (each accepted TCP connection becomes a
stream to one service of the peer) and L{TcpServiceFactory} (each
incoming stream for a service is connected to a TCP address), both with
back-pressure both ways and half-close passed on.
"""

import collections
import struct
import weakref

from twisted.internet import defer, endpoints, error, interfaces, protocol
from twisted.python import failure
from zope.interface import implementer

from p2pnat.daemon.logs import Logger
from p2pnat.peer.sockets import SessionPort
from p2pnat.protocol import p2p as M
from p2pnat.net.streams import Gate, OneShotFactory
from p2pnat.net.udp import DropLog
from p2pnat.protocol import wire
from p2pnat.quic import HandshakeFailed, PeerIdentity, QuicSocket, is_quic
from p2pnat.quic.connection import MAX_DATAGRAM_PAYLOAD
from p2pnat.quic.endpoint import HANDSHAKE_TIMEOUT

#: First byte of a path datagram that carries a fragment of a QUIC packet
#: (a relayed path).  0xFF begins no UTF-8 text and no WireGuard message.
FRAGMENT = 0xFF
_FRAGMENT_HEAD = struct.Struct("!BHB")  # FRAGMENT, packet number, index << 4 | count
#: Fragment payload: what fits a path datagram after the fragment header.
FRAGMENT_DATA = M.MAX_PAYLOAD - _FRAGMENT_HEAD.size
#: A QUIC packet is at most this long (ours are 1200 bytes, 1452 once the
#: route was probed for it: see p2pnat.quic.connection).
MAX_PACKET = 15 * FRAGMENT_DATA
#: QUIC connections one path's socket holds (a reconnect may overlap the
#: connection it replaces until that one times out).
MAX_CONNECTIONS = 4
#: QUIC's keepalive and silence timeout on a path (seconds), while the
#: application sends: a direct route that falls silent this long (a NAT
#: rebound to a port the peer's NAT filters) is recovered over the relay
#: well before QUIC's idle timeout would end the connection.  An idle
#: connection PINGs once per path keepalive interval, and its path's
#: liveness (L{p2pnat.peer.health}) watches it.
KEEPALIVE_INTERVAL = 2.0
SILENCE_TIMEOUT = 6.0
#: QUIC's idle timeout on a path (seconds): longer than the path's own
#: recovery can take (its silence bound, 33 s by default, and a connect
#: attempt, 12 s), so that the connection outlives any recovery that
#: succeeds.  A path that closes closes its connections at once anyway.
IDLE_TIMEOUT = 60.0


#: The largest datagram the encrypted channel carries: what one QUIC
#: DATAGRAM frame holds in a 1200-byte packet (the size every route takes).
MAX_DATAGRAM = MAX_DATAGRAM_PAYLOAD
#: Datagrams the application sends before the channel is settled (the
#: handshake is not over) wait, at most this many: the oldest is dropped.
QUEUE = 32
#: A path datagram that says "I run no QUIC on this path" (a side without
#: a certificate sends it): index 0 of 0 fragments, which no packet has.
CLEAR_HELLO = bytes([FRAGMENT, 0, 0, 0])
#: The side that accepts QUIC waits this long for the peer's connection
#: before its datagrams fall back to the clear (the connecting side gives
#: up after HANDSHAKE_TIMEOUT).
SETTLE_TIMEOUT = HANDSHAKE_TIMEOUT + 2.0
#: The side that connected opens a new connection this long after its
#: connection ended with the path still up (the path's datagrams wait for
#: it), doubling while attempts fail, up to L{REDIAL_MAX} seconds.
REDIAL_DELAY = 1.0
REDIAL_MAX = 30.0
#: A side without QUIC answers the peer's QUIC fragments with
#: L{CLEAR_HELLO} at most this often (seconds).
HELLO_INTERVAL = 1.0


class StreamsUnavailable(Exception):
    """QUIC streams cannot run on this path (closed); the message says why."""


def fragments(packet, number):
    """
    Split a QUIC packet into the path datagrams that carry it on a relayed
    path, numbered C{number} (mod 2**16).
    """
    if not 0 < len(packet) <= MAX_PACKET:
        raise ValueError(f"a QUIC packet of {len(packet)} bytes")
    count = -(-len(packet) // FRAGMENT_DATA)
    return [_FRAGMENT_HEAD.pack(FRAGMENT, number & 0xFFFF, i << 4 | count)
            + packet[i * FRAGMENT_DATA:(i + 1) * FRAGMENT_DATA] for i in range(count)]


class Reassembly:
    """
    Put relayed QUIC packets together again from their L{fragments}.

    At most C{limit} packets wait for missing fragments; beyond that the
    oldest is forgotten (a lost fragment loses its packet, and QUIC sends
    the data again).  Malformed fragments are counted in C{malformed} and
    dropped.
    """

    def __init__(self, limit=32):
        self.limit = limit
        self.pending = collections.OrderedDict()  # number -> [count, {index: data}]
        self.malformed = 0

    def add(self, datagram):
        """Take one fragment; return the whole packet once it is complete, else None."""
        if len(datagram) <= _FRAGMENT_HEAD.size:
            self.malformed += 1
            return None
        tag, number, part = _FRAGMENT_HEAD.unpack_from(datagram)
        index, count = part >> 4, part & 0x0F
        if tag != FRAGMENT or not index < count:
            self.malformed += 1
            return None
        data = datagram[_FRAGMENT_HEAD.size:]
        if count == 1:
            return data
        entry = self.pending.get(number)
        if entry is None or entry[0] != count:
            entry = self.pending[number] = [count, {}]
            while len(self.pending) > self.limit:
                self.pending.popitem(last=False)
        entry[1][index] = data
        if len(entry[1]) < count:
            return None
        del self.pending[number]
        return b"".join(entry[1][i] for i in range(count))


class DatagramQueue:
    """
    The datagrams that wait for a channel, oldest first: at most C{limit};
    one more drops the oldest, counted in C{dropped}.
    """

    def __init__(self, limit=QUEUE):
        self.limit = limit
        self.items = collections.deque()
        self.dropped = 0

    def __len__(self):
        return len(self.items)

    def push(self, payload):
        """Keep C{payload}; True if the oldest had to go for it."""
        self.items.append(payload)
        if len(self.items) > self.limit:
            self.items.popleft()
            self.dropped += 1
            return True
        return False

    def drain(self):
        """Everything waiting, oldest first; the queue is empty after."""
        items = list(self.items)
        self.items.clear()
        return items


class ClearDatagrams:
    """
    The datagram channel of a path on which this side runs no QUIC (its
    bundle has no certificate): datagrams go in the path's own frames,
    which the lobby could read.  It tells the peer with L{CLEAR_HELLO} (at
    once, and again when the peer's QUIC fragments come), so that a peer
    waiting for a QUIC connection falls back without waiting for a
    timeout, and drops those fragments, which it cannot read.
    """

    encrypted = False

    def __init__(self, path):
        self.path = path
        self.fragments_dropped = 0
        self._hello_at = None
        path.channel = self
        self._hello()

    def send_datagram(self, payload):
        self.path.send_clear(payload)

    def clear_received(self, payload):
        if payload[:1] == bytes([FRAGMENT]):
            if payload != CLEAR_HELLO:
                self.fragments_dropped += 1
                self._hello()
            return
        self.path.deliver(payload)

    def _hello(self):
        now = self.path.clock.seconds()
        if self._hello_at is not None and now - self._hello_at < HELLO_INTERVAL:
            return
        self._hello_at = now
        try:
            self.path.send_clear(CLEAR_HELLO)
        except (ConnectionError, OSError):
            pass  # closed: nothing to tell


class _Tap:
    """
    The QUIC datagrams that arrive on one of a path's sockets.

    A path's sockets belong to L{p2pnat.net.udp.ControlProtocol}s, which
    drop whatever is neither a p2pnat frame nor STUN.  A tap stands in
    front of one (it replaces the instance's C{datagramReceived}, and puts
    it back when the last path using it goes), hands QUIC datagrams to the
    L{PathStreams} of the path they came for and everything else, as
    before, to the C{ControlProtocol}.  A socket shared by many sessions
    (L{p2pnat.peer.sockets.SharedSocket}) may carry many paths: a QUIC
    datagram goes to the path whose peer sends from its address, else to
    the path whose QUIC connection its connection ID names (its peer's
    NAT may have rebound: QUIC authenticates every packet, and the path
    then follows the peer there, L{PathStreams.packet_from}).
    """

    @classmethod
    def on(cls, proto):
        """The tap on C{proto}, made if there is none."""
        tap = _TAPS.get(proto)
        if tap is None:
            tap = _TAPS[proto] = cls(proto)
        return tap

    def __init__(self, proto):
        self.proto = proto
        self.streams = []
        self.own = "datagramReceived" in vars(proto)  # not the class's method
        self.passed = proto.datagramReceived
        proto.datagramReceived = self.datagramReceived

    def add(self, streams):
        if streams not in self.streams:
            self.streams.append(streams)

    def remove(self, streams):
        if streams in self.streams:
            self.streams.remove(streams)
        if not self.streams and _TAPS.get(self.proto) is self:
            del _TAPS[self.proto]
            if self.own:
                self.proto.datagramReceived = self.passed
            else:
                del self.proto.datagramReceived  # the class's method again

    def datagramReceived(self, data, addr):
        if data and is_quic(data) and self.streams:
            addr = addr[:2]
            for streams in self.streams:
                if streams.peer_address() == addr:
                    return streams.packet_received(data)
            for streams in self.streams:
                if streams.socket.owns(data):
                    return streams.packet_from(data, self.proto, addr)
        return self.passed(data, addr)


#: ControlProtocol -> its L{_Tap}.
_TAPS = weakref.WeakKeyDictionary()


def _raw(proto):
    """The ControlProtocol under a path's socket (a shared socket's lease is not one)."""
    return proto.shared.proto if isinstance(proto, SessionPort) else proto


class _PathTransport:
    """The transport of a path's L{QuicSocket}: every packet takes the path's route now."""

    def __init__(self, streams):
        self.streams = streams

    def write(self, data, addr):
        self.streams.send_packet(data)

    def getHost(self):
        path = self.streams.path
        route = path.direct or path.relayed
        if route is None or route[0].transport is None:
            return None
        return route[0].transport.getHost()


def path_socket(clock, credentials, options):
    """The L{QuicSocket} of a path: C{options} over the path's defaults (see the module)."""
    options = dict(options)
    options.setdefault("max_connections", MAX_CONNECTIONS)
    options.setdefault("keepalive_interval", KEEPALIVE_INTERVAL)
    options.setdefault("silence_timeout", SILENCE_TIMEOUT)
    options.setdefault("idle_timeout", IDLE_TIMEOUT)
    # PINGs only while the application sends; idle, the path's own
    # keepalive goes as a QUIC PING (keepalive()), at the interval the
    # path learns from its NATs.
    options.setdefault("pings_when_idle", False)
    return QuicSocket(clock, credentials, **options)


class _EarlyTransport:
    """The transport of an L{EarlyDial}'s socket: the punch's C{send}, while it runs."""

    def __init__(self, dial):
        self.dial = dial

    def write(self, data, addr):
        if self.dial.send is not None:
            self.dial.send(data)

    def getHost(self):
        return None


class EarlyDial:
    """
    The QUIC connection the asking side begins while it punches: a
    punch's C{companion} (L{p2pnat.peer.punch.Punch}).  Its first packet,
    the client's Initial, leaves right behind the first probes, so that
    the peer's answer comes one round trip after them instead of one
    after the punch's own round trip; the peer's punch keeps it until its
    path's QUIC layer reads it.  Once the punch found the path,
    L{connect_streams} carries on with this connection (the path's
    C{early_dial}); a path that is not direct, or options of its own,
    L{discard} it, and a new connection is made as usual.

    @param address: what QUIC takes for the peer's address, for good (the
        path routes its packets): the peer's observed address.
    @param rtt: the round trip to the lobby (seconds): how long the
        handshake's first copy is given to bring an answer before it is
        sent again on the path (L{adopted}).
    """

    def __init__(self, clock, credentials, peer, address, rtt=None):
        self.clock = clock
        self.credentials = credentials
        self.peer = PeerIdentity("client", peer)
        self.address = tuple(address)
        self.rtt = rtt
        self.socket = path_socket(clock, credentials, {})
        self.send = None
        self.endpoint = None
        self.connected = None
        #: The C{(socket, destination)} pairs the first copy went to.
        self.targets = ()
        self._resend = None

    def __call__(self, send, targets=()):
        """The punch's companion: connect, the Initial through C{send} now."""
        self.send = send
        self.targets = tuple(targets)
        self.socket.makeConnection(_EarlyTransport(self))
        self.connected = self.socket.connect(self.address, self.peer)
        (self.endpoint,) = self.socket.endpoints
        self.endpoint.flush()

    def usable(self, path, credentials, options):
        """Whether L{connect_streams} over C{path} may carry on with this connection."""
        ours = self.credentials
        return (self.endpoint is not None and not self.connected.called and not options
                and (credentials is ours or (credentials.cert == ours.cert
                                             and credentials.ca_certs == ours.ca_certs))
                and path.mode == "direct" and path.direct is not None)

    def adopted(self, route):
        """
        The path took the connection over, on C{route} (its direct
        C{(socket, address, session)}): the punch no longer sends for it.
        If the first copy did not go that way, the handshake goes again
        now; else it is given half a round trip more to bring the peer's
        answer (its ProbeAck came first) before it goes again.
        """
        self.send = None
        proto, addr, _ = route
        went = any(p is proto and tuple(d) == tuple(addr) for p, d in self.targets)
        wait = 0.0 if not went else 0.01 + 0.5 * (self.rtt or 0.0)
        self._resend = self.clock.callLater(wait, self._resend_now)
        self.connected.addBoth(self._settled)

    def _resend_now(self):
        self._resend = None
        self.endpoint.resend_handshake()

    def _settled(self, result):
        if self._resend is not None and self._resend.active():
            self._resend.cancel()
        self._resend = None
        return result

    def discard(self, why):
        """Drop the connection without a word to the peer (the path went another way)."""
        self.send = None
        if self.endpoint is not None:
            self.connected.addErrback(lambda failure: None)
            self.endpoint.close(why)


class PathStreams:
    """
    QUIC over one L{p2pnat.peer.path.Path} (see the module): made by
    L{connect_streams} or L{accept_streams}, which make it the path's
    C{channel} once the socket connects or listens (what came before in the
    path's frames is then read: see L{p2pnat.peer.path.Path.channel}).

    @ivar socket: the L{QuicSocket} of the path.
    @ivar endpoint: the L{p2pnat.quic.QuicEndpoint} of the connection once
        it is up (on the accepting side, the latest one the peer opened).
    @ivar on_datagram: the path's C{on_datagram}: the application's
        handler of the path's datagrams.
    @ivar on_connection: called with each QUIC endpoint that comes up.
    @ivar encrypted: how the path's datagrams travel: None until settled
        (they wait in C{queue}), True once they ride the QUIC connection,
        False if they fell back to the clear (C{clear_reason} says why).
    @ivar on_settled: called as C{on_settled(encrypted, reason)} when
        C{encrypted} changes from None, or from False to True (the peer's
        connection came after all).
    @ivar clear_dropped: the clear datagrams dropped because the channel
        is encrypted (only the lobby or an old peer sends those).
    """

    log = Logger(namespace="p2pnat.streams")

    def __init__(self, path, credentials, early=None, **options):
        if path.mode == "closed" or (path.direct is None and path.relayed is None):
            raise StreamsUnavailable(f"the path to {path.peer} is not up")
        if credentials.identity is None:
            raise StreamsUnavailable("our certificate names no p2pnat peer")
        self.path = path
        self.peer = PeerIdentity("client", path.peer)
        self.endpoint = None
        self.on_connection = lambda endpoint: None
        self.on_settled = lambda encrypted, reason: None
        self.encrypted = None
        self.clear_reason = None
        self.queue = DatagramQueue()
        self.clear_dropped = 0
        self.closed = False
        self._settle_call = None
        self._redial = None  # the connecting side: [services, delay, call]
        self.reassembly = Reassembly()
        self.packets_sent = {"direct": 0, "relayed": 0}
        #: Times the direct route followed the peer to a new address.
        self.follows = 0
        self._recover_call = None
        self._route = None  # (mode, socket, address) QUIC's packets take now
        #: Times QUIC's silence started the path's recovery.
        self.recoveries = 0
        self._number = 0
        self._taps = []
        if early is not None:
            # The connection the punch began (L{EarlyDial}): its socket
            # sends by the path's route from now on.
            self.socket = early.socket
            self.socket.transport = _PathTransport(self)
            self.address = early.address
        else:
            route = path.direct or path.relayed
            #: What QUIC takes for the peer's address, always: the path routes.
            self.address = route[1]
            self.socket = path_socket(path.clock, credentials, options)
            self.socket.makeConnection(_PathTransport(self))
        self.drop_log = DropLog(self.log, path.clock)
        path.route_changed = self._route_changed
        self._route_changed()

    @property
    def on_datagram(self):
        return self.path.on_datagram

    @on_datagram.setter
    def on_datagram(self, callback):
        self.path.on_datagram = callback

    # -- for applications ----------------------------------------------------------

    def open_stream(self, service, protocol):
        """
        Open a stream to the peer's C{service} (see
        L{p2pnat.quic.QuicEndpoint.open_stream}).

        @raise ConnectionError: if no QUIC connection is up.
        """
        if self.endpoint is None:
            raise ConnectionError(f"no QUIC connection to {self.peer}")
        return self.endpoint.open_stream(service, protocol)

    def close(self, reason="closed"):
        """Close the QUIC connections and let go of the path's sockets; the path stays."""
        self.closed = True
        self.socket.close_all(reason)
        for call in (self._settle_call, self._redial and self._redial[2]):
            if call is not None and call.active():
                call.cancel()
        self._quic_alive()  # no more recoveries
        if self.path.route_changed == self._route_changed:
            self.path.route_changed = lambda: None
        if self.path.channel is self:
            self.path.channel = None
        for tap in self._taps:
            tap.remove(self)
        self._taps = []

    # -- the path's side -------------------------------------------------------------

    def peer_address(self):
        """Where the peer's direct traffic comes from now (None if relayed)."""
        return self.path.direct[1] if self.path.direct is not None else None

    def send_packet(self, data):
        """Send one QUIC packet by the path's route now (see the module)."""
        path = self.path
        if path.mode == "closed":
            raise ConnectionError("path closed")
        if path.direct is not None:
            proto, addr, _ = path.direct
            proto.send(data, addr, "quic")
            self.packets_sent["direct"] += 1
        elif path.relayed is not None:
            self._number += 1
            for part in fragments(data, self._number):
                path.send_clear(part)
            self.packets_sent["relayed"] += 1
        else:
            raise ConnectionError("path not up")

    def packet_received(self, data):
        """A QUIC packet from the peer, by either route."""
        self.socket.receive(data, self.address)

    def packet_from(self, data, proto, addr):
        """
        A QUIC packet for our connection that came direct, on the socket of
        C{proto} (the raw C{ControlProtocol}), from C{addr}, which is not
        where the path has the peer.

        If QUIC authenticates it as the newest packet of the connection,
        the path's direct route moves to C{addr}: the peer's NAT rebound,
        and the answers must follow at once rather than at the peer's next
        path keepalive.  A forged, replayed or late packet moves nothing.
        """
        if self.socket.receive(data, self.address):
            self._follow(proto, addr)

    def replay_early(self):
        """
        Read the QUIC datagrams that reached the path's direct socket
        before this layer tapped it (the punch kept them: the peer's
        handshake rides with its probes), as if they came now.
        """
        early, self.path.early_quic = self.path.early_quic, []
        for proto, data, addr in early:
            tap = _TAPS.get(_raw(proto))
            if tap is not None and self in tap.streams:
                tap.datagramReceived(data, addr)

    def _follow(self, proto, addr):
        path = self.path
        if path.mode == "closed" or path.direct is None:
            return
        route_proto, old, session = path.direct
        if addr == old or _raw(route_proto) is not proto:
            return
        self.log.info("path to {peer}: the peer now sends from {addr} (was {old}):"
                      " following it", peer=path.peer, addr=wire.format_addr(addr),
                      old=wire.format_addr(old))
        # What Path does itself on an authenticated keepalive from a new
        # address: same socket, same session, the peer's new address.
        path.direct = (route_proto, addr, session)
        self.follows += 1
        self._probe_route()

    def _probe_route(self):
        """QUIC's packets take a new route: have it probe there now (see L{_route_changed})."""
        route = self.path.direct or self.path.relayed
        key = (self.path.mode, id(route[0]), route[1]) if route is not None else None
        if key != self._route:
            self._route = key
            for endpoint in self.socket.endpoints:
                endpoint.route_changed()

    # -- the path's datagrams (its channel) -----------------------------------------------

    def send_datagram(self, payload):
        """
        Send one of the application's datagrams (L{p2pnat.peer.path.Path.send}):
        in a QUIC DATAGRAM frame once the connection is up, queued until
        the channel is settled (or while a connection is replaced), in the
        path's own frames if it fell back to the clear.

        @raise ValueError: larger than L{MAX_DATAGRAM} bytes (or, in the
            clear, than the path's frames carry).
        """
        if self.encrypted is False:
            return self.path.send_clear(payload)
        if len(payload) > MAX_DATAGRAM:
            raise ValueError(f"datagram of {len(payload)} bytes: a QUIC datagram frame holds"
                             f" at most {MAX_DATAGRAM}")
        if self.encrypted and self.endpoint is not None:
            try:
                return self.endpoint.send_datagram(payload)
            except ConnectionError:
                pass  # the connection just ended: wait for the next one
        if self.queue.push(bytes(payload)):
            self.drop_log("queue-full", self.address, f"{self.queue.limit} waiting")

    def keepalive(self):
        """
        The path's keepalive (L{p2pnat.peer.path.Path}), as a QUIC PING on
        an encrypted channel: one packet refreshes the NATs' mappings and
        QUIC's idle timer alike, and its ACK tells the path the peer is
        there (L{p2pnat.quic.QuicEndpoint.on_heard}).

        @return: whether it went (if not, the path sends its own).
        """
        if self.encrypted and self.endpoint is not None:
            return self.endpoint.ping()
        return False

    def clear_received(self, payload):
        """One of the path's own datagrams (an L{M.Data} payload) from the peer."""
        if payload[:1] == bytes([FRAGMENT]):
            if payload == CLEAR_HELLO:
                if self.encrypted is None:
                    self.fall_back("the peer has no certificate for QUIC")
                return
            malformed = self.reassembly.malformed
            packet = self.reassembly.add(payload)
            if packet is not None:
                self.packet_received(packet)
            elif self.reassembly.malformed > malformed:
                self.socket.drop_log("malformed-fragment", self.address, f"{len(payload)} bytes")
            return
        if self.encrypted:
            # Only the lobby (it holds the session key) or a peer that runs
            # no QUIC sends these; the peer runs QUIC.
            self.clear_dropped += 1
            self.drop_log("clear-datagram", self.address, "the channel is encrypted")
            return
        if self.encrypted is None:
            self.fall_back("the peer sends its datagrams in the clear")
        self.path.deliver(payload)

    def fall_back(self, reason):
        """
        No QUIC connection for the path's datagrams (C{reason} says why):
        they go in the path's own frames from now on, those that waited
        first.  A connection that comes up later takes them back.
        """
        if self.encrypted is None:
            self._settle(False, reason)

    def _quic_datagram(self, payload):
        self.path.deliver(payload)

    def _settle(self, encrypted, reason):
        if self._settle_call is not None and self._settle_call.active():
            self._settle_call.cancel()
        self._settle_call = None
        changed = encrypted != self.encrypted
        self.encrypted, self.clear_reason = encrypted, reason
        if changed:
            if encrypted:
                self.log.info("datagrams with {peer} end-to-end encrypted", peer=self.path.peer)
            else:
                self.log.warn("datagrams with {peer} in the clear: {reason}",
                              peer=self.path.peer, reason=reason)
            self.on_settled(encrypted, reason)
        for payload in self.queue.drain():
            try:
                self.send_datagram(payload)
            except ValueError:
                self.queue.dropped += 1  # fits QUIC's datagrams, not the clear ones
            except (ConnectionError, OSError):
                break

    def _no_connection(self):
        self._settle_call = None
        self.fall_back(f"no QUIC connection from the peer within {SETTLE_TIMEOUT:g}s")

    def _route_changed(self):
        path = self.path
        if path.mode == "closed":
            self.log.info("path to {peer} closed: closing its QUIC connections",
                          peer=path.peer)
            self.close("path closed")
            return
        protos = [route[0] for route in (path.direct,) if route is not None] + list(path.standby)
        wanted = []
        for proto in protos:
            raw = _raw(proto)
            if raw.transport is not None and all(raw is not t.proto for t in wanted):
                wanted.append(_Tap.on(raw))
        for tap in self._taps:
            if tap not in wanted:
                tap.remove(self)
        for tap in wanted:
            tap.add(self)
        self._taps = wanted
        # After a dead route, QUIC's probe timeout has backed off for
        # seconds: without a probe now the first packets on the new route
        # (relayed, or direct again) would wait that long.
        self._probe_route()

    def _accepted(self, endpoint):
        self.endpoint = endpoint
        endpoint.on_datagram = self._quic_datagram
        endpoint.on_heard = self.path.heard
        endpoint.on_silent = lambda: self._quic_silent(endpoint)
        endpoint.on_alive = self._quic_alive
        self._settle(True, None)
        self.on_connection(endpoint)

    def _quic_silent(self, endpoint):
        """
        QUIC heard nothing authenticated for its C{silence_timeout}, far
        sooner than the path's own keepalives notice (and long before
        QUIC's idle timeout ends the connection): on a direct path, start
        the path's recovery now (relay first, then a new punch; the
        connection follows the route the path takes), and again every
        C{silence_timeout} while QUIC stays silent on a direct route (an
        attempt fails when the peer's lobby presence is stale: its own
        NAT forgot it too).
        """
        self._recover_call = None
        path = self.path
        if endpoint is not self.endpoint or not endpoint.silent or path.mode != "direct":
            return
        silent = getattr(path.client, "path_silent", None)
        if silent is None:
            return
        self.log.info("QUIC to {peer} silent on the direct path: recovering the path",
                      peer=path.peer)
        self.recoveries += 1
        silent(path)
        self._recover_call = path.clock.callLater(endpoint.silence_timeout,
                                                  self._quic_silent, endpoint)

    def _quic_alive(self):
        if self._recover_call is not None and self._recover_call.active():
            self._recover_call.cancel()
        self._recover_call = None

    # -- the connecting side -------------------------------------------------------------

    def _dial(self, services, dial=None):
        """
        Open a connection to the peer (or carry on with the one the punch
        began, L{EarlyDial} C{dial}): L{QuicSocket.connect}'s Deferred,
        which fires once the server confirmed the handshake.

        The datagrams that wait leave one round trip before that, as soon
        as our side of the handshake is done
        (L{p2pnat.quic.QuicEndpoint.writable}): behind our ``Finished``,
        which the peer reads first (it never reads them if it refuses our
        certificate).  If the connection is not confirmed after all, they
        wait again, first in the queue, for what comes next (the clear
        fallback, another connection).
        """
        if dial is None:
            before = self.socket.endpoints
            d = self.socket.connect(self.address, self.peer, services=services)
            new = self.socket.endpoints - before
        else:
            d, new = dial.connected, {dial.endpoint}
            dial.endpoint.services = dict(services or {})
            dial.adopted(self.path.direct)
        early = []

        def writable(endpoint):
            if self.closed or self.encrypted is False or self.endpoint is not None:
                return
            for payload in self.queue.drain():
                try:
                    endpoint.send_datagram(payload)
                except ConnectionError:
                    self.queue.push(payload)
                    continue
                early.append(payload)

        def unconfirmed(reason):
            waiting = early + self.queue.drain()
            del early[:]
            for payload in waiting:
                self.queue.push(payload)
            return reason

        for endpoint in new:
            # The peer may send a datagram as soon as its side is up, in the
            # packet that confirms the handshake to us.
            endpoint.on_datagram = self._quic_datagram
            endpoint.writable.addCallback(writable)
        return d.addCallbacks(lambda endpoint: early.clear() or endpoint, unconfirmed)

    def _up(self, endpoint):
        """A connection we opened is up: the channel's, until it ends."""
        self._accepted(endpoint)
        endpoint.closed.addCallback(lambda closed: self._ended(endpoint, closed))
        if self._redial is not None:
            self._redial[1] = REDIAL_DELAY

    def _ended(self, endpoint, closed):
        _forget(self, endpoint)
        if self._redial is None or self.closed or self.path.mode == "closed" \
                or self.endpoint is not None:
            return
        self.log.info("QUIC connection to {peer} ended ({reason}): a new one in {delay:g}s",
                      peer=self.peer, reason=closed.reason, delay=self._redial[1])
        self._redial[2] = self.path.clock.callLater(self._redial[1], self._redial_now)

    def _redial_now(self):
        self._redial[2] = None
        if self.closed or self.path.mode == "closed":
            return

        def failed(reason):
            reason.trap(HandshakeFailed)
            delay = self._redial[1] = min(2 * self._redial[1], REDIAL_MAX)
            if not (self.closed or self.path.mode == "closed"):
                self.log.info("QUIC connection to {peer} failed again ({why}): next in"
                              " {delay:g}s", peer=self.peer, why=reason.getErrorMessage(),
                              delay=delay)
                self._redial[2] = self.path.clock.callLater(delay, self._redial_now)

        try:
            d = self._dial(self._redial[0])
        except ConnectionError as e:  # the socket holds too many connections
            return failed(failure.Failure(HandshakeFailed(str(e))))
        d.addCallbacks(self._up, failed)


def connect_streams(path, credentials, *, services=None, on_settled=None, **options):
    """
    Open the QUIC connection over C{path} to the peer it leads to
    (``client:PEER``), as the side that asked for the path.  The path's
    datagrams ride it (see the module); if it cannot be made, they fall
    back to the clear.  If it ends later with the path still up (the
    peer's side restarted, a long outage timed it out), a new one is
    opened (L{REDIAL_DELAY}, L{REDIAL_MAX}); the datagrams wait for it.

    @param credentials: our L{p2pnat.quic.Credentials} (``p2pnat client
        add`` writes them into the client's bundle).
    @param services: service name -> factory, for streams the peer opens.
    @param on_settled: the L{PathStreams}'s C{on_settled}.
    @return: a Deferred firing with the L{PathStreams} once both sides are
        authenticated, or failing with L{HandshakeFailed} (the peer
        refused us, or its certificate names someone else) or
        L{StreamsUnavailable}.
    """
    dial, path.early_dial = path.early_dial, None
    if dial is not None and not dial.usable(path, credentials, options):
        dial.discard("the path went another way")
        dial = None
    try:
        streams = PathStreams(path, credentials, early=dial, **options)
    except StreamsUnavailable:
        return defer.fail()
    if on_settled is not None:
        streams.on_settled = on_settled
    d = streams._dial(services, dial)
    path.channel = streams
    streams.replay_early()

    def up(endpoint):
        streams._redial = [services, REDIAL_DELAY, None]
        streams._up(endpoint)
        return streams

    def failed(reason):
        streams.fall_back(f"the QUIC handshake failed: {reason.getErrorMessage()}")
        streams.close("handshake failed")
        if path.mode != "closed":
            ClearDatagrams(path)
        return reason

    return d.addCallbacks(up, failed)


def _forget(streams, endpoint):
    if streams.endpoint is endpoint:
        streams.endpoint = None


def accept_streams(path, credentials, services, *, on_connection=None, on_settled=None,
                   **options):
    """
    Accept the QUIC connection of the peer C{path} leads to, as the side
    that was connected to: only a certificate naming ``client:PEER`` (the
    peer the lobby introduced) is accepted.  The path's datagrams ride it
    (see the module); without one within L{SETTLE_TIMEOUT}, they fall back
    to the clear until one comes.

    @param services: service name -> factory for the peer's streams; a
        stream for any other name is refused.
    @param on_connection: called with each L{p2pnat.quic.QuicEndpoint}
        once it is up.
    @param on_settled: the L{PathStreams}'s C{on_settled}.
    @return: the L{PathStreams}.
    @raise StreamsUnavailable: the path is closed.
    """
    streams = PathStreams(path, credentials, **options)
    if on_connection is not None:
        streams.on_connection = on_connection
    if on_settled is not None:
        streams.on_settled = on_settled
    streams._settle_call = path.clock.callLater(SETTLE_TIMEOUT, streams._no_connection)

    def accepted(endpoint):
        streams._accepted(endpoint)
        endpoint.closed.addCallback(lambda closed: _forget(streams, endpoint))

    streams.socket.listen([streams.peer], accepted, services=services)
    path.channel = streams
    streams.replay_early()
    return streams


# -- TCP over streams ---------------------------------------------------------------

@implementer(interfaces.IHalfCloseableProtocol)
class _Half(protocol.Protocol):
    """
    One half of a L{_Splice}: a TCP connection's protocol or a QUIC
    stream's.  What it reads, the other half's transport writes; the end of
    its input ends the other's output.
    """

    other = None
    closed = False
    input_ended = False

    def __init__(self, splice):
        self.splice = splice
        self.early = []

    def dataReceived(self, data):
        self.splice.count(self, len(data))
        if self.other is None:
            # Only a stream before its TCP connection is made: the stream is
            # paused, so the peer can send at most one window.
            self.early.append(data)
        elif self.other.transport is not None:
            self.other.transport.write(data)

    def readConnectionLost(self):
        self.input_ended = True
        if self.other is not None:
            self.splice.pass_end(self)

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.closed = True
        self.splice.half_lost(self, reason)


class _Splice:
    """
    A TCP connection and a QUIC stream, joined (L{join}): each side pauses
    and resumes the other's reading (a L{Gate}), so a slow reader on one
    side slows the writer on the other instead of filling memory; the end
    of one side's input ends the other's output after what it queued
    (whichever side closes first, nothing already read is lost); an error
    on one side aborts the other.  Reports its end once.
    """

    def __init__(self, events, peer, service, direction):
        self.events = events
        self.peer = peer
        self.service = service
        self.direction = direction
        self.tcp = _Half(self)
        self.stream = _Half(self)
        self.bytes = {"sent": 0, "received": 0}
        self.stream_id = None
        self.error = None
        self.done = False

    def count(self, half, n):
        self.bytes["sent" if half is self.tcp else "received"] += n

    def opened(self):
        self.stream_id = self.stream.transport.stream_id
        self.events("stream-opened", peer=str(self.peer), service=self.service,
                    stream=self.stream_id, direction=self.direction)

    def join(self):
        """Both transports are connected: start passing bytes."""
        tcp, stream = self.tcp, self.stream
        tcp.other, stream.other = stream, tcp
        # Gates: pause and resume only.  A transport that ends stops its
        # producer (Twisted's TCP connectionLost, the stream's end); the raw
        # other transport would be aborted under the bytes still queued for
        # it, where it must end after them (pass_end, half_lost).
        stream.transport.registerProducer(Gate(tcp.transport), True)
        tcp.transport.registerProducer(Gate(stream.transport), True)
        for half in (tcp, stream):
            early, half.early = half.early, []
            for data in early:
                half.other.transport.write(data)
            if half.input_ended:
                self.pass_end(half)

    def pass_end(self, half):
        """C{half}'s input ended: end the other's output once it wrote what came before."""
        other = half.other
        if other.transport is None or other.closed:
            return
        # A TCP transport with a paused producer would wait for it instead
        # of closing (Twisted's FileDescriptor.doWrite); nothing comes from
        # this half any more anyway.
        other.transport.unregisterProducer()
        other.transport.loseWriteConnection()

    def half_lost(self, half, reason):
        other = self.stream if half is self.tcp else self.tcp
        if not reason.check(error.ConnectionDone):
            self.error = self.error or reason.getErrorMessage()
        if other.transport is not None and not other.closed:
            for h in (half, other):
                if h.transport is not None:
                    h.transport.unregisterProducer()
            if self.error:
                other.transport.abortConnection()
            else:
                other.transport.loseConnection()
        if self.tcp.closed and self.stream.closed and not self.done:
            self.done = True
            fields = dict(peer=str(self.peer), service=self.service, stream=self.stream_id,
                          direction=self.direction, **self.bytes)
            if self.error:
                fields["error"] = self.error
            self.events("stream-closed", **fields)

    def fail(self, why):
        """The splice could not be made (no connection, TCP connect refused)."""
        self.error = why
        self.done = True
        self.events("stream-failed", peer=str(self.peer), service=self.service,
                    stream=self.stream_id, direction=self.direction, error=why)
        for half in (self.tcp, self.stream):
            if half.transport is not None and not half.closed:
                half.transport.abortConnection()


def _no_events(name, **fields):
    pass


class TcpForwardFactory(protocol.Factory):
    """
    Listen side of a forward (``peer connect --forward-tcp``): each TCP
    connection accepted becomes a stream to C{service} of the peer that
    C{streams} (a L{PathStreams}) leads to, spliced both ways.

    @param events: called as C{events(name, **fields)} for
        ``stream-opened``, ``stream-closed`` (with bytes sent and received,
        and an error if it ended by one) and ``stream-failed``.
    """

    def __init__(self, streams, service, events=_no_events):
        self.streams = streams
        self.service = service
        self.events = events

    def buildProtocol(self, addr):
        splice = _Splice(self.events, self.streams.peer, self.service, "out")
        tcp = splice.tcp
        tcp.connectionMade = lambda: self._open(splice)
        return tcp

    def _open(self, splice):
        try:
            self.streams.open_stream(self.service, splice.stream)
        except ConnectionError as e:
            return splice.fail(str(e))
        splice.opened()
        splice.join()


class TcpServiceFactory(protocol.Factory):
    """
    Accepting side (``peer wait --service NAME=HOST:PORT``): each stream
    for the service is connected to the TCP address C{(host, port)}; the
    stream waits (paused: QUIC's flow control holds the peer) until the
    TCP connection is made, and is reset if it cannot be.

    @param events: as for L{TcpForwardFactory}.
    """

    def __init__(self, reactor, service, host, port, events=_no_events):
        self.reactor = reactor
        self.service = service
        self.target = (host, port)
        self.events = events

    def buildProtocol(self, addr):
        splice = _Splice(self.events, addr.peer, self.service, "in")
        stream = splice.stream
        stream.connectionMade = lambda: self._connect(splice)
        return stream

    def _connect(self, splice):
        splice.stream.transport.pauseProducing()
        splice.opened()
        endpoint = endpoints.HostnameEndpoint(self.reactor, *self.target)
        d = endpoint.connect(OneShotFactory(splice.tcp))

        def connected(_):
            if splice.stream.closed:
                splice.tcp.transport.loseConnection()
                return
            splice.join()
            splice.stream.transport.resumeProducing()

        def failed(reason):
            splice.fail(f"cannot connect to {self.target[0]}:{self.target[1]}:"
                        f" {reason.getErrorMessage()}")

        d.addCallbacks(connected, failed)


__all__ = ["CLEAR_HELLO", "ClearDatagrams", "DatagramQueue", "FRAGMENT", "HandshakeFailed",
           "MAX_DATAGRAM", "PathStreams", "Reassembly", "StreamsUnavailable", "TcpForwardFactory",
           "TcpServiceFactory", "accept_streams", "connect_streams", "fragments"]
