# -*- test-case-name: tests.unit.test_peer_punch,tests.lab.test_p2p_lab -*-
"""
The hole-punch executor: runs one side of a punch plan with real sockets
and reactor timers, and reports the first authenticated exchange with the
peer as the path.

What each side does is given as L{Actions} (derived from the plan, see
L{actions_for}); the executor knows nothing of NAT kinds:

- probe some addresses from the fresh socket (whose mapping the lobby
  observed: direct, simultaneous open, the easy side of a birthday punch);
- open C{n} new sockets, each probing some addresses (the seed's window on
  the requesting side; the random side of a birthday punch);
- open one new socket probing one predicted address (the seed's single
  packet on the answering side);
- spray probes at random ports of an address at a bounded rate (the easy
  side of a birthday punch).

Every probe is a MAC'd L{M.Probe}; a probe that arrives is answered with
a L{M.ProbeAck} from the socket it reached.  The first Probe or ProbeAck
received fixes the path: (that socket, that source address).

The QUIC handshake rides with the punch: the asking side hands the punch
a C{companion} (L{p2pnat.peer.streams.EarlyDial}), whose first packet
(the client's Initial) leaves right behind the first probes, to the
first few destinations (L{COMPANION_TARGETS}); and both sides keep the
QUIC datagrams that reach a punch socket before the path exists
(L{Punch.quic_datagram}), which the path's QUIC layer then reads
(L{Punch.caught}).  The peer's answer to the Initial then comes one
round trip after the first probe, not after the punch's own round trip.
"""

import random as _random
import socket

from twisted.internet.defer import Deferred

from p2pnat.daemon.logs import Logger
from p2pnat.net.udp import ControlProtocol
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire
from p2pnat.protocol.strategy import IPV6_GRACE


#: Copies of the ProbeAck that answers the Probe that makes the path (see
#: L{Punch.handle}): each is lost independently of the other.
ACK_COPIES = 2


class PunchFailed(Exception):
    """No path within the deadline."""


#: A round of the plain strategies (direct, simultaneous open, the seed's
#: prediction, candidates) lasts this many RTOs to the lobby, at least
#: ROUND_FLOOR seconds and at most the plan's own round: what fails in
#: one round fails within a few round trips, and a new round (new
#: observations) then does better than waiting.
ROUND_RTOS = 10.0
ROUND_FLOOR = 1.0
#: A socket's first repetitions come after this many seconds (doubling
#: up to the plan's interval): one RTO to the lobby (about one to the
#: peer) within these bounds.
REPEAT_FIRST = (0.02, 0.05)
#: More new sockets than this in one round is a birthday punch, whose
#: length is what its hit probability needs: never shortened.
MAX_WINDOW_SOCKETS = 64
#: The answering side (B) probes before the asker (A) even has the
#: introduction, so its first probe dies at A's NAT: A's own first probe
#: opens that NAT about one lobby RTT after B answered (the Answer to the
#: lobby, the Introduce to A).  B probes again at these multiples of the
#: RTT (its shortest sample: srtt runs high for a while after samples a
#: busy host inflated), around that moment, so that one of its probes reaches A just after
#: A's first probe left, and A has the path then instead of one round trip
#: later, with B's answer to its probe.
CATCH_RTTS = (0.5, 0.75, 1.0, 1.25, 1.5)
#: ... when the RTT is at least this long (seconds): below it, the round
#: trip they would save is shorter than the time between them.
CATCH_MIN_RTT = 0.008
#: ... from at most this many of its sockets (the seed's single predicted
#: probe, simultaneous open: not a window of sockets).
CATCH_MAX_SOCKETS = 4
#: The companion's packets (the QUIC Initial) go to at most this many
#: (socket, destination) pairs: the first destination of each socket in
#: the plan's order, then the next ones.  A window of predicted ports
#: gets its likeliest ones; the handshake's own retransmission, on the
#: path once it is found, covers the rest.
COMPANION_TARGETS = 4
#: QUIC datagrams a punch keeps per source address before the path
#: exists (a client's Initial, a server's first flight: 1 to 3 packets),
#: from at most L{CAUGHT_ADDRESSES} addresses; larger ones are dropped.
CAUGHT_PER_ADDRESS = 4
CAUGHT_ADDRESSES = 8
CAUGHT_MAX_BYTES = 1500


def round_deadline(actions, deadline, rtt):
    """
    How long this round runs: C{deadline} (the plan's) for a birthday
    punch or before the RTT to the lobby is known, else L{ROUND_RTOS}
    RTOs of C{rtt} (an L{p2pnat.peer.rtt.RttEstimator}) within
    [L{ROUND_FLOOR}, C{deadline}].
    """
    if rtt is None or actions.spray_ip or actions.new_sockets > MAX_WINDOW_SOCKETS:
        return deadline
    return rtt.scaled(ROUND_RTOS, min(ROUND_FLOOR, deadline), deadline)


class Punch:
    """
    One side of one punch round.

    @param session: the L{p2pnat.peer.client.Session}.
    @param fresh: the fresh socket (a ControlProtocol) whose mapping the
        lobby observed.
    @param listen: C{listen(handler) -> ControlProtocol}, opening a new
        UDP socket on the same interface.
    @param companion: called once as C{companion(send, targets)} right
        after the first probes (those at the normal TTL), where
        C{send(data)} sends C{data} to the C{(socket, destination)} pairs
        C{targets} (L{COMPANION_TARGETS}) until the punch ends; None:
        nothing rides with the probes.
    @ivar done: fires with ``(proto, addr)`` or fails with L{PunchFailed}.
    @ivar caught: once the punch succeeded, the QUIC datagrams
        C{(proto, data, addr)} that came from the peer's address on the
        winning socket before that (L{quic_datagram}), for the path's QUIC
        layer to read.
    """

    log = Logger(namespace="p2pnat.punch")

    def __init__(self, session, actions, fresh, listen, clock, deadline, rnd=None,
                 shared=None, companion=None):
        self.session = session
        self.actions = actions
        self.fresh = fresh
        self.listen = listen
        self.clock = clock
        self.deadline = deadline
        self.random = rnd or _random.SystemRandom()
        #: The client's long-lived sockets by name (``"mapped"``, ``"ipv6"``;
        #: see L{p2pnat.peer.sockets}), leased for this punch where the
        #: actions use them.
        self.shared = shared or {}
        self.done = Deferred()
        self.sockets = []  # (proto, destinations)
        self.sent = 0
        self.result = None
        #: How the path was found: ``"observed"`` (the plan, on the peer's
        #: observed address or local one), ``"peer-mapped"`` (the peer's
        #: port-mapped address), ``"mapped"`` (ours), ``"ipv6"``.
        self.won = None
        #: Sockets of the other family kept open for the path beside the one
        #: it runs on: the peer may have settled on the other family (its
        #: answers came in a different order), and the path follows the
        #: peer onto IPv6 when its traffic shows up there (see L{Path}).
        self.standby = []
        self._calls = []
        self._repeats = {}  # socket index -> probes sent so far
        self._plain = set()  # socket indexes whose first probes keep the normal TTL
        self._v4_first = None  # an IPv4 success waiting out the IPv6 grace
        self._v6 = False  # IPv6 candidates are being probed
        self._round = session.next_round()
        self._repeat_first = REPEAT_FIRST[1]  # until start() knows the RTT
        self.companion = companion
        self.caught = []
        self._caught = EarlyQuic()

    def start(self):
        a = self.actions
        rtt = getattr(self.session.client, "rtt", None)
        self.deadline = round_deadline(a, self.deadline, rtt)
        self._repeat_first = rtt.rto(*REPEAT_FIRST) if rtt is not None else REPEAT_FIRST[1]
        self.fresh.handler = self
        if a.from_fresh:
            self.sockets.append((self.fresh, list(a.from_fresh)))
        for _ in range(a.new_sockets):
            try:
                proto = self.listen(self)
            except OSError as e:
                self.log.warn("cannot open a punch socket: {error}", error=e)
                break
            self.sockets.append((proto, list(a.new_to)))
        if a.to_candidates:
            self._plain.add(len(self.sockets))
            self.sockets.append((self.fresh, list(a.to_candidates)))
        for name, dests in (("ipv6", a.to_candidates6), ("mapped", [])):
            shared = self.shared.get(name)
            if shared is None or (name == "ipv6" and not dests) or (
                    name == "mapped" and not a.take_mapped):
                continue
            port = shared.lease(self.session, self)
            if port is not None:
                self._plain.add(len(self.sockets))
                self.sockets.append((port, list(dests)))
                self._v6 = self._v6 or bool(dests and port.family == 6)
        # The seed's order: open every socket at once, then repeat.
        for index, (proto, dests) in enumerate(self.sockets):
            self._probe(index, proto, dests, first=True)
        if self.companion is not None:
            # Behind the first probes that reach the peer: with a low first
            # TTL (which must not reach the peer's NAT), behind the second.
            if a.first_ttl:
                self._calls.append(self.clock.callLater(self._repeat_first, self._accompany))
            else:
                self._accompany()
        self._catch(rtt)
        if a.spray_ip:
            self._spray_interval = 1.0 / a.spray_rate
            self._spray()
        self._calls.append(self.clock.callLater(self.deadline, self._expire))
        return self.done

    def _probe(self, index, proto, dests, first=False):
        if self.result is not None or not dests:
            return  # a socket without destinations only takes the peer's probes
        ttl = self.actions.first_ttl if first and index not in self._plain else 0
        if ttl:
            _set_ttl(proto, ttl)
        for dest in dests:
            self._send(proto, M.Probe(self._round, index), dest)
        if ttl:
            _set_ttl(proto, 0)
        # The first repetitions come quickly (the peer may have learnt of the
        # session a moment after our first probe), then every interval.
        repeat = self._repeats.get(index, 0)
        self._repeats[index] = repeat + 1
        delay = min(self.actions.interval, self._repeat_first * 2 ** repeat)
        self._calls.append(self.clock.callLater(delay, self._probe, index, proto, dests))

    def _catch(self, rtt):
        """
        On the answering side, probe again around the moment the asker's
        first probe opens its NAT (L{CATCH_RTTS}).
        """
        a = self.actions
        least = getattr(rtt, "least", None)
        if (self.session.role != "b" or least is None or least < CATCH_MIN_RTT
                or a.spray_ip or len(self.sockets) > CATCH_MAX_SOCKETS):
            return
        for k in CATCH_RTTS:
            self._calls.append(self.clock.callLater(k * least, self._probe_again))

    def _probe_again(self):
        """One more probe from every socket to its destinations (no repetition scheduled)."""
        if self.result is not None:
            return
        for index, (proto, dests) in enumerate(self.sockets):
            for dest in dests:
                self._send(proto, M.Probe(self._round, index), dest)

    def _spray(self):
        if self.result is not None:
            return
        lo, hi = self.actions.spray_ports
        # Bursts of up to 10 per timer call keep the reactor responsive.
        for _ in range(max(1, int(self.actions.spray_rate / 100))):
            self._send(self.fresh, M.Probe(self._round, 0xFFFF),
                       (self.actions.spray_ip, self.random.randint(lo, hi)))
        self._calls.append(self.clock.callLater(max(0.01, self._spray_interval * max(
            1, int(self.actions.spray_rate / 100))), self._spray))

    def _accompany(self):
        if self.result is not None:
            return
        targets = companion_targets(self.sockets, COMPANION_TARGETS)

        def send(data):
            if self.result is not None:
                return  # the path carries what follows
            for proto, dest in targets:
                if proto.transport is not None:
                    try:
                        proto.send(data, dest, "quic")
                    except OSError:
                        pass  # as a probe: the handshake sends again
        self.companion(send, targets)

    def _send(self, proto, message, dest):
        s = self.session
        data = wire.seal(message, s.my_key_id, s.key, s.stamper())
        try:
            proto.send(data, dest, "Probe")
            self.sent += 1
        except OSError:
            pass  # e.g. no route yet; the next repetition tries again

    # -- ControlProtocol handler of every punch socket -------------------------------

    _TYPES = frozenset({M.Probe.TYPE, M.ProbeAck.TYPE, M.Data.TYPE, M.PathKeepalive.TYPE})

    def key_for(self, key_id, mtype):
        if key_id == self.session.peer_key_id and mtype in self._TYPES:
            return self.session.key
        # Lobby answers reaching the fresh socket (retransmitted ones).
        return self.session.client.lobby_key_for(key_id, mtype)

    def handle(self, frame, message, addr, proto):
        if frame.key_id != self.session.peer_key_id:
            return self.session.client.lobby_message(frame, message, addr, proto)
        # Acknowledge and keep data before declaring success: success runs
        # the application, which may send at once.
        if isinstance(message, M.Probe):
            if self.result is None or self.result == (proto, addr):
                # Sent under our own key ID, not echoed under the prober's.
                # The Probe that makes our path gets ACK_COPIES: the peer's
                # probe may have been the only one its socket sends (the
                # seed's single predicted packet), so a lost ack would leave
                # its punch going on, dropping our QUIC packets, until its
                # deadline.  Later probes are answered once each.
                copies = ACK_COPIES if self.result is None else 1
                for _ in range(copies):
                    self._send(proto, M.ProbeAck(message.round, message.index, addr), addr)
            self._success(proto, addr)
        elif isinstance(message, (M.ProbeAck, M.Data, M.PathKeepalive)):
            if isinstance(message, M.Data) and (self.result is None
                                                or self.result == (proto, addr)):
                self.session.early.append(message.payload)
            self._success(proto, addr)
        return None

    def quic_datagram(self, data, addr, proto):
        """
        A QUIC datagram on one of our sockets before the path exists (the
        peer's handshake rides with its probes): kept (True), within
        L{EarlyQuic}'s bounds, for the path's QUIC layer (L{caught}),
        which authenticates it.
        """
        return self.result is None and self._caught.keep(proto, data, addr)

    def _success(self, proto, addr):
        if self.result is not None:
            return
        if self._v6 and ":" not in addr[0]:
            # IPv4 works; an IPv6 path, preferred, may be a moment behind.
            if self._v4_first is None:
                self._v4_first = (proto, addr)
                self._calls.append(self.clock.callLater(IPV6_GRACE, self._settle))
            return
        self._settle((proto, addr))

    def _settle(self, result=None):
        """Take C{result} (or the IPv4 success that waited) as the path."""
        if self.result is not None:
            return
        self.result = result or self._v4_first
        proto, addr = self.result
        self.won = self._kind(proto, addr)
        self.caught = self._caught.take(proto, addr)
        if self._v6:
            if ":" in addr[0]:
                # The IPv4 socket that worked, or else the fresh one the plan probed from.
                other = self._v4_first[0] if self._v4_first else self.fresh
                self.standby = [other] if any(other is p for p, _ in self.sockets) else []
            else:
                self.standby = [p for p, _ in self.sockets if getattr(p, "family", 4) == 6]
        self._stop(keep=[proto] + self.standby)
        self.log.info("punched {peer}: {local} <-> {addr} after {sent} probes ({won})",
                      peer=self.session.peer, local=proto.transport.getHost().port, addr=addr,
                      sent=self.sent, won=self.won)
        self.done.callback(self.result)

    def _kind(self, proto, addr):
        shared = getattr(proto, "shared", None)  # a SessionPort: "ipv6" or "mapped"
        if shared is not None:
            return shared.name
        if tuple(addr) in {tuple(c) for c in self.actions.to_candidates}:
            return "peer-mapped"
        return "observed"

    def _expire(self):
        if self.result is None and self._v4_first is not None:
            return self._settle()
        if self.result is None:
            self._stop(keep=None)
            self.done.errback(PunchFailed(f"no path after {self.sent} probes"))

    def cancel(self):
        if self.result is None and not self.done.called:
            self._stop(keep=None)
            self.done.errback(PunchFailed("cancelled"))

    def _stop(self, keep):
        """
        Stop every timer, forget the QUIC datagrams kept (L{caught} has the
        path's), and close the sockets but the fresh one and those in C{keep}.
        """
        self._caught.clear()
        keep = keep or []
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        for proto, _ in self.sockets:
            # The fresh socket appears twice when it also probes candidates.
            if (proto is not self.fresh and proto.transport is not None
                    and not any(proto is k for k in keep)):
                proto.transport.stopListening()


class EarlyQuic:
    """
    QUIC datagrams that reached a socket before a QUIC layer read it (the
    peer's handshake, riding with its punch), kept for that layer: at
    most L{CAUGHT_PER_ADDRESS} per (socket, source address), from at most
    L{CAUGHT_ADDRESSES} of them, none over L{CAUGHT_MAX_BYTES}.
    """

    def __init__(self):
        self._held = {}  # (socket, source address) -> [datagram, ...]

    def __len__(self):
        return len(self._held)

    def keep(self, proto, data, addr):
        """Keep C{data} if the bounds allow: whether it was kept."""
        key = (proto, tuple(addr))
        held = self._held.get(key)
        if len(data) > CAUGHT_MAX_BYTES or (
                held is None and len(self._held) >= CAUGHT_ADDRESSES) or (
                held is not None and len(held) >= CAUGHT_PER_ADDRESS):
            return False
        self._held.setdefault(key, []).append(data)
        return True

    def take(self, proto, addr):
        """Those from C{addr} on C{proto}, as C{[(proto, data, addr)]}."""
        return [(proto, data, addr) for data in self._held.get((proto, tuple(addr)), ())]

    def clear(self):
        self._held = {}


def companion_targets(sockets, limit):
    """
    Where a punch's companion packets go: up to C{limit} C{(socket,
    destination)} pairs of C{sockets} (``[(socket, [destination, ...])]``,
    the punch's), the first destination of every socket first, then the
    second of every socket, and so on; a socket listed twice (the fresh
    one, probing candidates too) counts once per destination.
    """
    out = []
    depth = 0
    while len(out) < limit and any(len(dests) > depth for _, dests in sockets):
        for proto, dests in sockets:
            if len(dests) > depth and len(out) < limit and (proto, dests[depth]) not in out:
                out.append((proto, dests[depth]))
        depth += 1
    return out


def _set_ttl(proto, ttl):
    try:
        sock = proto.transport.getHandle()
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl or 64)
    except (AttributeError, OSError):
        pass


def new_socket(reactor, interface, handler, clock, metrics, replay):
    """Open a new UDP socket (a fresh NAT mapping) served by C{handler}."""
    proto = ControlProtocol(handler, clock, metrics, replay, name="punch", stun_rate=0)
    reactor.listenUDP(0, proto, interface=interface)
    return proto
