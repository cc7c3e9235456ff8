# -*- test-case-name: tests.unit.test_peer_client,tests.lab.test_p2p_lab -*-
"""
The P2P client library: log in to the lobby, keep presence, accept or
refuse introductions, and connect to a peer through the exchange of
the P2P path, ending with a L{Path} (direct, or relayed by the lobby and
upgraded when a later punch succeeds).

    client = LobbyClient("alice", key, ("198.18.1.1", 3478), reactor, nat=behaviour,
                         ipv6="auto", portmap=True)
    yield client.start()
    path = yield client.connect("bob")
    path.on_datagram = print
    path.send(b"hello")
"""

import math
import os
import struct
import weakref

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from p2pnat.daemon.logs import Logger
from p2pnat.daemon.metrics import Metrics
from p2pnat.net.sources import is_loopback
from p2pnat.peer.health import FLOOR, MappingWatch
from p2pnat.peer.path import Path
from p2pnat.peer.punch import Punch, PunchFailed, new_socket
from p2pnat.peer.rtt import RttEstimator
from p2pnat.peer.sockets import SharedSocket
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from p2pnat.protocol.strategy import actions_for, relay_first, with_candidates


def needs_mapping(nat):
    """
    Whether only a port mapping makes a direct path likely behind C{nat}
    (an L{M.NatInfo}): a new port per destination that cannot be predicted
    (random allocation), or a NAT not known.  Mirrors the planner's "hard"
    side.
    """
    if nat.mapping in ("none", "endpoint-independent"):
        return False
    return not (nat.allocation == "preserving" or (nat.allocation == "sequential" and nat.step))


class Refused(Exception):
    """The lobby or the peer refused the connection."""


class Session:
    """A session the lobby introduced: its ID, key and our role in it."""

    def __init__(self, client, session_id, key, role, peer):
        self.client = client
        self.id = session_id
        self.key = key
        self.role = role
        self.peer = peer
        self.my_key_id = M.session_key_id(session_id, role)
        self.peer_key_id = M.session_key_id(session_id, "b" if role == "a" else "a")
        self.stamper = wire.Stamper(client.clock, client.stamper.offset)
        self.early = []  # payloads that arrived during the punch
        self._rounds = 0

    def next_round(self):
        self._rounds += 1
        return self._rounds


class LobbyClient:
    """
    @param lobby: the lobby's (ip, port).
    @param reactor: provides C{IReactorUDP} (every socket of the client is
        opened with its C{listenUDP}) and C{IReactorTime} (every timer).
    @param nat: this host's L{M.NatInfo} (from discovery); unknown if None.
    @param accept: C{accept(peer_id) -> bool}, asked for each introduction.
    @param on_path: called with each L{Path} another peer opened to us.
    @param ipv6: a second, IPv6 socket for direct IPv6 paths: None (none),
        ``"auto"`` (bound to this host's global IPv6 address, if it has
        one: L{p2pnat.peer.discovery.global_ipv6}) or the address to bind.
        Its address is offered to peers as a candidate.
    @param mapping_lifetime: this NAT's UDP mapping lifetime (seconds) if
        it was measured (L{p2pnat.peer.netcheck}): every path's keepalive
        interval starts below it.
    @param portmap: ask the gateway to map a port to a socket of ours:
        None or False (do not), True (with L{p2pnat.portmap.PortMapper}),
        or C{portmap(reactor, internal_port) -> mapper} with that API (a
        service with C{map()}, C{current}, C{subscribe}).  A granted
        mapping is offered to peers as a candidate.
    @param discovery: the L{p2pnat.peer.discovery.NatCache} that keeps
        this host's NAT: L{start} asks it (at once if it knows, else a
        fast run alongside the login) and has it refresh in the
        background, and C{nat} follows it.  None: the process's cache for
        this lobby and interface if NAT discovery ran from one
        (L{p2pnat.peer.discovery.nat_cache}) and C{nat} is what it found
        (or not given); else C{nat} stays as given.
    @param nat_hint: the L{M.NatInfo} an earlier process measured (or
        None): a connect request made before this process's discovery
        answered carries it instead of waiting for it, and is made again
        if discovery finds a NAT that plans otherwise (L{connect}).
    @param lobby_candidates: whether an earlier process learnt that the
        lobby passes candidates on (what the lobby's Welcome says, once it
        comes).
    @param credentials: our L{p2pnat.quic.Credentials}, when the paths we
        ask for will carry QUIC (L{p2pnat.peer.streams.connect_streams}
        with the same credentials): the handshake then begins with the
        punch (L{p2pnat.peer.streams.EarlyDial}).  None: it begins once
        the path is up.
    @ivar rtt: the round trip to the lobby (L{p2pnat.peer.rtt.RttEstimator},
        the cache's when there is one), measured on the login's and the
        keepalives' exchanges; login and connect requests are retransmitted
        after a few of its RTOs, and punch rounds last a few, the old
        fixed times being the caps (and the times before a sample).
    @ivar on_event: called as C{on_event(name, fields)} on the client's own
        events: ``"keepalive"`` when the lobby saw us at a new address
        between two keepalives (the NAT dropped the mapping within the
        interval) and the intervals were halved; C{fields} carries
        ``interval`` (the presence keepalive now), ``path`` (the paths'
        keepalive now), ``was`` and ``why``.
    """

    #: The first login retry's wait (seconds) before the RTT is known,
    #: doubled at each retry up to 10 s; once known, two RTOs (a Ping and
    #: its Pong, the Login and its Welcome; at least LOGIN_FLOOR) doubled
    #: alike, the old figure being the cap.
    LOGIN_RETRY = 0.5
    LOGIN_FLOOR = 0.1

    #: Seconds after the login before the port mapping attempt starts
    #: behind a NAT that does not need one (L{start}): a connect made at
    #: once (a few round trips) runs first.
    MAPPING_DELAY = 1.0

    log = Logger(namespace="p2pnat.client")

    #: Introductions remembered, to answer the lobby's retransmitted Invite
    #: with the same answer; the oldest are forgotten first.
    MAX_INVITES = 256

    _FROM_LOBBY = frozenset({M.Welcome.TYPE, M.Invite.TYPE, M.Introduce.TYPE, M.AnswerAck.TYPE,
                             M.Refusal.TYPE, wire.Pong.TYPE})

    def __init__(self, client_id, key, lobby, reactor, *, interface=None, nat=None,
                 accept=None, on_path=None, punch_deadline=None, connect_timeout=12.0,
                 upgrade_interval=20.0, low_ttl=0, ipv6=None, portmap=None,
                 mapping_lifetime=None, discovery=None, nat_hint=None, lobby_candidates=False,
                 credentials=None):
        self.id = client_id
        self.key = key
        self.lobby = lobby
        self.reactor = self.clock = reactor
        if not interface:
            from p2pnat.peer.discovery import source_address

            interface = source_address(lobby)
        self.interface = interface
        self.low_ttl = low_ttl
        self.nat = nat or M.NatInfo()
        if discovery is None:
            from p2pnat.peer.discovery import cached_for

            discovery = cached_for(reactor, lobby, interface)
            if discovery is not None and nat is not None and nat != discovery.current:
                discovery = None  # the NAT was given, not measured there: keep it
        self.discovery = discovery
        self.rtt = discovery.rtt if discovery is not None else RttEstimator(reactor)
        self.accept = accept or (lambda peer: True)
        self.on_path = on_path or (lambda path: None)
        self.punch_deadline = punch_deadline
        self.connect_timeout = connect_timeout
        self.upgrade_interval = upgrade_interval
        self.mapping_lifetime = mapping_lifetime
        self._recovering = weakref.WeakSet()  # paths with a recovery attempt under way
        self.metrics = Metrics("client")
        self.stamper = wire.Stamper(reactor)
        self.replay = wire.ReplayGuard(self.stamper)
        self.public = None  # our address as the lobby sees it
        self.keepalive = 20
        #: The presence keepalive, as the lobby asks and as learnt from the NAT.
        self.watch = MappingWatch(self.keepalive)
        #: The paths' keepalive interval learnt from the NAT (None: not yet).
        self.path_keepalive = None
        self.on_event = lambda name, fields: None
        self.paths = {}  # peer -> Path
        self._logged_in = defer.Deferred()
        self._pings = {}  # clock probe stamp -> local send time
        self._login_sent = {}  # Login or Keepalive stamp -> local send time
        self._login_call = None
        self._mapping_call = None
        self._login_retry = self._login_tried = self.LOGIN_RETRY
        self._welcomed = None  # when the lobby last welcomed us
        self._keepalive_loop = None
        self._requests = {}  # request id -> handler of lobby answers
        self._invites = {}  # (peer, request id) -> our answer, the latest MAX_INVITES
        self._binds = set()  # relay binds in progress
        self._upgrades = set()  # timers of upgrade attempts
        self._announced = weakref.WeakSet()  # paths given to on_path
        self.proto = None
        self.ipv6 = ipv6
        self.portmap = portmap
        #: The long-lived sockets whose addresses are candidates, by name
        #: (``"ipv6"``, ``"mapped"``), once open.
        self.shared = {}
        self.mapper = None
        #: The lobby passes candidates on (it said so in its Welcome; until
        #: then, what an earlier process learnt, if given).
        self.lobby_candidates = bool(lobby_candidates)
        #: The NAT an earlier process measured (L{p2pnat.peer.discovery.NatStore}):
        #: what a connect request made before discovery answers carries.
        self.nat_hint = nat_hint if nat_hint is not None and nat_hint.mapping != "unknown" \
            else None
        self._attempts = set()  # connect attempts under way
        self._optimistic = None  # the stamp of the latest optimistic Login
        self.credentials = credentials

    # -- sockets --------------------------------------------------------------------

    def _listen(self, handler, interface=None):
        return new_socket(self.reactor, interface or self.interface, handler, self.clock,
                          self.metrics, self.replay)

    def _seal(self, message):
        return wire.seal(message, self.id, self.key, self.stamper())

    def _send_lobby(self, proto, message, stamp=None):
        """
        Send C{message} to the lobby; False if it could not be sent.  Every
        message says that we read candidate lists (L{M.FLAG_CANDIDATES}).
        """
        data = wire.seal(message, self.id, self.key, stamp or self.stamper(),
                         flags=M.FLAG_CANDIDATES)
        try:
            proto.send(data, self.lobby, type(message).__name__)
        except OSError as e:
            self.log.warn("cannot reach the lobby: {error}", error=e)
            return False
        return True

    def _local(self, proto):
        host = proto.transport.getHost()
        return (host.host if host.host not in ("0.0.0.0", "::") else "0.0.0.0", host.port)

    # -- login and presence ----------------------------------------------------------

    def start(self):
        """
        Log in, learn this host's NAT (from L{discovery}), and open the
        candidate sockets, all at once; the Deferred fires once the lobby
        welcomed us, the NAT is known, and, for a NAT behind which only a
        port mapping makes a direct path likely (a new unpredictable port
        per destination, or unknown: L{_needs_mapping}), the port mapping
        attempt ended (granted or not, within the mapper's budget).  For
        other NATs the attempt goes on in the background, and a mapping
        granted later is offered from then on.

        With L{discovery}, the attempt waits for the NAT: one that needs it
        starts it as soon as discovery answers (about one round trip);
        otherwise it starts L{MAPPING_DELAY} seconds after the login (the
        same for a NAT given that does not need it).  Either way the port
        mapping machinery (its import: 20 to 50 ms of CPU, its sockets)
        does not hold up the login's round trips, nor a connect made right
        after the login (its introduction, punch and QUIC handshake).
        """
        self.proto = self._listen(self)
        ready = [self._logged_in]
        found = None
        if self.discovery is not None:
            self.discovery.subscribe(self._nat_found)
            found = self.discovery.get().addCallback(self._nat_found)
            ready.append(found)
            self.discovery.start()
        self._login()
        self._open_ipv6()
        mapping = defer.Deferred()

        def mapped(_):
            return mapping if self._needs_mapping() else None

        done = defer.gatherResults(ready, consumeErrors=True).addCallback(mapped).addCallback(
            lambda _: self)

        def ask(result=None):
            self._mapping_call = None
            if self.proto is not None and self.proto.transport is not None:
                self._open_mapped().chainDeferred(mapping)
            return result

        def later(result):
            self._mapping_call = self.clock.callLater(self.MAPPING_DELAY, ask)
            return result

        def decide(result=None):
            if self._needs_mapping():
                ask()
            else:
                self._logged_in.addCallback(later)
            return result

        if found is None:
            decide()  # a NAT given
        else:
            found.addCallback(decide)
        return done

    def _nat_found(self, nat):
        if nat is not None and nat != self.nat:
            self.log.info("NAT: {mapping} mapping, {filtering} filtering, {allocation} ports",
                          mapping=nat.mapping, filtering=nat.filtering,
                          allocation=nat.allocation)
            self.nat = nat
            for attempt in list(self._attempts):
                attempt.nat_known(nat)

    def nat_for_request(self):
        """
        The NAT a connect request carries now: the measured one, else the
        hint an earlier process left (L{nat_hint}), else None while
        discovery may still tell it (the request waits).
        """
        if self.nat.mapping != "unknown":
            return self.nat
        if self.nat_hint is not None:
            return self.nat_hint
        return None if self.discovery is not None else self.nat

    def _needs_mapping(self):
        """Whether our NAT is one behind which only a port mapping makes a direct path likely."""
        return needs_mapping(self.nat)

    def _open_ipv6(self):
        if not self.ipv6:
            return
        address = self.ipv6
        if address == "auto":
            from p2pnat.peer.discovery import global_ipv6

            address = global_ipv6()
            if address is None:
                self.log.info("no global IPv6 address: no IPv6 candidate")
                return
        try:
            proto = self._listen(None, address)
        except OSError as e:
            self.log.warn("cannot open the IPv6 socket on {addr}: {error}", addr=address, error=e)
            return
        self.shared["ipv6"] = SharedSocket(
            proto, (address, proto.transport.getHost().port), "ipv6")
        self.log.info("IPv6 candidate {addr}",
                      addr=wire.format_addr(self.shared["ipv6"].address))

    def _open_mapped(self):
        """Open the socket to map, and ask for the mapping: a Deferred that never fails."""
        if not self.portmap:
            return defer.succeed(None)
        if is_loopback(self.interface):
            # A lobby on this machine: no gateway has anything to map for us,
            # and nothing should be sent off the machine asking.
            self.log.info("socket on loopback ({addr}): no port mapping asked",
                          addr=self.interface)
            return defer.succeed(None)
        factory = self.portmap
        if factory is True:
            try:
                from p2pnat.portmap import PortMapper
            except ImportError as e:
                self.log.warn("port mapping is not available: {error}", error=e)
                return defer.succeed(None)
            factory = PortMapper
        proto = self._listen(None)
        port = proto.transport.getHost().port
        self.shared["mapped"] = SharedSocket(proto, (self.interface, port), "mapped")
        try:
            self.mapper = factory(self.reactor, port)
            self.mapper.startService()
            d = self.mapper.map()
        except Exception:
            self.log.failure("port mapping failed")
            return defer.succeed(None)

        def mapped(mapping):
            if mapping is None:
                self.log.info("no port mapping granted")
            else:
                self.log.info("port mapping by {protocol}: {external} -> {port}",
                              protocol=mapping.protocol,
                              external=wire.format_addr(tuple(mapping.external)), port=port)

        def failed(failure):
            self.log.failure("port mapping failed", failure)

        return d.addCallbacks(mapped, failed)

    def candidates(self):
        """
        Our candidates for peers, as the lobby passes them: the port
        mapping's external address while one is granted, the IPv6
        socket's address.
        """
        found = []
        mapping = self.mapper.current if self.mapper is not None else None
        if mapping is not None and "mapped" in self.shared:
            found.append(tuple(mapping.external))
        if "ipv6" in self.shared:
            found.append(self.shared["ipv6"].address)
        return [c for c in found if M.valid_candidate(c)][:M.MAX_CANDIDATES]

    def _offered(self):
        """The candidates to put in a request: none for a lobby that cannot read them."""
        return tuple(self.candidates()) if self.lobby_candidates else ()

    def _login(self):
        """
        One login attempt (retried with backoff until a L{M.Welcome}).

        An optimistic L{M.Login} goes first, stamped on our best guess of
        the lobby's clock (ours, or the offset learnt before), and a clock
        probe, a L{wire.Ping}, right behind it.  The lobby checks the Login
        against replays like any ordinary frame: when the guess is within
        its window, its Welcome (answered before the Pong) logs us in after
        one round trip.  When the lobby dropped it (stale, or below a mark
        an earlier stamp of ours left), the Pong tells the lobby's clock
        and a Login stamped on it follows, as without the first one.  A
        guessed stamp the lobby may have accepted is never undercut by the
        later ones (L{wire.Stamper.sync}).
        """
        self._login_call = None
        if self.proto is not None and self.proto.transport is not None:
            self._optimistic = self._send_login()
        stamp = self.stamper.probe()
        self._remember(self._pings, stamp)
        if not self._send_lobby(self.proto, wire.Ping(), stamp):
            self.stamper.probe_unsent()
        self._login_tried = self._login_retry
        self._login_call = self.clock.callLater(self._login_wait(), self._login)
        self._login_retry = min(self._login_retry * 2, 10.0)

    def _login_wait(self):
        """
        This login attempt's wait for a Welcome: two RTOs (Ping and Pong,
        Login and Welcome), doubled as the attempts' fixed waits are.
        """
        return min(self._login_tried, self._login_tried / self.LOGIN_RETRY * self.rtt.scaled(
            2, self.LOGIN_FLOOR, self.LOGIN_RETRY))

    def _send_login(self):
        stamp = self.stamper()
        self._remember(self._login_sent, stamp)
        self._send_lobby(self.proto, M.Login(self._local(self.proto), self.nat), stamp)
        return stamp

    def _remember(self, sent, stamp):
        """Note when the request stamped C{stamp} left: its answer must echo it."""
        sent[stamp] = self.clock.seconds()
        while len(sent) > 8:
            del sent[next(iter(sent))]

    def _pong(self, m):
        sent = self._pings.pop(m.echo, None)
        if sent is None:
            return  # not the answer to a probe of ours still outstanding
        self._pings.clear()
        self.rtt.since(sent)  # each Ping has its own stamp: no ambiguity (Karn)
        self.stamper.sync(sent, self.clock.seconds(), m.server_time)
        if self._login_call is None:
            return  # logged in already (the optimistic Login's Welcome came first)
        self._send_login()
        if self._login_call.active():
            # The attempt's timer was set before this round trip measured the RTT.
            left = self._login_call.getTime() - self.clock.seconds()
            self._login_call.reset(min(left, self._login_wait()))

    def stop(self):
        """
        Log out, close every path and socket; a Deferred that fires once
        the port mapping (if any) is deleted.
        """
        for path in list(self.paths.values()):
            path.close()
        if self.proto is not None and self.proto.transport is not None:
            self._send_lobby(self.proto, M.Logout())
            self.proto.transport.stopListening()
        for call in (self._login_call, self._mapping_call):
            if call is not None and call.active():
                call.cancel()
        if self._keepalive_loop is not None and self._keepalive_loop.running:
            self._keepalive_loop.stop()
        for r in list(self._requests.values()):
            r.cancel()
        for bind in list(self._binds):
            bind.cancel()
        for call in list(self._upgrades):
            if call.active():
                call.cancel()
        self._upgrades.clear()
        for shared in self.shared.values():
            shared.close()
        if self.discovery is not None:
            self.discovery.unsubscribe(self._nat_found)
            self.discovery.stop()
        mapper, self.mapper = self.mapper, None
        if mapper is not None:
            return defer.maybeDeferred(mapper.stopService)
        return defer.succeed(None)

    def _keepalive(self):
        try:
            if (self._login_call is None
                    and self.clock.seconds() - self._welcomed > 2.5 * self.keepalive):
                # Two keepalives unanswered: the lobby may be refusing our
                # stamps (our clock drifted from the offset we learnt).
                # Probe its clock and log in again.
                self.log.info("no answer from the lobby; logging in again")
                self._login_retry = 0.5
                self._login()
                return  # the Login renews our presence
            stamp = self.stamper()
            self._remember(self._login_sent, stamp)
            self._send_lobby(self.proto, M.Keepalive(), stamp)
        except Exception:
            self.log.failure("keepalive failed")

    def lobby_key_for(self, key_id, mtype):
        if key_id == self.id and mtype in self._FROM_LOBBY:
            return self.key
        return None

    key_for = lobby_key_for

    def handle(self, frame, message, addr, proto):
        return self.lobby_message(frame, message, addr, proto)

    def lobby_message(self, frame, message, addr, proto):
        if addr != self.lobby:
            return None  # lobby messages come from the lobby only
        if isinstance(message, wire.Pong):
            self._pong(message)
        elif isinstance(message, M.Welcome):
            self._welcome(message, frame.flags)
        elif isinstance(message, M.Invite):
            self._invited(message, proto, frame.flags)
        elif isinstance(message, (M.Introduce, M.AnswerAck, M.Refusal)):
            if isinstance(message, M.Refusal) and message.request_id == 0:
                self.log.info("the lobby forgot us; logging in again")
                self._login_retry = 0.5
                if self._login_call is None:
                    self._login()
                return None
            handler = self._requests.get(message.request_id)
            if handler is not None:
                handler.lobby_answer(message, proto, frame.flags)
        return None

    def _welcome(self, m, flags=0):
        sent = self._login_sent.pop(m.echo, None)
        if sent is None:
            return  # not the answer to a request of ours still outstanding
        self._welcomed = self.clock.seconds()
        self.rtt.since(sent)
        first = not self._logged_in.called
        self.lobby_candidates = bool(flags & M.FLAG_CANDIDATES)
        self.stamper.sync(sent, self.clock.seconds(), m.server_time)
        if self.public is not None and self.public[0] != m.observed[0] and \
                self.discovery is not None:
            # Another public IP: another network or NAT, perhaps of another
            # kind.  (A new port alone is a dropped mapping: L{_mapping_dropped}.)
            self.discovery.refresh("the lobby sees us at another IP address")
        if self.public != m.observed:
            self.log.info("logged in to the lobby as {id}; public address {addr}", id=self.id,
                          addr=m.observed)
        self.public = m.observed
        if self._login_call is not None and self._login_call.active():
            self._login_call.cancel()
        self._login_call = None
        self._login_retry = 0.5
        self.watch.ask(m.keepalive)
        shorter = self.watch.answer(m.observed)
        if shorter is not None:
            self._mapping_dropped(shorter)
        if self.watch.interval != self.keepalive or self._keepalive_loop is None:
            self.keepalive = self.watch.interval
            if self._keepalive_loop is not None and self._keepalive_loop.running:
                self._keepalive_loop.stop()
            self._keepalive_loop = LoopingCall(self._keepalive)
            self._keepalive_loop.clock = self.clock
            self._keepalive_loop.start(self.keepalive, now=False)
        if first:
            self._logged_in.callback(self)
            for attempt in list(self._attempts):
                attempt.logged_in(optimistic=m.echo == self._optimistic)

    def _mapping_dropped(self, interval):
        """
        The lobby saw us at a new address: our NAT dropped the mapping
        within the presence keepalive (and the lobby could not reach us
        until the next one).  The presence keepalive is now C{interval};
        halve the paths' too, which run through the same NAT.  The lobby
        already follows the new address (every keepalive refreshes it).
        """
        was = self.keepalive
        self.path_keepalive = max(FLOOR, (self.path_keepalive or Path.KEEPALIVE) / 2)
        for path in list(self.paths.values()):
            if path.mode != "closed":
                path.shorten_keepalive()
        why = (f"the lobby saw us at a new address ({wire.format_addr(self.watch.last)}):"
               f" the NAT dropped the mapping within {was:g}s")
        self.log.info("keepalive now {interval:g}s, paths' {path:g}s: {why}", interval=interval,
                      path=self.path_keepalive, why=why)
        self.on_event("keepalive", {"interval": interval, "path": self.path_keepalive,
                                    "was": was, "why": why})

    # -- connecting (we are A) ---------------------------------------------------------

    def connect(self, peer, timeout=None):
        """
        Open a path to C{peer}.  Fires with a L{Path} (``direct`` or
        ``relayed``); fails with L{Refused}.

        It may be called right after L{start}, before the login is done:
        the connect request then goes right behind the Login (the lobby
        takes them in order), as soon as the NAT is known or hinted
        (L{nat_for_request}).  If the lobby had not taken the Login (lost,
        overtaken, or dropped as stale), the request is made again once
        logged in.
        """
        attempt = _Attempt(self, peer, timeout or self.connect_timeout)
        return attempt.start()

    def _register(self, request_id, handler):
        self._requests[request_id] = handler

    def _unregister(self, request_id):
        self._requests.pop(request_id, None)

    def new_request_id(self):
        rid = 0
        while rid == 0 or rid in self._requests:
            rid = struct.unpack("!Q", os.urandom(8))[0]
        return rid

    # -- being connected to (we are B) --------------------------------------------------

    def _invited(self, m, proto, flags=0):
        if (m.peer, m.request_id) in self._invites:
            # The lobby sent the invitation again: our answer was lost.
            self._invites[(m.peer, m.request_id)].resend()
            return
        accepted = bool(self.accept(m.peer))
        self.log.info("{peer} asks to connect: {verdict}", peer=m.peer,
                      verdict="accepted" if accepted else "refused")
        answer = _Answer(self, m, accepted, flags)
        self._invites[(m.peer, m.request_id)] = answer
        while len(self._invites) > self.MAX_INVITES:
            del self._invites[next(iter(self._invites))]
        answer.start()

    def path_closed(self, path):
        if self.paths.get(path.peer) is path:
            del self.paths[path.peer]

    def _path_for(self, peer):
        path = self.paths.get(peer)
        if path is None or path.mode == "closed":
            path = Path(self, peer)
            path.health.mapping_lifetime(self.mapping_lifetime)
            path.health.at_most(self.path_keepalive)
            self.paths[peer] = path
        return path

    # -- paths that went silent ---------------------------------------------------------

    def path_silent(self, path):
        """
        C{path} heard nothing from its peer for its C{dead_after}: connect
        afresh, relay first (traffic moves to the lobby's relay as soon as
        both sides are bound), then punch at once for a direct path again.

        Both ends see the silence; the side that made the path (role a)
        recovers at once, the other only if still silent after a second
        C{dead_after} (the first side's recovery did not reach it), so
        that the two do not race with two sessions.  The side invited
        while its own path is suspect binds the relay at once
        (L{_Answer}).
        """
        if self.paths.get(path.peer) is not path or path in self._recovering:
            return
        route = path.direct or path.relayed
        if route is None or self.proto is None:
            return
        if route[2].role != "a" and path.health.silence() < 2 * path.health.dead_after:
            self.log.info("path to {peer} silent; waiting for the peer to reconnect",
                          peer=path.peer)
            # Our NAT may have dropped its mappings (the path's and the
            # lobby's alike): a presence keepalive now tells the lobby where
            # we are, so the peer's recovery finds us without waiting for
            # the next one (up to a keepalive interval).
            self._keepalive()
            return
        self._recovering.add(path)
        if self.discovery is not None:
            self.discovery.refresh("a path went silent")  # the NAT may have changed
        attempt = _Attempt(self, path.peer, self.connect_timeout, relay_first=path)

        def done(result):
            self._recovering.discard(path)
            if isinstance(result, Path):
                self.log.info("path to {peer} recovered: {mode}", peer=path.peer,
                              mode=result.mode)
            else:
                self.log.info("path to {peer}: recovery failed ({why}); trying again later",
                              peer=path.peer, why=result.getErrorMessage())

        attempt.start().addBoth(done)


class _Side:
    """What A's attempt and B's answer share: punching, then relay fallback."""

    log = Logger(namespace="p2pnat.client")

    #: Where the session is relayed when not by our own lobby: the relay
    #: lobby node's address and our role's bind secret, from the
    #: introduction (L{_relay_of}).
    relay_at = None
    #: The QUIC connection the punch under way began (L{_early_dial}).
    dial = None

    def _punch(self, role, intro, offered, flags):
        """
        Run this side's punch against the peer of the introduction
        C{intro}: the plan's actions, and the candidates of both sides.
        C{offered} are the candidates we sent; the peer has them only if
        the lobby's C{flags} say it reads them.
        """
        c = self.client
        # The NAT our request or answer told the peer (a hint, when the
        # request went before discovery answered): both sides plan alike.
        our_nat = getattr(self, "sent_nat", None) or c.nat
        actions, plan, deadline = actions_for(role, our_nat, intro.nat, intro.observed,
                                              intro.local, c.public, c.low_ttl)
        theirs = [a for a in intro.candidates if M.valid_candidate(a)][:M.MAX_CANDIDATES]
        mine = offered if flags & M.FLAG_CANDIDATES else ()
        # Only candidates to try: they stay the same, so another round is no use.
        self.only_candidates = actions.idle
        actions, deadline = with_candidates(actions, deadline, mine, theirs)
        self.strategy = plan.strategy
        deadline = c.punch_deadline or deadline
        self.plan, self.round_seconds = plan, deadline
        self.translated = tuple(intro.observed) != tuple(intro.local)
        self.log.info("punching {peer} ({role}): {strategy}: {reason}; candidates: ours {mine},"
                      " theirs {theirs}", peer=self.session.peer, role=role,
                      strategy=plan.strategy, reason=plan.reason,
                      mine=[wire.format_addr(a) for a in mine],
                      theirs=[wire.format_addr(a) for a in theirs])
        if actions.idle:
            return defer.fail(PunchFailed(f"{plan.strategy}: {plan.reason}"))
        self.dial = self._early_dial(role, intro)
        self.punch = Punch(self.session, actions, self.fresh, c._listen, c.clock, deadline,
                           shared=c.shared, companion=self.dial)
        punched = self.punch.start()
        punched.addErrback(self._undial)
        return punched

    def _early_dial(self, role, intro):
        """
        The QUIC connection to begin with the punch (L{EarlyDial}): on the
        asking side of a new path, with credentials; else None.
        """
        c = self.client
        if role != "a" or c.credentials is None or getattr(self, "upgrade_of", None) is not None \
                or getattr(c.credentials, "identity", None) is None:
            return None
        from p2pnat.peer.streams import EarlyDial

        return EarlyDial(c.clock, c.credentials, self.session.peer, intro.observed,
                         rtt=c.rtt.least)

    def _undial(self, failure):
        """The punch failed: the connection it began goes with it."""
        if self.dial is not None:
            self.dial.discard("no direct path")
            self.dial = None
        return failure

    def _direct(self, result):
        proto, addr = result
        path = self.client._path_for(self.session.peer)
        standby = self.punch.standby if self.punch is not None else []
        path.use_direct(proto, addr, self.session, standby)
        path.strategy = self.strategy
        path.candidate = self.punch.won if self.punch is not None else None
        path.probes = self.punch.sent if self.punch is not None else 0
        for payload in self.session.early:
            path.deliver(payload)
        self.session.early = []
        if self.punch is not None and self.punch.caught:
            # The peer's first QUIC datagrams, kept while the punch ran:
            # read once the path's QUIC layer is there (now, if it is).
            path.early_quic.extend(self.punch.caught)
            replay = getattr(path.channel, "replay_early", None)
            if replay is not None:
                replay()
        if self.dial is not None:
            dial, self.dial = self.dial, None
            if path.early_dial is not None:
                path.early_dial.discard("replaced")
                path.early_dial = None
            if path.channel is None:
                path.early_dial = dial  # for connect_streams
            else:
                dial.discard("the path has its channel")  # a path upgraded or reused
        if self.fresh is not proto and self.fresh.transport is not None and (
                path.relayed is None or path.relayed[0] is not self.fresh) and not any(
                self.fresh is p for p in standby):
            self.fresh.transport.stopListening()  # the path does not use it
        return path

    #: Seconds a relay that became ready waits for the punch under way
    #: before this side uses it (see L{_Attempt.RELAY_GRACE}); none for
    #: the answering side, whose path carries the asker's first bytes.
    RELAY_GRACE = 0.0

    def _relay_first(self):
        """Why this side relays while it punches (L{relay_first}), or None."""
        if self.punch is None:
            return None  # nothing to punch: the plain relay fallback
        return relay_first(self.plan, translated=self.translated)

    def _alongside(self, punched, reason):
        """
        Bind the relay now, from the fresh socket the punch runs on, and
        let the punch go on: the lobby's frames on that socket (its
        RelayBound, the peer's relayed traffic) go to the relay, all
        others to the punch (L{_Split}).

        @param punched: the punch's Deferred (L{Punch.done}).
        @return: a Deferred that fires with the path as soon as one route
            is up: direct if the punch won, else relayed once the relay is
            ready and the punch had L{RELAY_GRACE}, upgraded in place to direct
            if the punch succeeds later.  It fails only when both failed.
        """
        c = self.client
        self.log.info("relaying to {peer} while punching ({strategy}): {why}",
                      peer=self.session.peer, strategy=self.strategy, why=reason)
        fresh = self.fresh
        bind = _RelayBind(c, self.session, fresh, f"relay first ({self.strategy})",
                          self.relay_at)
        split = _Split(bind.relay, bind, self.punch)
        out = defer.Deferred()
        started = c.clock.seconds()
        state = {"punch": None, "relayed": None, "grace": None, "unbound": None}

        def give(result):
            if state["grace"] is not None and state["grace"].active():
                state["grace"].cancel()
            if out.called:
                return
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

        def direct(result):
            state["punch"] = "won"
            bind.cancel()
            path = self._direct(result)
            relay = path.relayed[0] if path.relayed is not None else None
            if relay is fresh and path.direct[0] is not fresh:
                fresh.handler = split.relay  # the relayed route's own handler now
            give(path)

        def missed(failure):
            if not failure.check(PunchFailed):
                return failure
            state["punch"] = "missed"
            path = state["relayed"]
            if path is not None:
                fresh.handler = split.relay
                give(path)  # no need to wait out the grace
            elif not bind.done.called:
                fresh.handler = bind  # the lobby's RelayBound still to come
            else:
                give(state["unbound"])  # the relay failed first: its reason
            return None

        def relayed(path):
            if state["punch"] is not None:
                return give(path) if state["punch"] == "missed" else None
            # The punch goes on: its traffic still reaches it.
            state["relayed"] = path
            split.relay = fresh.handler
            fresh.handler = split
            wait = self.RELAY_GRACE - (c.clock.seconds() - started)
            if wait > 0:
                state["grace"] = c.clock.callLater(wait, give, path)
            else:
                give(path)

        def unbound(failure):
            state["unbound"] = failure
            if state["punch"] == "missed":
                give(failure)
            return None  # otherwise the punch decides

        bind.start().addCallbacks(relayed, unbound)
        fresh.handler = split
        def broken(failure):
            self.log.failure("relaying while punching failed", failure)
            give(failure)

        punched.addCallbacks(direct, missed)
        punched.addErrback(broken)
        return out

    def _relay(self, failure):
        failure.trap(PunchFailed)
        if not self.strategy.startswith("relay"):
            self.strategy = f"relay (after {self.strategy})"
        self.log.info("no direct path to {peer} ({why}); relaying through the lobby",
                      peer=self.session.peer, why=failure.getErrorMessage())
        return _RelayBind(self.client, self.session, self.fresh, self.strategy,
                          self.relay_at).start()


def _relay_of(client, intro):
    """
    C{(address, bind secret)} of the lobby node that relays the session of
    the Invite or Introduce C{intro}, when it names one (a lobby cluster:
    not our own node); else None.
    """
    if intro.relay is None:
        return None
    return intro.relay, M.open_bind_secret(client.key, intro.session_id, intro.sealed_secret)


class _Attempt(_Side):
    """
    A's side of one connect: rounds of (a request from a fresh port, the
    lobby's introduction, the punch) until a direct path, or until the
    time left is only enough for the relay.  Each round starts from fresh
    observations, as the seed repeats its steps 4-5.
    """

    #: Seconds kept at the end for the relay fallback.
    RELAY_RESERVE = 3.0

    #: A connect request unanswered after this many RTOs to the lobby (at
    #: least REQUEST_FLOOR seconds), times the tries so far, is sent again:
    #: its answer takes two round trips through the lobby (to the peer
    #: and back) and the peer's own work.  The old fixed wait
    #: (``min(0.5 * tries, 2.0)``) is the cap.
    REQUEST_RTOS = 3.0
    REQUEST_FLOOR = 0.15

    #: Seconds from a silent path's recovery over the relay to its punch.
    RECOVERY_UPGRADE = 0.5

    #: The asker's relay, ready first, is used only once the punch had this
    #: long: a LAN's local probes answer within it, also from a busy host,
    #: and that path is direct from its first byte.  It delays no byte:
    #: the answering side, bound first, learns that the relay is ready only
    #: at its next bind (L{_RelayBind}, every 0.25 s), and keeps what was
    #: relayed to it until then; bound second, the asker learns it at its
    #: own next bind, after the grace.
    RELAY_GRACE = 0.2

    def __init__(self, client, peer, timeout, path=None, relay_first=None):
        self.client = client
        self.peer = peer
        self.timeout = timeout
        self.upgrade_of = path
        #: The silent L{Path} this attempt recovers: relay at once, no punch.
        self.relay_first = relay_first
        self.result = defer.Deferred()
        self.rounds = 0
        self.probes = 0
        self._call = None
        self.session = None
        self.punch = None
        self.fresh = None
        self.request_id = None
        self.offered = ()
        #: The NAT the latest request carried (None: not sent yet).
        self.sent_nat = None
        self._nat_wait = None
        self._nat_runs = 0
        self._fallback_nat = None
        self._await_login = False  # refused as not logged in: again once we are
        self._sent_at = None  # when the latest request left
        self._refused_login = False

    def start(self):
        c = self.client
        c._attempts.add(self)
        self.started = c.clock.seconds()
        self._deadline = c.clock.callLater(self.timeout, self._expired)
        self._round()
        return self.result

    def _round(self):
        c = self.client
        if self.request_id is not None:
            c._unregister(self.request_id)
        self.rounds += 1
        self.session = self.punch = None
        self.request_id = c.new_request_id()
        self.fresh = c._listen(c)
        self._tries = 0
        self.sent_nat = None
        self.offered = c._offered()
        c._register(self.request_id, self)
        self._request()

    def _request(self):
        self._call = None
        if self.fresh.transport is None:
            return
        c = self.client
        nat = c.nat_for_request() or self._fallback_nat
        if nat is None:
            return self._wait_for_nat()
        self.sent_nat = nat
        self._tries += 1
        c._send_lobby(self.fresh, M.ConnectRequest(self.request_id, self.peer,
                                                   c._local(self.fresh), nat,
                                                   candidates=self.offered))
        self._sent_at = c.clock.seconds()
        self._call = c.clock.callLater(self._request_wait(), self._request)

    def _request_wait(self):
        """This try's wait for an answer: a few RTOs times the tries, the old fixed wait the cap."""
        return min(0.5 * self._tries, 2.0, self._tries * self.client.rtt.scaled(
            self.REQUEST_RTOS, self.REQUEST_FLOOR, 0.5))

    def _wait_for_nat(self):
        """
        Neither measured nor hinted: the request waits for discovery, and
        for a second run if the first got no answer (the lobby was not up
        yet, say); then it goes with what is known.
        """
        if self._nat_wait is not None:
            return
        c = self.client
        self._nat_runs += 1
        self._nat_wait = c.discovery.get()

        def known(nat):
            self._nat_wait = None
            if self.result.called or self.sent_nat is not None:
                return
            if c.nat.mapping == "unknown":
                if self._nat_runs < 2:
                    return self._wait_for_nat()
                self._fallback_nat = c.nat
            self._request()

        self._nat_wait.addCallback(known)

    def nat_known(self, nat):
        """
        Discovery told the NAT: a request made on a hint that plans
        otherwise (another mapping, allocation, step or filtering) is made
        again, in a new round from a new fresh socket.
        """
        sent = self.sent_nat
        if sent is None or self.session is not None or self.result.called:
            return
        same = (sent.mapping, sent.allocation, sent.step) == (nat.mapping, nat.allocation,
                                                              nat.step)
        if same and nat.filtering in ("unknown", sent.filtering):
            return
        self.log.info("the NAT hint was wrong ({hint}, measured {nat}): asking for {peer}"
                      " again", hint=sent, nat=nat, peer=self.peer)
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.fresh.transport is not None:
            self.fresh.transport.stopListening()
        self._round()

    def logged_in(self, optimistic):
        """
        The lobby welcomed our first Login.  A request sent before it goes
        again at once when the lobby refused it as not logged in, or when
        the Login welcomed is not the optimistic one that went before it
        (the request, on the same guessed clock, was dropped with it).
        """
        if self.session is not None or self.result.called or self.sent_nat is None:
            return
        if optimistic and not self._await_login:
            if self._call is not None and self._call.active():
                # Sent before any round trip was measured: its timer was the
                # old fixed wait; the login just measured the RTT.
                self._call.reset(max(0.0, min(self._call.getTime() - self.client.clock.seconds(),
                                              self._sent_at + self._request_wait()
                                              - self.client.clock.seconds())))
            return
        self._await_login = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._request()

    def lobby_answer(self, m, proto, flags=0):
        if self.session is not None or self.result.called or proto is not self.fresh:
            return
        if self._call is not None and self._call.active():
            self._call.cancel()
        if isinstance(m, M.Refusal):
            c = self.client
            if m.code == M.NOT_LOGGED_IN and not self._refused_login:
                # Not logged in: a request that overtook our Login, or was
                # made before it was taken.  Once more when we are.
                self._refused_login = True
                if c._logged_in.called:
                    self._request()
                else:
                    self._await_login = True
                return None
            return self._fail(Refused(M.REFUSALS.get(m.code, f"code {m.code}")))
        if not isinstance(m, M.Introduce):
            return
        if not m.accepted:
            return self._fail(Refused(f"{self.peer} refused"))
        c = self.client
        key = M.open_session_key(c.key, m.session_id, m.sealed_key)
        self.session = Session(c, m.session_id, key, "a", self.peer)
        self.relay_at = _relay_of(c, m)
        if self.relay_first is not None:
            # The path went silent: the relay now, the punch right after
            # (an upgrade), so that traffic flows meanwhile.
            self.strategy = "relay (path silent)"
            d = self._relay(Failure(PunchFailed("the path went silent")))
        else:
            d = self._punch("a", m, self.offered, flags)
            reason = self._relay_first()
            if reason is not None:
                d = self._alongside(d, reason)
            else:
                d.addCallback(self._direct)
                d.addErrback(self._punch_failed)
        d.addBoth(self._finish)

    def _relay_first(self):
        """
        As L{_Side._relay_first}, counting the rounds that still fit: never
        for an upgrade (the path is relayed already).
        """
        if self.upgrade_of is not None or self.punch is None:
            return None
        left = self.timeout - (self.client.clock.seconds() - self.started)
        rounds_left = 0
        if not self.only_candidates and self.round_seconds > 0:
            # Rounds after this one start while more than the reserve is left
            # (as L{_punch_failed} decides).
            rounds_left = max(0, math.ceil(
                (left - self.RELAY_RESERVE - 0.5) / self.round_seconds) - 1)
        return relay_first(self.plan, rounds_left, translated=self.translated)

    def _punch_failed(self, failure):
        failure.trap(PunchFailed)
        if self.punch is not None:
            self.probes += self.punch.sent
        c = self.client
        left = self.timeout - (c.clock.seconds() - self.started)
        if (self.punch is not None and not self.only_candidates
                and left > self.RELAY_RESERVE + 0.5):
            self.log.info("round {n} to {peer} missed ({why}); another round",
                          n=self.rounds, peer=self.peer, why=failure.getErrorMessage())
            if self.fresh.transport is not None:
                self.fresh.transport.stopListening()
            self._round()
            return _AGAIN
        if self.upgrade_of is not None:
            return failure
        return self._relay(failure)

    def _direct(self, result):
        path = _Side._direct(self, result)
        path.rounds = self.rounds
        path.probes = self.probes + (self.punch.sent if self.punch is not None else 0)
        return path

    def _finish(self, result):
        if result is _AGAIN or self.result.called:
            return
        self.client._attempts.discard(self)
        self.client._unregister(self.request_id)
        if self._deadline.active():
            self._deadline.cancel()
        if not isinstance(result, Path) and self.fresh.transport is not None:
            self.fresh.transport.stopListening()  # no path uses it
        if isinstance(result, Path):
            if result.mode == "relayed":
                result.rounds = self.rounds
                result.probes = self.probes  # every round's (the relay sends none)
                _schedule_upgrade(self.client, result,
                                  self.RECOVERY_UPGRADE if self.relay_first is not None else None)
            # The application holds this Path: the peer's own recovery
            # (an introduction the other way) must not announce it again.
            self.client._announced.add(result)
            self.result.callback(result)
        else:
            self.result.errback(result)

    def _fail(self, exc):
        self.client._attempts.discard(self)
        self.client._unregister(self.request_id)
        if self._deadline.active():
            self._deadline.cancel()
        if self.fresh is not None and self.fresh.transport is not None:
            self.fresh.transport.stopListening()
        if not self.result.called:
            self.result.errback(exc)

    def _expired(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.punch is not None:
            self.punch.cancel()
        if self.session is None:
            self._fail(Refused("the lobby did not answer in time"))

    def cancel(self):
        self._expired()


#: A failed round that started another: nothing to report yet.
_AGAIN = object()


class _Answer(_Side):
    """B's side: the answer from a fresh port, then at once the punch."""

    def __init__(self, client, invite, accepted, flags=0):
        self.client = client
        self.invite = invite
        self.accepted = accepted
        self.flags = flags  # of the Invite: whether A was given our candidates
        self.offered = client._offered() if accepted else ()
        self.acked = False
        self._call = None
        self._tries = 0
        self.punch = None
        self.session = None

    def start(self):
        c = self.client
        self.fresh = c._listen(c)
        c._register(self.invite.request_id, self)
        self.resend()
        if not self.accepted:
            return
        m = self.invite
        key = M.open_session_key(c.key, m.session_id, m.sealed_key)
        self.session = Session(c, m.session_id, key, "b", m.peer)
        self.relay_at = _relay_of(c, m)
        current = c.paths.get(m.peer)
        if current is not None and current.mode != "closed" and current.health.suspect():
            # Our path to this peer missed its keepalives, and the peer
            # connects afresh: it found the path dead and recovers relay
            # first (L{LobbyClient.path_silent}); bind at once.
            self.strategy = "relay (path silent)"
            d = defer.fail(PunchFailed("the path went silent"))
        else:
            # The seed: B sends its probe right after answering.
            d = self._punch("b", m, self.offered, self.flags)
            reason = self._relay_first()
            if reason is not None:
                d = self._alongside(d, reason)  # the relay too, at once
            else:
                d.addCallback(self._direct)
        # Always offer the relay, even with a path to this peer already up:
        # that path may be stale (the peer crashed, or its PathClose was
        # lost) and the peer is connecting afresh.  When the peer is only
        # trying to upgrade a relayed path, it does not bind, and this bind
        # gives up on its own.
        d.addErrback(self._relay)
        d.addCallbacks(self._opened, self._failed)

    def resend(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.acked or self.fresh.transport is None:
            return
        if self._tries >= 8:
            if not self.accepted:
                self._done()  # the lobby never acknowledged a refusal: give up
            return
        self._tries += 1
        c = self.client
        c._send_lobby(self.fresh, M.Answer(self.invite.request_id, self.accepted,
                                           c._local(self.fresh), c.nat,
                                           candidates=self.offered))
        self._call = c.clock.callLater(0.3 * self._tries, self.resend)

    def lobby_answer(self, m, proto, flags=0):
        if isinstance(m, M.AnswerAck):
            self.acked = True
            if self._call is not None and self._call.active():
                self._call.cancel()
            if not self.accepted:
                self._done()

    def _opened(self, path):
        self._done()
        if path not in self.client._announced:
            # A Path is announced once: an upgrade to direct, or the peer
            # connecting afresh, reuses the Path the application holds.
            self.client._announced.add(path)
            self.client.on_path(path)

    def _failed(self, failure):
        self._done()
        if self.fresh.transport is not None:
            self.fresh.transport.stopListening()  # neither punched nor relayed: unused
        self.log.info("incoming path from {peer} failed: {why}", peer=self.invite.peer,
                      why=failure.getErrorMessage())

    def _done(self):
        self.client._unregister(self.invite.request_id)
        if not self.accepted and self.fresh.transport is not None:
            self.fresh.transport.stopListening()

    def cancel(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self.punch is not None:
            self.punch.cancel()


class _Split:
    """
    The handler of a fresh socket that punches while it is bound to the
    lobby's relay (L{_Side._alongside}): what the session gets from the
    relaying lobby node C{relay_addr} goes to C{relay} (the L{_RelayBind},
    then the relayed path's handler), the rest to the punch.
    """

    def __init__(self, relay_addr, relay, punch):
        self.relay_addr = relay_addr
        self.relay = relay
        self.punch = punch
        s = punch.session
        self._session_keys = (s.my_key_id, s.peer_key_id)

    def key_for(self, key_id, mtype):
        return self.relay.key_for(key_id, mtype) or self.punch.key_for(key_id, mtype)

    def quic_datagram(self, data, addr, proto):
        return self.punch.quic_datagram(data, addr, proto)  # the peer's, direct

    def handle(self, frame, message, addr, proto):
        # The lobby's own messages (a retransmitted Introduce, the AnswerAck
        # that stops an answer's retransmissions) go where the punch sends
        # them: to the client.
        relayed = addr == self.relay_addr and frame.key_id in self._session_keys
        target = self.relay if relayed else self.punch
        return target.handle(frame, message, addr, proto)


class _RelayBind:
    """
    Ask the lobby to relay the session; fire with the relayed L{Path}.

    @param relay_at: None (our own lobby relays), or C{(address, secret)}:
        the lobby node that relays the session, and our role's bind secret,
        whose proof (L{M.bind_proof}) each bind carries.  Binds go to that
        address, and L{M.RelayBound} and relayed datagrams are taken from
        there only.
    """

    def __init__(self, client, session, proto, strategy="relay", relay_at=None):
        self.client = client
        self.session = session
        self.proto = proto
        self.strategy = strategy
        self.relay, self.secret = relay_at or (client.lobby, None)
        self.done = defer.Deferred()
        self._tries = 0
        self._call = None

    def start(self):
        self.proto.handler = self
        self.client._binds.add(self)
        self.done.addBoth(self._finished)
        self._bind()
        return self.done

    def _finished(self, result):
        self.client._binds.discard(self)
        return result

    def cancel(self):
        """Stop binding (the client stops): fail with L{Refused}."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        if not self.done.called:
            self.done.errback(Refused("the client stopped"))

    def _bind(self):
        self._call = None
        if self._tries >= 40:
            return self.done.errback(Refused("the lobby does not relay this session"))
        self._tries += 1
        s = self.session
        stamp = s.stamper()
        bind = M.RelayBind()
        if self.secret is not None:
            bind = M.RelayBind(padding=0, proof=M.bind_proof(self.secret, s.my_key_id, stamp))
        self.proto.send(wire.seal(bind, s.my_key_id, s.key, stamp), self.relay, "RelayBind")
        self._call = self.client.clock.callLater(0.25, self._bind)

    def key_for(self, key_id, mtype):
        if key_id == self.session.my_key_id and mtype == M.RelayBound.TYPE:
            return self.session.key
        if key_id == self.session.peer_key_id:
            return self.session.key
        return self.client.lobby_key_for(key_id, mtype)

    def handle(self, frame, message, addr, proto):
        if addr != self.relay:
            return None  # the relay's traffic comes from the relay only
        if isinstance(message, M.RelayBound):
            if message.ready and not self.done.called:
                if self._call is not None and self._call.active():
                    self._call.cancel()
                path = self.client._path_for(self.session.peer)
                path.use_relay(proto, self.relay, self.session)
                path.strategy = self.strategy
                for payload in self.session.early:
                    path.deliver(payload)
                self.session.early = []
                self.done.callback(path)
            return None
        if frame.key_id == self.session.peer_key_id and isinstance(message, M.Data):
            self.session.early.append(message.payload)
        return None


def _schedule_upgrade(client, path, delay=None):
    """While a path is relayed, try again for a direct one now and then."""
    delay = delay or client.upgrade_interval

    def attempt():
        client._upgrades.discard(call)
        if path.mode != "relayed" or client.paths.get(path.peer) is not path:
            return
        a = _Attempt(client, path.peer, client.connect_timeout, path=path)
        d = a.start()

        def again(result):
            if path.mode == "relayed":
                # A silent path's first attempt comes at once; then the usual pace.
                _schedule_upgrade(client, path, min(max(delay * 2, client.upgrade_interval), 300))

        d.addBoth(again)

    call = client.clock.callLater(delay, attempt)
    client._upgrades.add(call)
