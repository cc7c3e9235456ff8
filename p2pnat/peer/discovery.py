# -*- test-case-name: tests.unit.test_discovery -*-
"""
NAT behaviour discovery, the client side: STUN Binding requests (RFC 8489)
to the lobby's addresses, RFC 5780 style, then
:func:`p2pnat.protocol.nat.classify`.

One run (:func:`discover`), about ``pause`` + a few round trips long and
never more than ``deadline`` seconds:

1. the main socket asks every lobby address in turn (mapping: does the
   mapped address change with the destination?);
2. ``sockets`` fresh sockets ask the primary address one after another
   (allocation: preserving, sequential with its step, or random);
3. a fresh filtering socket asks the primary address, then asks it again
   with CHANGE-REQUEST for the other IP and port, the other port, the
   other IP (filtering: which answers get through the NAT); a lobby whose
   sockets are linked as siblings answers those from its other sockets
   (:func:`p2pnat.net.udp.link_siblings`);
4. ``pause`` seconds after the first burst, a second burst of ``sockets``
   fresh sockets (the ports other traffic took meanwhile give the rate).

Every request is retransmitted (``schedule``) until answered or given up
(``give_up``): a request without an answer then means filtered (or lost
three times).  The sockets are plain Twisted datagram protocols opened by a
``listen`` callable, so tests drive a run on a :class:`~twisted.internet.task.Clock`
with fake transports; ``python -m p2pnat.peer.discovery LOBBY_ADDR...``
runs one for real and prints the behaviour as JSON.

:func:`discover_nat` is what the P2P client needs of it: the
:class:`~p2pnat.protocol.p2p.NatInfo` to log in with, measured or given.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import weakref
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.protocol import DatagramProtocol

from p2pnat.daemon.logs import Logger
from p2pnat.peer.rtt import RttEstimator
from p2pnat.protocol import stun
from p2pnat.protocol.nat import UNKNOWN, NatBehaviour, Observations, Probe, classify
from p2pnat.protocol.p2p import ALLOCATIONS, MAPPINGS, NatInfo

__all__ = ["StunSocket", "Discovery", "DiscoveryResult", "NatCache", "NatStore", "discover",
           "discover_nat",
           "nat_cache", "cached_for", "parse_nat", "source_address", "timers", "to_nat_info",
           "main"]

#: Seconds after the first send at which a request is sent (again).
SCHEDULE = (0.0, 0.1, 0.3)
#: Seconds after the first send at which an unanswered request gives up.
GIVE_UP = 0.6

_FLAGS = {"": (False, False), "port": (False, True), "ip": (True, False), "ip+port": (True, True)}


class StunSocket(DatagramProtocol):
    """
    One local UDP socket of a discovery run: sends Binding requests,
    retransmits them, and matches answers (from any address: a changed
    answer comes from another one) by transaction id.

    @param index: the socket's number in the run (L{Probe.socket}).
    """

    noisy = False
    log = Logger(namespace="p2pnat.discovery")

    def __init__(self, clock, index=0, schedule=SCHEDULE, give_up=GIVE_UP):
        self.clock = clock
        self.index = index
        self.schedule = schedule
        self.give_up = give_up
        self.sent = 0
        #: Called with C{(probe, rtt)} for each answer to a request sent
        #: once (Karn's rule: a retransmitted one's RTT is ambiguous).
        self.on_rtt = None
        self._pending = {}  # transaction id -> (deferred, probe fields, delayed calls)
        self._requests = {}  # transaction id -> (data, server, copies sent)

    def local(self):
        """The socket's local ``(host, port)``."""
        a = self.transport.getHost()
        return a.host, a.port

    def query(self, server, change=""):
        """
        Ask ``server`` for our mapped address, with CHANGE-REQUEST
        ``change`` (one of :data:`p2pnat.protocol.nat.CHANGES`).  Return a
        Deferred firing with the :class:`Probe`: answered, refused or, after
        ``give_up`` seconds, unanswered.  It never fails.
        """
        change_ip, change_port = _FLAGS[change]
        tid, data = stun.binding_request(change_ip=change_ip, change_port=change_port)
        d = defer.Deferred()
        fields = dict(socket=self.index, local=self.local(), server=tuple(server),
                      sent=self.clock.seconds(), change=change)
        self._pending[tid] = (d, fields, [])
        self._requests[tid] = [data, tuple(server), 0]
        self._timers(tid, self.schedule, self.give_up)
        self._resend(tid)
        return d

    def _timers(self, tid, schedule, give_up):
        """(Re)arm the retransmissions and the give-up of C{tid}, timed from its first send."""
        _, fields, calls = self._pending[tid]
        for call in calls:
            if call.active():
                call.cancel()
        calls.clear()
        elapsed = self.clock.seconds() - fields["sent"]
        calls.extend(self.clock.callLater(t - elapsed, self._resend, tid)
                     for t in schedule[1:] if t > elapsed)
        calls.append(self.clock.callLater(max(0.0, give_up - elapsed), self._finish, tid, {}))

    def retime(self, schedule, give_up):
        """
        Follow a new C{schedule} and C{give_up} (a measured RTT's) from
        now on: every pending request's retransmissions and give-up are
        timed anew from its first send; times already past are skipped
        (a give-up already past ends the request now).
        """
        self.schedule, self.give_up = schedule, give_up
        for tid in list(self._pending):
            self._timers(tid, schedule, give_up)

    def _resend(self, tid):
        """Send the request C{tid} (again), counting its copies for Karn's rule."""
        request = self._requests.get(tid)
        if request is not None and self._send(*request[:2]):
            request[2] += 1

    def _send(self, data, server):
        """Send C{data} to C{server}; whether it left (subclasses send their own probes)."""
        if self.transport is None:
            return False
        try:
            self.transport.write(data, tuple(server))
            self.sent += 1
            return True
        except OSError as e:  # no route, say: the same as lost
            self.log.debug("discovery: cannot send to {server}: {e}", server=server, e=e)
            return False

    def _finish(self, tid, result):
        entry = self._pending.pop(tid, None)
        request = self._requests.pop(tid, None)
        if entry is None:
            return
        d, fields, calls = entry
        for call in calls:
            if call.active():
                call.cancel()
        probe = Probe(**fields, **result)
        if result and request is not None and request[2] == 1 and self.on_rtt is not None:
            self.on_rtt(probe, self.clock.seconds() - fields["sent"])
        d.callback(probe)

    def datagramReceived(self, data, addr):
        if len(data) < stun.HEADER_SIZE or not stun.is_stun(data[0]):
            return
        tid = data[8:20]
        if tid not in self._pending:
            return
        try:
            result = stun.parse_binding_response(data, tid)
        except stun.StunErrorResponse:
            return self._finish(tid, {"refused": True, "answered_from": tuple(addr[:2])})
        except stun.StunError as e:
            self.log.debug("discovery: bad answer from {addr}: {e}", addr=addr, e=e)
            return
        self._finish(tid, {"mapped": result.mapped, "answered_from": tuple(addr[:2])})

    def close(self):
        """Give up every pending request now."""
        for tid in list(self._pending):
            self._finish(tid, {})


@dataclass(frozen=True)
class DiscoveryResult:
    """What a run found: the ``behaviour``, the raw ``observations``, how
    long it took (``elapsed`` seconds) and how many requests it sent."""

    behaviour: NatBehaviour
    observations: Observations
    elapsed: float
    sent: int

    def to_json(self, observations=False) -> dict:
        d = self.behaviour.to_json()
        d["elapsed"] = round(self.elapsed, 3)
        d["sent"] = self.sent
        if observations:
            d["observations"] = self.observations.to_json()
        return d


class Discovery:
    """
    One discovery run against the lobby addresses ``servers`` (the first is
    the primary).  ``listen(protocol)`` opens a new UDP socket for
    ``protocol`` and returns its listening port (``stopListening()``).

    The first answer to a request sent once measures the round trip to
    the lobby (into ``rtt``, an :class:`~p2pnat.peer.rtt.RttEstimator`,
    which a client may share); from then on every request's
    retransmissions and give-up follow it (:func:`timers`), the fixed
    ``schedule`` and ``give_up`` being the caps.

    @param sockets: fresh sockets per allocation burst.
    @param pause: seconds between the starts of the two bursts.
    @param deadline: no request is started after this many seconds.
    @param fast: send every request at once (the main socket to every
        address, one burst, the filtering socket's four) instead of one
        step after another, and only one burst (no rate, no pause):
        about one round trip, for a client about to connect.
    @ivar decided: a Deferred firing with a :class:`DiscoveryResult` as
        soon as the classification is decided: every plain request
        answered or given up, and the filtering decided (an answer from
        the other IP and port) or, if still waiting on change requests
        that may never be answered, left unknown (a planner takes unknown
        filtering as the most restrictive, as it would a silent one).
        The run itself goes on until its last request ends.
    """

    log = Logger(namespace="p2pnat.discovery")

    def __init__(self, servers, clock, listen, *, sockets=4, pause=0.5, schedule=SCHEDULE,
                 give_up=GIVE_UP, deadline=2.0, fast=False, rtt=None):
        if not servers:
            raise ValueError("discovery needs at least one lobby address")
        self.servers = [tuple(s) for s in servers]
        self.clock = clock
        self.listen = listen
        self.sockets = sockets
        self.pause = pause
        self.schedule = schedule
        self.give_up = give_up
        self.deadline = deadline
        self.fast = fast
        self.rtt = rtt if rtt is not None else RttEstimator(clock)
        self.decided = defer.Deferred()
        self.probes = []
        self._seq = 0
        self._opened = []  # (protocol, port)
        self._start = None
        self._retimed = False

    def run(self):
        """Start the run; a Deferred firing with a :class:`DiscoveryResult`."""
        return defer.Deferred.fromCoroutine(self._run())

    def _open(self):
        proto = StunSocket(self.clock, len(self._opened), self.schedule, self.give_up)
        proto.on_rtt = self._measured
        port = self.listen(proto)
        self._opened.append((proto, port))
        return proto

    def _measured(self, probe, rtt):
        self.rtt.sample(rtt)
        schedule, give_up = timers(self.rtt, self.schedule, self.give_up)
        self.schedule, self.give_up = schedule, give_up
        if not self._retimed:
            self._retimed = True
            self.log.debug("discovery: RTT {rtt:.4f}s; retransmissions at {schedule}, give-up"
                           " {give_up:.3f}s", rtt=rtt, schedule=schedule, give_up=give_up)
        for proto, _ in self._opened:
            proto.retime(schedule, give_up)

    def _late(self):
        return self.clock.seconds() - self._start > self.deadline - self.give_up

    async def _ask(self, sock, server, change=""):
        seq, self._seq = self._seq, self._seq + 1
        probe = await sock.query(server, change)
        self.probes.append((seq, probe))
        return probe

    async def _burst(self):
        for _ in range(self.sockets):
            if self._late():
                return
            await self._ask(self._open(), self.servers[0])

    async def _run(self):
        self._start = self.clock.seconds()
        try:
            if self.fast:
                await self._run_fast()
            else:
                await self._run_steps()
        finally:
            sent = sum(proto.sent for proto, _ in self._opened)
            await self._close()
        result = self._result(sent)
        if not self.decided.called:
            self.decided.callback(result)
        return result

    def _result(self, sent, filtering=True):
        """
        The classification of the probes so far; without the change
        requests' (filtering unknown) if not C{filtering}.
        """
        probes = tuple(p for _, p in sorted(self.probes, key=lambda sp: (sp[1].sent, sp[0]))
                       if filtering or not p.change)
        obs = Observations(tuple(self.servers), probes)
        return DiscoveryResult(classify(obs), obs, self.clock.seconds() - self._start, sent)

    async def _run_steps(self):
        changes = []
        main = self._open()
        first = await self._ask(main, self.servers[0])
        if first.mapped is not None or first.refused:
            for server in self.servers[1:]:
                if not self._late():
                    await self._ask(main, server)
            burst = self.clock.seconds()
            await self._burst()
            if not self._late():
                filt = self._open()
                probe = await self._ask(filt, self.servers[0])
                if probe.mapped is not None:
                    changes = [defer.Deferred.fromCoroutine(self._ask(filt, self.servers[0], c))
                               for c in ("ip+port", "port", "ip")]
            wait = burst + self.pause - self.clock.seconds()
            if wait > 0 and not self._late():
                await task.deferLater(self.clock, wait, lambda: None)
            await self._burst()
            for d in changes:
                await d
        else:
            self.log.info("discovery: no answer from {server}", server=self.servers[0])

    async def _run_fast(self):
        primary = self.servers[0]

        def ask(sock, server, change=""):
            return defer.Deferred.fromCoroutine(self._ask(sock, server, change))

        # In the order of the step by step run, all at once: the NAT
        # allocates in the order the requests leave.
        main = self._open()
        plain = [ask(main, server) for server in self.servers]
        plain += [ask(self._open(), primary) for _ in range(self.sockets)]
        filt = self._open()
        plain.append(ask(filt, primary))
        changes = {c: ask(filt, primary, c) for c in ("ip+port", "port", "ip")}
        both = changes["ip+port"]
        await defer.gatherResults(plain)

        def undecided():
            return not all(d.called for d in changes.values()) and not (
                both.called and both.result.mapped is not None)

        if not any(p.mapped is not None or p.refused for _, p in self.probes):
            self.log.info("discovery: no answer from {server}", server=primary)
        elif undecided():
            # The change requests left with the plain ones: answers that
            # come at all come about now.  A moment's grace, then the
            # classification is decided without the filtering (the rest
            # may stay silent until given up).
            grace = min(max(FILTER_GRACE[0], 0.25 * (self.rtt.srtt or 0.0)), FILTER_GRACE[1])
            pending = defer.DeferredList(list(changes.values()))
            waited = task.deferLater(self.clock, grace, lambda: None)
            waited.addErrback(lambda f: f.trap(defer.CancelledError))
            await defer.DeferredList([pending, waited], fireOnOneCallback=True)
            waited.cancel()  # (a no-op when it fired)
            if undecided():
                self.decided.callback(self._result(self._sent(), filtering=False))
        for d in changes.values():
            await d

    def _sent(self):
        return sum(proto.sent for proto, _ in self._opened)

    async def _close(self):
        stops = []
        for proto, port in self._opened:
            proto.close()
            stopped = port.stopListening()
            if isinstance(stopped, defer.Deferred):
                stops.append(stopped)
        if stops:
            await defer.gatherResults(stops, consumeErrors=True)


#: Retransmissions and give-up in multiples of the RTO once the RTT is
#: measured, the RTO being at least RETRANSMIT_FLOOR and the give-up at
#: least GIVE_UP_FLOOR (seconds): an answer delayed by a busy host must
#: not read as a filtered one.
RETRANSMIT_RTOS = (0.0, 1.0, 3.0)
GIVE_UP_RTOS = 5.0
RETRANSMIT_FLOOR = 0.03
GIVE_UP_FLOOR = 0.15
#: Seconds (least, most) a fast run waits for change requests' answers
#: after the plain ones before it decides without the filtering: a
#: quarter of the RTT within these bounds (the answers left the lobby
#: together; only scheduling spreads them).
FILTER_GRACE = (0.003, 0.02)


def timers(rtt, schedule=SCHEDULE, give_up=GIVE_UP):
    """
    The C{(schedule, give_up)} of discovery requests for the RTT measured
    in C{rtt} (an L{RttEstimator}): multiples of its RTO, with the fixed
    C{schedule} and C{give_up} as caps (and what it is before a sample).
    """
    if not rtt.known:
        return tuple(schedule), give_up
    rto = rtt.rto(RETRANSMIT_FLOOR, give_up)
    timed = tuple(min(cap, m * rto) for m, cap in zip(RETRANSMIT_RTOS, schedule))
    timed += tuple(schedule[len(timed):])
    return timed, max(GIVE_UP_FLOOR, min(give_up, GIVE_UP_RTOS * rto))


def source_address(server):
    """
    The local IP address this host sends from towards ``server`` (a UDP
    socket is connected, which sends nothing).  Binding to it, rather than
    to the wildcard, lets a run tell a public host from a NATed one.
    """
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(tuple(server[:2]))
        return s.getsockname()[0]


#: Where a connected (silent) UDP socket is aimed to learn which global
#: IPv6 address this host sends from: any routed global address does.
IPV6_PROBE_TARGET = ("2001:4860:4860::8888", 9)


def _usable_ipv6(text):
    """A global unicast address a peer elsewhere could reach (not ULA, not mapped)."""
    try:
        ip = ipaddress.IPv6Address(text.split("%")[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved or ip.is_site_local or ip.ipv4_mapped is not None
                or ip in _ULA)


_ULA = ipaddress.IPv6Network("fc00::/7")
#: Flags of /proc/net/if_inet6 that make an address unusable: tentative
#: (DAD not done), deprecated, DAD failed.
_IFA_UNUSABLE = 0x40 | 0x20 | 0x08


def global_ipv6(target=IPV6_PROBE_TARGET, if_inet6="/proc/net/if_inet6"):
    """
    This host's global IPv6 address, or None: the source address towards
    C{target} when a route leads there; else (a network without a default
    route, as the NAT lab's) the first usable global address in Linux's
    C{if_inet6} table.  Nothing is sent.
    """
    try:
        found = source_address(target)
        if _usable_ipv6(found):
            return found
    except OSError:
        pass
    try:
        with open(if_inet6) as f:
            rows = [line.split() for line in f]
    except OSError:
        return None
    for row in rows:
        # address, interface index, prefix length, scope (0: global), flags, name
        if len(row) < 6 or int(row[3], 16) != 0 or int(row[4], 16) & _IFA_UNUSABLE:
            continue
        text = str(ipaddress.IPv6Address(bytes.fromhex(row[0])))
        if _usable_ipv6(text):
            return text
    return None


def _listener(reactor, interface):
    def listen(proto):
        return reactor.listenUDP(0, proto, interface=interface)

    return listen


def discover(reactor, servers, *, interface=None, **options):
    """
    Run discovery against the lobby addresses ``servers`` (``(ip, port)``
    pairs, the primary first) with real UDP sockets bound to ``interface``
    (default: :func:`source_address` of the primary); a Deferred firing
    with a :class:`DiscoveryResult`.  ``options`` as for :class:`Discovery`.
    """
    servers = [tuple(s) for s in servers]
    if interface is None:
        interface = source_address(servers[0])
    return Discovery(servers, reactor, _listener(reactor, interface), **options).run()


class NatCache:
    """
    This host's NAT towards one lobby from one local interface, measured
    once and then kept fresh in the background, so that connecting never
    waits for discovery once it has answered.

    - :meth:`get`: the NAT now (a Deferred firing with a
      :class:`~p2pnat.protocol.p2p.NatInfo`): at once when known; else a
      fast run (:class:`Discovery` with ``fast``) is started, or the one
      under way joined, and its answer comes as soon as the classification
      is decided (about one round trip), not after its give-up timers.
    - :attr:`current` / :attr:`result`: the latest answer (a run that got
      no answer at all does not replace a known one: the lobby may be
      down for a moment, the NAT has not changed for that).
    - A full run (both bursts: the port consumption rate too) follows a
      fast one that found sequential ports at once, in the background:
      the prediction window is sized from the rate.
    - :meth:`start` refreshes every ``refresh`` seconds with a full run;
      :meth:`refresh` does one now (a path died, the lobby saw us at
      another IP), at most once every :data:`MIN_GAP` seconds;
      :meth:`stop` ends the refreshes.
    - :meth:`subscribe`: C{callback(NatInfo)} on every change.
    - :attr:`rtt`: the round trip to the lobby that the runs measured
      (an :class:`~p2pnat.peer.rtt.RttEstimator` a client may share).

    :func:`nat_cache` keeps one per reactor, interface and lobby: NAT
    discovery once per process.
    """

    log = Logger(namespace="p2pnat.discovery")

    #: Seconds between background refreshes.
    REFRESH = 300.0
    #: Seconds a refresh asked for waits at least after the last run's start.
    MIN_GAP = 5.0

    def __init__(self, reactor, servers, interface=None, *, refresh=REFRESH, listen=None,
                 rtt=None, **options):
        if not servers:
            raise ValueError("discovery needs at least one lobby address")
        self.reactor = reactor
        self.servers = [tuple(s) for s in servers]
        self.interface = interface if interface is not None else source_address(self.servers[0])
        self.listen = listen or _listener(reactor, self.interface)
        self.interval = refresh
        self.options = options
        self.rtt = rtt if rtt is not None else RttEstimator(reactor)
        self.current = None
        self.result = None
        self.runs = 0
        self._subscribers = []
        self._waiters = []
        self._running = None  # the Discovery under way
        self._last = None
        self._loop = None

    def get(self):
        """The NAT: a Deferred firing with a :class:`NatInfo`; it never fails."""
        if self.current is not None and self.current.mapping != UNKNOWN:
            return defer.succeed(self.current)
        d = defer.Deferred()
        self._waiters.append(d)
        if self._running is None:
            self._run(fast=True, why="first")
        return d

    def refresh(self, why="asked"):
        """Measure again now, in the background (unless a run is under way or just was)."""
        if self._running is not None or (
                self._last is not None and self.reactor.seconds() - self._last < self.MIN_GAP):
            return False
        self._run(fast=False, why=why)
        return True

    def start(self):
        """Refresh every ``refresh`` seconds from now on (idempotent)."""
        if self._loop is None:
            self._loop = task.LoopingCall(self.refresh, "periodic")
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False)

    def stop(self):
        """No more refreshes (a run under way ends on its own, within its deadline)."""
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def subscribe(self, callback):
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def _run(self, fast, why):
        run = Discovery(self.servers, self.reactor, self.listen, fast=fast, rtt=self.rtt,
                        **self.options)
        self._running = run
        self._last = self.reactor.seconds()
        self.runs += 1
        self.log.debug("discovery: {kind} run ({why})", kind="fast" if fast else "full", why=why)
        run.decided.addCallback(self._found)
        d = run.run()
        d.addCallback(self._found)
        d.addErrback(lambda f: self.log.failure("discovery run failed", f))
        d.addBoth(self._ended, run)

    def _found(self, result):
        answered = result.behaviour.public is not None
        if answered or self.current is None:
            info = to_nat_info(result)
            self.result = result
            if info != self.current:
                self.current = info
                for callback in list(self._subscribers):
                    try:
                        callback(info)
                    except Exception:
                        self.log.failure("NAT subscriber failed")
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.current)
        return result

    def _ended(self, _, run):
        if self._running is run:
            self._running = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:  # a run that ended without deciding (it failed)
            d.callback(self.current or NatInfo())
        if run.fast and self.result is not None and \
                self.result.behaviour.allocation == "sequential":
            # A fast run has one burst, so no rate; a sequential NAT's
            # prediction window needs it: a full run now, in the background.
            self._run(fast=False, why="the rate of a sequential NAT")


class NatStore:
    """
    The NAT a previous process measured towards the same lobby from the same
    interface, kept in a small JSON file (the client's directory): a hint
    that lets ``p2pnat peer connect`` send its connect request right behind
    its login, before this process's own discovery answers (about one round
    trip later; see :class:`p2pnat.peer.client.LobbyClient`).  What
    discovery then finds is the truth: a request made on a hint it
    contradicts is made again.

    :meth:`load` gives the hint only when it is at most :data:`MAX_AGE`
    seconds old (by ``clock``, an ``IReactorTime``) and for the same
    lobby addresses and interface; a missing, unreadable or malformed file
    is no hint.  :meth:`save` writes atomically (a temporary file renamed)
    and never raises: a directory we cannot write to only costs the hint.
    """

    log = Logger(namespace="p2pnat.discovery")

    #: Seconds a stored NAT is used as a hint.
    MAX_AGE = 3600.0
    #: The file is never read beyond this many bytes.
    MAX_SIZE = 4096

    def __init__(self, path, clock):
        self.path = path
        self.clock = clock

    @staticmethod
    def _key(servers, interface):
        return [[str(h), int(p)] for h, p in servers], str(interface)

    def load(self, servers, interface):
        """The stored :class:`NatInfo` and whether the lobby relays candidates, or None."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.loads(f.read(self.MAX_SIZE + 1)[:self.MAX_SIZE])
            servers_key, interface_key = self._key(servers, interface)
            if data.get("servers") != servers_key or data.get("interface") != interface_key:
                return None
            age = self.clock.seconds() - float(data["measured"])
            if not 0 <= age <= self.MAX_AGE:
                return None
            n = data["nat"]
            nat = NatInfo(str(n["mapping"]), str(n["filtering"]), str(n["allocation"]),
                          int(n["step"]), float(n["rate"]))
            if nat.mapping not in MAPPINGS or nat.filtering not in MAPPINGS or \
                    nat.allocation not in ALLOCATIONS or nat.mapping == UNKNOWN or \
                    not 0 <= nat.step <= 65535 or not 0 <= nat.rate <= 6553.5:
                return None
            return nat, bool(data.get("lobby_candidates", False))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.log.info("NAT hint {path} ignored: {error}", path=self.path, error=e)
            return None

    def save(self, servers, interface, nat, lobby_candidates=False):
        """Keep C{nat} (a measured :class:`NatInfo`) as the hint for the next process."""
        if nat is None or nat.mapping == UNKNOWN:
            return
        servers_key, interface_key = self._key(servers, interface)
        data = {"servers": servers_key, "interface": interface_key,
                "measured": self.clock.seconds(), "lobby_candidates": bool(lobby_candidates),
                "nat": {"mapping": nat.mapping, "filtering": nat.filtering,
                        "allocation": nat.allocation, "step": nat.step, "rate": nat.rate}}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as e:
            self.log.info("cannot keep the NAT hint in {path}: {error}", path=self.path,
                          error=e)
            try:
                os.unlink(tmp)
            except OSError:
                pass


_CACHES = weakref.WeakKeyDictionary()  # reactor -> {(interface, servers): NatCache}


def nat_cache(reactor, servers, interface=None):
    """
    This process's :class:`NatCache` for ``reactor``, the lobby addresses
    ``servers`` and ``interface`` (default: :func:`source_address` of the
    primary), made on first use.
    """
    servers = tuple(tuple(s) for s in servers)
    if interface is None:
        interface = source_address(servers[0])
    try:
        caches = _CACHES.setdefault(reactor, {})
    except TypeError:  # a reactor that cannot be weakly referenced: no sharing
        return NatCache(reactor, servers, interface)
    cache = caches.get((interface, servers))
    if cache is None:
        cache = caches[(interface, servers)] = NatCache(reactor, servers, interface)
    return cache


def parse_nat(text):
    """
    The NAT given as ``MAPPING/ALLOCATION[/STEP[/RATE]]`` (the ``--nat`` of
    ``p2pnat peer``), as a :class:`p2pnat.protocol.p2p.NatInfo` with
    unknown filtering.  A sequential allocation without a step has step 1.

    :raises ValueError: with a message that names the expected form.
    """
    form = (f"--nat: expected MAPPING/ALLOCATION[/STEP[/RATE]] with MAPPING in"
            f" {', '.join(MAPPINGS)} and ALLOCATION in {', '.join(ALLOCATIONS)}")
    parts = text.split("/")
    if not 2 <= len(parts) <= 4 or parts[0] not in MAPPINGS or parts[1] not in ALLOCATIONS:
        raise ValueError(form)
    try:
        step = int(parts[2]) if len(parts) > 2 else (1 if parts[1] == "sequential" else 0)
        rate = float(parts[3]) if len(parts) > 3 else 0.0
    except ValueError:
        raise ValueError(f"{form}; STEP a whole number, RATE a number, got {text!r}") from None
    # The bounds of the wire's NatInfo (a signed 16-bit step, rate in tenths).
    if not -32768 <= step <= 32767 or not 0 <= rate <= 6553.5:
        raise ValueError(f"--nat: STEP must be -32768..32767 and RATE 0..6553.5, got {text!r}")
    return NatInfo(parts[0], "unknown", parts[1], step, rate)


def cached_for(reactor, lobby, interface=None):
    """
    The process's :class:`NatCache` (see :func:`nat_cache`) whose primary
    lobby address is ``lobby`` (and interface ``interface`` if given), or
    None when discovery never ran from one.
    """
    lobby = tuple(lobby)
    try:
        caches = _CACHES.get(reactor, {})
    except TypeError:
        return None
    for (iface, servers), cache in caches.items():
        if servers[0] == lobby and (interface is None or iface == interface):
            return cache
    return None


def discover_nat(reactor, servers, *, interface=None, given=None, **options):
    """
    This host's NAT as the lobby and the peer are told of it: C{given}
    (``MAPPING/ALLOCATION[/STEP[/RATE]]``, see :func:`parse_nat`) unless it
    is None, which sends nothing, else as this process's :class:`NatCache`
    for the lobby addresses C{servers} knows it (:func:`nat_cache`; a fresh
    one with C{options} for :class:`Discovery`): at once once measured,
    else after a fast run's first round trip.  A Deferred firing with a
    :class:`p2pnat.protocol.p2p.NatInfo`; it fails with ValueError for a
    malformed C{given}.
    """
    if given is not None:
        return defer.maybeDeferred(parse_nat, given)
    if options:
        return NatCache(reactor, servers, interface, **options).get()
    return nat_cache(reactor, servers, interface).get()


def to_nat_info(found):
    """
    What the lobby and the peer are told of a :class:`DiscoveryResult` (or
    a :class:`NatBehaviour`): the wire's
    :class:`p2pnat.protocol.p2p.NatInfo`.
    """
    b = getattr(found, "behaviour", found)
    return NatInfo(b.mapping, b.filtering, b.allocation, b.step or 0, b.rate or 0.0)


# --- command line ---------------------------------------------------------------


def _address(text):
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    try:
        portnum = int(port)
        if not 0 < portnum < 65536:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    try:
        info = socket.getaddrinfo(host, portnum, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise argparse.ArgumentTypeError(f"{host}: {e.strerror}") from None
    return info[0][4][0], portnum


def main(argv=None):
    """
    ``python -m p2pnat.peer.discovery LOBBY_ADDR...``: run discovery and
    print the NAT behaviour as one JSON line.  Exits with status 0, or 1
    when the lobby did not answer.
    """
    parser = argparse.ArgumentParser(
        prog="python -m p2pnat.peer.discovery",
        description="Discover how this host's NAT maps, filters and allocates UDP ports, "
        "using the STUN service of a p2pnat lobby (or any RFC 5780 STUN server). "
        "Give the primary address first, e.g. 198.18.1.1:3478 198.18.1.1:3479 "
        "(a lobby with two IPs: also 198.18.1.2:3478 198.18.1.2:3479).")
    parser.add_argument("servers", nargs="+", type=_address, metavar="LOBBY_ADDR")
    parser.add_argument("--bind", help="local IP to send from (default: the route's source)")
    parser.add_argument("--sockets", type=int, default=4,
                        help="fresh sockets per allocation burst (default: 4)")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds between the two bursts (default: 0.5)")
    parser.add_argument("--observations", action="store_true",
                        help="include every probe in the output")
    args = parser.parse_args(argv)
    if not 1 <= args.sockets <= 64 or not 0 <= args.pause <= 5:
        parser.error("--sockets must be 1-64 and --pause 0-5 seconds")
    try:
        interface = args.bind or source_address(args.servers[0])
    except OSError as e:
        parser.exit(1, f"discovery: no route to {args.servers[0][0]}: {e.strerror}\n")

    async def run(reactor):
        result = await discover(reactor, args.servers, interface=interface, sockets=args.sockets,
                                pause=args.pause)
        print(json.dumps(result.to_json(args.observations)), flush=True)
        if result.behaviour.public is None:
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
