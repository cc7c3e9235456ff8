# -*- test-case-name: tests.unit.test_peer_path,tests.unit.test_peer_health,tests.lab.test_p2p_lab -*-
"""
A path between two peers, for applications: send and receive datagrams,
direct when a punch succeeded, relayed by the lobby otherwise, upgraded
from relayed to direct when a later punch succeeds.
"""

from p2pnat.daemon.logs import Logger
from p2pnat.peer.health import PathHealth
from p2pnat.peer.punch import CAUGHT_MAX_BYTES, CAUGHT_PER_ADDRESS
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire


class Path:
    """
    One peer-to-peer path.

    @ivar mode: ``"direct"``, ``"relayed"`` or ``"closed"``.
    @ivar on_datagram: called with each payload received; payloads that
        arrive before it is set (the peer may send the moment its side is
        up) are kept, up to L{BACKLOG}, and handed over when it is.
    @ivar on_mode: called with the new mode when it changes (``direct``
        after an upgrade, ``closed``).
    @ivar route_changed: called (no arguments) after the sockets or
        addresses the path runs on changed, closing included: the QUIC
        layer over the path (L{p2pnat.peer.streams}) follows them.
    @ivar on_event: called as C{on_event(name, fields)} on liveness events:
        ``"path-silent"`` (the peer was not heard for C{dead_after}: the
        route is dead, a recovery starts) and ``"path-back"`` (the peer is
        heard again on the route that was silent).  C{fields} carries
        ``mode``, ``keepalive`` (the interval now) and ``silence``.
    @ivar health: the L{PathHealth} of the route in use: liveness and the
        keepalive interval learnt.
    @ivar channel: what carries the application's datagrams when not None
        (L{p2pnat.peer.streams}: QUIC DATAGRAM frames, end to end
        encrypted): L{send} hands them to its C{send_datagram}, and the
        peer's L{M.Data} payloads go to its C{clear_received}.  None: they
        travel in the path's own frames, MAC'd with the session key the
        lobby made (so the lobby could read or forge them).
    @ivar early_dial: the QUIC connection the punch that made the path
        began (L{p2pnat.peer.streams.EarlyDial}), for
        L{p2pnat.peer.streams.connect_streams} to carry on with; None.
    @ivar early_quic: the QUIC datagrams C{(socket, data, addr)} the punch
        kept for the path's QUIC layer (L{p2pnat.peer.punch.Punch.caught}).
    """

    log = Logger(namespace="p2pnat.path")

    #: The starting keepalive interval (seconds), until one is learnt.
    KEEPALIVE = 15.0

    def __init__(self, client, peer, keepalive=KEEPALIVE, dead_after=None):
        self.client = client
        self.clock = client.clock
        self.peer = peer
        self.mode = "connecting"
        self.health = PathHealth(self.clock, keepalive, dead_after)
        self.on_event = lambda name, fields: None
        self._watchdog = None
        self._on_datagram = None
        self._backlog = []
        self.on_mode = lambda mode: None
        self.route_changed = lambda: None
        self._channel = None
        self.early_dial = None
        self.early_quic = []
        self.direct = None  # (proto, addr, session)
        #: Sockets of the other address family that the peer may send on
        #: (see L{use_direct}).
        self.standby = []
        self.relayed = None  # (proto, lobby addr, session)
        self._keepalive = None
        self.received = 0
        self.sent = 0
        self.strategy = None  # how the path was made, for reports
        #: Which candidate the direct path runs on: ``"observed"`` (the
        #: plan's), ``"mapped"`` (our port mapping), ``"peer-mapped"`` (the
        #: peer's), ``"ipv6"``; None while relayed.
        self.candidate = None
        self.probes = 0
        self.rounds = 0

    BACKLOG = 64

    @property
    def keepalive_interval(self):
        """Seconds between keepalives now (learnt: see L{PathHealth})."""
        return self.health.interval

    @property
    def on_datagram(self):
        return self._on_datagram

    @on_datagram.setter
    def on_datagram(self, callback):
        self._on_datagram = callback
        backlog, self._backlog = self._backlog, []
        for payload, _ in backlog:
            callback(payload)

    @property
    def channel(self):
        return self._channel

    @channel.setter
    def channel(self, channel):
        old, self._channel = self._channel, channel
        if channel is not None and old is None:
            # What came in the path's own frames before the channel (the
            # peer's first QUIC fragments, say) is the channel's to read.
            early = [payload for payload, clear in self._backlog if clear]
            self._backlog = [entry for entry in self._backlog if not entry[1]]
            for payload in early:
                channel.clear_received(payload)

    def deliver(self, payload):
        """Hand a received payload to the application (or keep it until there is one)."""
        if self._on_datagram is not None:
            self._on_datagram(payload)
        elif len(self._backlog) < self.BACKLOG:
            self._backlog.append((payload, self._channel is None))

    # -- set up by the client -----------------------------------------------------

    def use_direct(self, proto, addr, session, standby=()):
        """
        Send on C{proto} to C{addr} from now on.  The peer's traffic is also
        taken on the C{standby} sockets (of the other address family), in
        case the peer settled on that family; IPv6 traffic there moves the
        path to it (L{_received}).
        """
        old, self.direct = self.direct, (proto, addr, session)
        old_standby, self.standby = self.standby, list(standby)
        for p in [proto] + self.standby:
            p.handler = _PathHandler(self, session)
        keep = [proto] + self.standby
        for p in ([old[0]] if old is not None else []) + old_standby:
            if p.transport is not None and not any(p is k for k in keep):
                p.transport.stopListening()
        self._set_mode("direct")
        self._new_route()
        self.route_changed()

    def use_relay(self, proto, lobby_addr, session):
        old, self.relayed = self.relayed, (proto, lobby_addr, session)
        proto.handler = _PathHandler(self, session)
        if old is not None and old[0] is not proto and old[0].transport is not None and (
                self.direct is None or self.direct[0] is not old[0]):
            old[0].transport.stopListening()  # the relay of a session the peer left
        if self.direct is not None and self.direct[2] is not session:
            # The peer connected afresh (it restarted, or our path to it went
            # stale): the old direct route leads nowhere any more.
            old, self.direct = self.direct, None
            standby, self.standby = self.standby, []
            for p in [old[0]] + standby:
                if p is not proto and p.transport is not None:
                    p.transport.stopListening()
        if self.direct is None:
            self._set_mode("relayed")
            self._new_route()
        self.route_changed()

    def _set_mode(self, mode):
        if mode != self.mode:
            self.log.info("path to {peer}: {mode}", peer=self.peer, mode=mode)
            self.mode = mode
            self.on_mode(mode)

    # -- for applications -----------------------------------------------------------

    def send(self, payload):
        """
        Send one datagram to the peer: on the L{channel} if there is one,
        else in the clear (L{send_clear}).

        @raise ValueError: too large for the way it goes (the message says
            the limit).
        @raise ConnectionError: the path is closed.
        """
        if self.mode == "closed":
            raise ConnectionError("path closed")
        if self.channel is not None:
            self.channel.send_datagram(payload)
        else:
            self.send_clear(payload)
        self.sent += 1

    def send_clear(self, payload):
        """
        Send one datagram (at most L{M.MAX_PAYLOAD} bytes) in the path's own
        frames: authenticated with the lobby's session key, not encrypted.
        """
        if len(payload) > M.MAX_PAYLOAD:
            raise ValueError(f"datagram of {len(payload)} bytes: the path's own frames carry"
                             f" at most {M.MAX_PAYLOAD}")
        self._send(M.Data(payload))

    def _send(self, message):
        route = self.direct or self.relayed
        if route is None or self.mode == "closed":
            raise ConnectionError("path closed")
        proto, addr, session = route
        data = wire.seal(message, session.my_key_id, session.key, session.stamper())
        proto.send(data, addr, type(message).__name__)

    def _send_to(self, proto, addr, message):
        session = self.direct[2] if self.direct else self.relayed[2]
        data = wire.seal(message, session.my_key_id, session.key, session.stamper())
        proto.send(data, addr, type(message).__name__)

    def close(self):
        """Tell the peer, stop timers, release the sockets."""
        if self.mode == "closed":
            return
        try:
            self._send(M.PathClose())
        except (ConnectionError, OSError):
            pass
        self._closed()

    def _closed(self):
        for call in (self._keepalive, self._watchdog):
            if call is not None and call.active():
                call.cancel()
        protos = [route[0] for route in (self.direct, self.relayed) if route is not None]
        for proto in {id(p): p for p in protos + self.standby}.values():
            if proto.transport is not None:
                proto.transport.stopListening()
        self.standby = []
        self.client.path_closed(self)
        self._set_mode("closed")
        self.route_changed()

    def _new_route(self):
        """The path runs on a new route: its silence and keepalives start now."""
        self.health.reset()
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        self._keepalive = None
        self._schedule_keepalive()
        self._schedule_watchdog()

    def _schedule_keepalive(self):
        if self._keepalive is not None and self._keepalive.active():
            return
        self._keepalive = self.clock.callLater(self.keepalive_interval, self._tick)

    def _schedule_watchdog(self):
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        # Once silent, look again a dead_after later: a recovery that
        # failed leaves the path silent, and that asks for another.
        delay = self.health.next_check() or self.health.dead_after
        self._watchdog = self.clock.callLater(delay, self._watch)

    def _watch(self):
        self._watchdog = None
        if self.mode == "closed":
            return
        try:
            if self.health.check() or (self.health.state == "silent"
                                        and self.health.silence() >= 2 * self.health.dead_after):
                self._silent()
        except Exception:
            self.log.failure("path liveness check failed")
        self._schedule_watchdog()

    def _silent(self):
        self.log.info("path to {peer} silent for {silence:.1f}s ({mode}): recovering;"
                      " keepalive now {keepalive:g}s", peer=self.peer, mode=self.mode,
                      silence=self.health.silence(), keepalive=self.health.interval)
        self._event("path-silent", self.health.silence())
        self._restart_keepalive()
        self.client.path_silent(self)

    def _restart_keepalive(self):
        """A shorter interval counts from now."""
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
            self._keepalive = None
            self._schedule_keepalive()

    def shorten_keepalive(self):
        """
        The NAT dropped a mapping of ours within the keepalive interval
        (the client saw it on its lobby socket, see
        L{p2pnat.peer.health.MappingWatch}): halve this path's interval, not
        below the floor, counting from now.

        @return: the interval now (seconds).
        """
        if self.health.shorten():
            self._restart_keepalive()
        return self.health.interval

    def _event(self, name, silence):
        self.on_event(name, {"mode": self.mode, "keepalive": self.health.interval,
                             "silence": round(silence, 3)})

    def heard(self):
        """
        A sign of the peer on the route in use: its path traffic, or what
        the path's QUIC connection authenticated (its channel's
        C{on_heard}).
        """
        silence = self.health.silence()
        if self.health.heard():
            self.log.info("path to {peer} back after {silence:.1f}s of silence",
                          peer=self.peer, silence=silence)
            self._event("path-back", silence)

    def _tick(self):
        self._keepalive = None
        if self.mode == "closed":
            return
        try:
            # An encrypted channel sends it as a QUIC PING (one keepalive
            # for the NATs and for QUIC's idle timer, not two).
            keepalive = getattr(self.channel, "keepalive", None)
            if keepalive is None or not keepalive():
                self._send(M.PathKeepalive())
        except Exception:
            self.log.failure("path keepalive failed")
        self._schedule_keepalive()

    # -- from the sockets --------------------------------------------------------------

    def _received(self, message, proto, addr):
        if isinstance(message, (M.Data, M.PathKeepalive)):
            # Only the peer's path traffic: a late probe or ack of the
            # punch says nothing about the route in use.
            self.heard()
        if (self.direct is not None and ":" in addr[0] and ":" not in self.direct[1][0]
                and any(proto is p for p in self.standby)):
            # The peer reached us over IPv6 (authenticated): it settled on the
            # preferred family where we took IPv4; follow it there.
            self.log.info("path to {peer}: now over IPv6", peer=self.peer)
            self.standby = [p for p in self.standby if p is not proto] + [self.direct[0]]
            self.direct = (proto, addr, self.direct[2])
            self.candidate = "ipv6"
            self.route_changed()
        if (isinstance(message, (M.Data, M.PathKeepalive)) and self.direct is not None
                and proto is self.direct[0] and addr != self.direct[1]):
            # The peer's NAT gave its path socket a new mapping: follow it
            # (authenticated), before the payload is delivered, so that an
            # answer sent at once goes there.  Only on path traffic: a probe
            # may come from another of the peer's punch sockets, closed since
            # (it answered its first success), and following that lost the
            # replies (NAT lab, birthday punches).
            self.direct = (proto, addr, self.direct[2])
        if isinstance(message, M.Data):
            self.received += 1
            if self.mode == "closed":
                # Read from a socket not yet released after the close (the
                # reactor lets go of it an iteration later): the application
                # was told the path closed, and its channel is gone.
                pass
            elif self.channel is not None:
                self.channel.clear_received(message.payload)
            else:
                self.deliver(message.payload)
        elif isinstance(message, M.PathClose):
            self.log.info("path to {peer} closed by the peer", peer=self.peer)
            self._closed()
        elif isinstance(message, M.Probe):
            # The peer is still punching (it did not see our ack): answer.
            self._send_to(proto, addr, M.ProbeAck(message.round, message.index, addr))
        return None


class _PathHandler:
    """ControlProtocol handler of a path's socket: only the peer's traffic."""

    _TYPES = frozenset({M.Data.TYPE, M.PathKeepalive.TYPE, M.PathClose.TYPE, M.Probe.TYPE,
                        M.ProbeAck.TYPE, M.RelayBound.TYPE})

    def __init__(self, path, session):
        self.path = path
        self.session = session

    def key_for(self, key_id, mtype):
        if mtype == M.RelayBound.TYPE:
            # The lobby answers a RelayBind under the key it was sent with.
            return self.session.key if key_id == self.session.my_key_id else None
        if mtype in self._TYPES and key_id == self.session.peer_key_id:
            return self.session.key
        return None

    def handle(self, frame, message, addr, proto):
        if isinstance(message, M.RelayBound):
            return None
        return self.path._received(message, proto, addr)

    def quic_datagram(self, data, addr, proto):
        """
        The peer's QUIC datagrams before the path has its QUIC layer (the
        application opens it a moment after the path came up): kept for
        it, within the punch's bounds for one address (those it kept
        count: see L{p2pnat.peer.punch.EarlyQuic}).
        """
        path = self.path
        direct = path.direct
        if path.channel is not None or direct is None or direct[0] is not proto \
                or tuple(direct[1]) != tuple(addr) or len(data) > CAUGHT_MAX_BYTES \
                or len(path.early_quic) >= CAUGHT_PER_ADDRESS:
            return False
        path.early_quic.append((proto, data, addr))
        return True
