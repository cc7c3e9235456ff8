# -*- test-case-name: tests.unit.test_netcheck_run -*-
"""
``p2pnat netcheck``'s measurements: the sockets and timers behind
:mod:`p2pnat.protocol.netcheck`'s verdicts.

One :class:`NetCheck` run does everything at once, within one ``budget``
(seconds):

- a first STUN Binding request to the primary lobby address measures the
  round trip (RTT) and learns our mapped address; the retransmission
  timers of what follows are made from that RTT;
- then, together: NAT discovery (:class:`p2pnat.peer.discovery.Discovery`,
  the very run the P2P client makes), hairpinning (a request sent from
  that first socket to its own mapped address: does it come back?), a few
  Binding round trips to every address of every lobby and relay (IPv4 and
  IPv6 reachability, latency), and the gateway's port mapping protocols
  (an injected ``portmap`` callable, :func:`p2pnat.portmap.probe` by
  default);
- with a ``lifetime`` bound, afterwards: one socket per idle interval
  (:func:`p2pnat.protocol.netcheck.lifetime_intervals`) asks, idles, asks
  again; a longer interval stops once a shorter one saw its mapping go.

Sockets come from a ``listen(protocol, server)`` callable (the socket that
talks to ``server``), time from the ``clock``, so tests run it on a
:class:`~twisted.internet.task.Clock` with fake transports.  Whatever is
not done when the budget runs out is cut short and reported as such.
"""

from __future__ import annotations

from twisted.internet import defer, task

from p2pnat.daemon.logs import Logger
from p2pnat.peer.discovery import Discovery, StunSocket, source_address
from p2pnat.protocol import netcheck as V
from p2pnat.protocol import stun

__all__ = [
    "FIRST_GIVE_UP",
    "FIRST_SCHEDULE",
    "NetCheck",
    "Server",
    "default_portmap",
    "resolve",
    "timers",
    "udp_listener",
]

#: Retransmissions of the requests sent before any RTT is known.
FIRST_SCHEDULE = (0.0, 0.25, 0.6)
FIRST_GIVE_UP = 1.0
#: Bounds of the retransmission interval made from the measured RTT: at
#: least the discovery's own (a NAT's first packet may be slow), at most
#: what leaves room for three sends within the budget.
MIN_INTERVAL = 0.1
MAX_INTERVAL = 0.5
#: Seconds kept back from the budget for closing sockets and reporting.
MARGIN = 0.2


def timers(rtt, ceiling=MAX_INTERVAL):
    """
    ``(schedule, give_up)`` of the requests sent once a round trip of
    ``rtt`` seconds was measured: a retransmission after twice the RTT
    (bounded by :data:`MIN_INTERVAL` and ``ceiling``) and again
    after three times that, given up once the last one had three RTTs (at
    least 0.3 s) to come back.  At a LAN's RTT these are discovery's own
    timers.
    """
    interval = round(min(ceiling, max(MIN_INTERVAL, 2 * rtt)), 3)
    return (0.0, interval, round(3 * interval, 3)), round(3 * interval + max(0.3, 3 * rtt), 3)


class Server:
    """
    A lobby or relay as given: its ``role``, the ``name`` (``host:port``)
    and the ``addresses`` it resolved to (IPv4 and IPv6; empty: none), or
    the ``error`` that stopped the resolution.
    """

    def __init__(self, role, name, addresses, error=""):
        self.role = role
        self.name = name
        self.addresses = [tuple(a) for a in addresses]
        self.error = error


def _family(host):
    return "ipv6" if ":" in host else "ipv4"


class _HairpinSocket(StunSocket):
    """A :class:`StunSocket` that also sees a datagram it sent to itself come back."""

    _looped = None  # (the datagram, its Deferred)

    def hairpin(self, target, schedule, give_up):
        """
        Send a Binding request to ``target`` (our own mapped address) at
        each time of ``schedule``; a Deferred firing with True when it
        comes back to this socket, False after ``give_up`` seconds.
        """
        _, data = stun.binding_request()
        d = defer.Deferred()
        calls = [self.clock.callLater(t, self._send, data, target) for t in schedule[1:]]

        def done(result):
            for call in calls:
                if call.active():
                    call.cancel()
            self._looped = None
            if not d.called:
                d.callback(result)

        calls.append(self.clock.callLater(give_up, done, False))
        self._looped = (data, done)
        self._send(data, target)
        return d

    def datagramReceived(self, data, addr):
        if self._looped is not None and data == self._looped[0]:
            return self._looped[1](True)
        super().datagramReceived(data, addr)

    def close(self):
        if self._looped is not None:
            self._looped[1](False)
        super().close()


class NetCheck:
    """
    One ``p2pnat netcheck`` run.

    @param clock: an IReactorTime.
    @param listen: ``listen(protocol, server)`` opens a UDP socket for
        ``protocol`` from which ``server`` (``(ip, port)``) is reached and
        returns its listening port; it may raise OSError (no route).
    @param servers: the lobbies and relays (:class:`Server`) whose every
        address gets ``samples`` Binding round trips.
    @param discovery: the lobby addresses for NAT discovery, the primary
        first (empty: no discovery, hairpin or lifetime test).
    @param portmap: a callable returning a Deferred of the gateway's
        offer (``{"pcp", "nat-pmp", "upnp": bool, "external": str|None}``),
        given the seconds it may take; None: not tested.
    @param portmap_note: why port mapping is not tested, when it is not.
    @param lifetime: the longest idle interval of the mapping lifetime
        test, seconds (None: no test).
    @param budget: seconds for everything but the lifetime test.
    """

    log = Logger(namespace="p2pnat.netcheck")

    def __init__(self, clock, listen, servers=(), discovery=(), *, portmap=None,
                 portmap_note="", lifetime=None, budget=2.5, samples=3, sockets=4, pause=0.5):
        if not 0.5 <= budget <= 60:
            raise ValueError(f"budget must be 0.5-60 seconds, not {budget}")
        if not 1 <= samples <= 10:
            raise ValueError(f"samples must be 1-10, not {samples}")
        self.clock = clock
        self.listen = listen
        self.servers = list(servers)
        self.discovery = [tuple(a) for a in discovery]
        self.portmap = portmap
        self.portmap_note = portmap_note
        self.lifetime = lifetime
        self.budget = budget
        self.samples = samples
        self.sockets = sockets
        self.pause = pause
        self.notes = []
        self._ports = []
        self._start = None

    def run(self):
        """Start the run; a Deferred firing with a :class:`p2pnat.protocol.netcheck.Report`."""
        return defer.Deferred.fromCoroutine(self._run())

    # --- the parts ----------------------------------------------------------------

    def _remaining(self):
        return max(0.0, self.budget - MARGIN - (self.clock.seconds() - self._start))

    def _open(self, server, cls=StunSocket, schedule=FIRST_SCHEDULE, give_up=FIRST_GIVE_UP):
        sock = cls(self.clock, len(self._ports), schedule, give_up)
        port = self.listen(sock, server)
        self._ports.append((sock, port))
        return sock

    def _bounded(self, d, what, default):
        """``d``, cut short when the budget runs out: then ``default``, with a note."""
        def late(failure):
            failure.trap(defer.TimeoutError, defer.CancelledError)
            self.notes.append(f"{what}: not finished within the budget of {self.budget:g} s")
            return default

        return d.addTimeout(self._remaining(), self.clock).addErrback(late)

    async def _round_trips(self, server, address, schedule, give_up):
        """``samples`` Binding requests in turn to one address: a ServerResult."""
        result = {"role": server.role, "name": server.name, "address": address,
                      "family": _family(address[0])}
        try:
            sock = self._open(address, schedule=schedule, give_up=give_up)
        except OSError as e:
            return V.ServerResult(**result, error=e.strerror or str(e))
        public, rtts, answered = None, [], 0
        for _ in range(self.samples):
            retransmit = sock.schedule[1]
            probe = await sock.query(address)
            if probe.mapped is None:
                break  # not answered after retransmissions: the others would not be either
            answered += 1
            public = public or probe.mapped
            rtt = self.clock.seconds() - probe.sent
            rtts.extend(V.clean_rtts([rtt], retransmit))
            # The next samples' timers from this one, so that a slow path's
            # answers come before their retransmission and count.
            sock.schedule, sock.give_up = timers(rtt, ceiling=FIRST_GIVE_UP)
        return V.ServerResult(**result, public=public, rtts=tuple(rtts), answered=answered,
                              asked=answered + (answered < self.samples))

    async def _first(self):
        """The first request to the primary: (its socket, the probe, the RTT or None)."""
        sock = self._open(self.discovery[0], _HairpinSocket)
        probe = await sock.query(self.discovery[0])
        rtt = self.clock.seconds() - probe.sent if probe.mapped is not None else None
        return sock, probe, rtt

    async def _discover(self, schedule, give_up):
        primary = self.discovery[0]
        deadline = self._remaining()
        run = Discovery(self.discovery, self.clock, lambda proto: self.listen(proto, primary),
                        sockets=self.sockets, pause=self.pause, schedule=schedule,
                        give_up=give_up, deadline=deadline)
        found = await run.run()
        # Discovery starts no request it could not see through by its
        # deadline: a run whose first request was answered but that made
        # fewer than its plain requests (each lobby address, two bursts,
        # the filtering socket's first) skipped some tests.
        plain = [p for p in found.observations.probes if not p.change]
        full = len(self.discovery) + 2 * self.sockets + 1
        if plain and plain[0].mapped is not None and len(plain) < full:
            self.notes.append(f"NAT discovery: cut short by the budget of {self.budget:g} s "
                              f"(retransmissions after {schedule[1]:g} s): some tests were "
                              "not run")
        return found.behaviour

    async def _lifetime(self, maximum, schedule, give_up):
        intervals = V.lifetime_intervals(maximum)
        runs = {}

        async def one(t):
            sock = self._open(self.discovery[0], schedule=schedule, give_up=give_up)
            before = (await sock.query(self.discovery[0])).mapped
            await task.deferLater(self.clock, t, lambda: None)
            after = (await sock.query(self.discovery[0])).mapped
            if before is not None and after is not None and before != after:
                for longer, d in runs.items():
                    if longer > t:
                        d.cancel()  # a shorter idle already lost its mapping
            return t, before, after

        for t in intervals:
            runs[t] = defer.Deferred.fromCoroutine(one(t))
        results = await defer.DeferredList(list(runs.values()), consumeErrors=True)
        return [r for ok, r in results if ok]

    async def _run(self):
        self._start = self.clock.seconds()
        behaviour, hairpin, lifetime = None, None, None
        portmap, portmap_note = None, self.portmap_note
        try:
            jobs = []
            if self.portmap is not None:
                pm = self._bounded(defer.maybeDeferred(self.portmap, min(1.0, self._remaining())),
                                   "the port mapping probe", None)
                jobs.append(pm.addErrback(lambda f: self.notes.append(
                    f"port mapping probe failed: {f.getErrorMessage()}")))
            servers = []
            for server in self.servers:
                if not server.addresses:
                    self.notes.append(f"{server.role} {server.name}: "
                                      f"{server.error or 'no address'}")
                for address in server.addresses:
                    d = defer.Deferred.fromCoroutine(
                        self._round_trips(server, address, FIRST_SCHEDULE, FIRST_GIVE_UP))
                    servers.append(self._bounded(d, f"{server.role} {server.name}", None))
            if self.discovery:
                try:
                    first, probe, rtt = await self._bounded(
                        defer.Deferred.fromCoroutine(self._first()), "the first request",
                        (None, None, None))
                except OSError as e:
                    self.notes.append(f"discovery: cannot send to the lobby: {e.strerror or e}")
                    first, probe, rtt = None, None, None
                if rtt is not None:
                    schedule, give_up = timers(rtt)
                    found = self._bounded(defer.Deferred.fromCoroutine(
                        self._discover(schedule, give_up)), "NAT discovery", None)
                    looped = self._bounded(first.hairpin(probe.mapped, schedule, give_up),
                                           "the hairpin test", None)
                    behaviour = await found
                    hairpin = V.hairpin_verdict(probe.mapped, await looped)
                    if self.lifetime and behaviour is not None:
                        results = []
                        if not V.lifetime_untestable(behaviour):
                            results = await self._lifetime(self.lifetime, schedule, give_up)
                        lifetime = V.lifetime_verdict(results, behaviour)
                elif probe is not None:
                    self.notes.append(f"the lobby at {V.format_addr(self.discovery[0])} did not "
                                      "answer: NAT not measured")
            got = await defer.gatherResults(servers) if servers else []
            results = tuple(r for r in got if r is not None)
            if self.portmap is not None:
                portmap = (await defer.gatherResults(jobs))[0]
                if portmap is not None:
                    portmap = {k: portmap.get(k) for k in (*V.PORTMAP_PROTOCOLS, "external")}
                else:
                    portmap_note = "the probe gave no answer"
        finally:
            await self._close()
        return V.Report(behaviour, hairpin, lifetime, results, portmap, portmap_note,
                        self.clock.seconds() - self._start, self.budget, tuple(self.notes))

    async def _close(self):
        stops = []
        for sock, port in self._ports:
            sock.close()
            stopped = port.stopListening()
            if isinstance(stopped, defer.Deferred):
                stops.append(stopped)
        if stops:
            await defer.gatherResults(stops, consumeErrors=True)


# --- the real world ---------------------------------------------------------------------


def resolve(role, text, resolver=None):
    """
    A :class:`Server` for ``host:port`` (``[v6]:port`` too): every IPv4
    and IPv6 address ``resolver(host, port)`` gives (default
    ``socket.getaddrinfo``), or the resolution's error.
    """
    import socket

    from p2pnat.daemon.config import parse_hostport

    host, port = parse_hostport(text)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {text!r}")
    lookup = resolver or (lambda h, p: socket.getaddrinfo(h, p, type=socket.SOCK_DGRAM))
    try:
        infos = lookup(host, port)
    except (OSError, UnicodeError) as e:
        return Server(role, text, [], getattr(e, "strerror", None) or str(e))
    addresses = []
    for info in infos:
        if info[0] in (socket.AF_INET, socket.AF_INET6):
            a = (info[4][0], info[4][1])
            if a not in addresses:
                addresses.append(a)
    return Server(role, text, addresses)


def udp_listener(reactor, interface=None):
    """
    The ``listen`` of a real run: a UDP socket on ``interface`` (for the
    servers of its family) or on the address that routes to the server
    (:func:`~p2pnat.peer.discovery.source_address`), so that a public host
    is told from a NATed one.
    """
    def listen(proto, server):
        here = interface if interface and _family(interface) == _family(server[0]) else None
        return reactor.listenUDP(0, proto, interface=here or source_address(server))

    return listen


def default_portmap(reactor, gateway=None):
    """
    The ``portmap`` of a real run: :func:`p2pnat.portmap.probe` asking
    ``gateway`` (default: the default route's), and ``""``; or None and
    why, when this build has no port mapping support.
    """
    try:
        from p2pnat.portmap import probe
    except ImportError:
        return None, "this build has no port mapping support"
    return (lambda budget: probe(reactor, gateway=gateway, budget=budget)), ""
