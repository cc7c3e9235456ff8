# -*- test-case-name: tests.unit.test_relay_limits -*-
"""
How much of the relay, and of a device, one client may hold.

A relay serves many customers' devices from one host, and anyone on the
internet can open TCP connections to it.  So that nobody can take the
capacity of the relay or of another customer's device:

- L{ConnectionLimits}: open connections are counted in total, per kind
  (terminal connections, device tunnels) and per source address (an IPv6
  source by its /64, which one customer usually holds whole).  Terminals
  may use all but a reserve of the connections, which only device tunnels
  may use: a flood of terminal connections cannot stop devices from
  connecting back.  The total is sized below the process's open-file
  limit (L{size}), so the relay never runs out of descriptors: once at the
  cap, a new connection is closed at once instead of failing every
  listener with EMFILE.
- L{StreamShares}: one terminal source may hold at most so many of one
  device's tunnels at once (the device opens at most
  ``agent.max_tunnels``), so one anonymous client cannot make a device
  unreachable for everyone else.
- L{IdleWatch} and L{QuietProbe}: a stream that carried no byte either way
  for a while is closed, at no cost per byte (the probe traps the first
  chunk after each look, and only that one).

Everything here is plain logic on an injected clock; the transport code
(L{p2pnat.relay.terminal}, L{p2pnat.relay.tunnel}) and the daemon's tap
call it once per connection or per stream event, never per byte.
"""

from dataclasses import dataclass

from p2pnat.daemon.logs import Logger, Throttle  # noqa: F401 (Throttle re-exported)
from p2pnat.net.sources import source_of_host  # noqa: F401 (re-exported)
from p2pnat.relay.sessions import TooBusy

TERMINAL = "terminal"
TUNNEL = "tunnel"

#: Descriptors left to the daemon's own files below the open-file limit:
#: listeners, UDP sockets, the registry, logs, the thread pool's and the
#: metrics endpoint's connections.
SPARE_FDS = 64

#: The most connections sized from an unlimited (or huge) open-file limit.
MAX_AUTO = 1 << 20

#: Seconds between two log lines about refused connections of one kind and
#: reason (the ones in between are counted, and the count logged).
LOG_INTERVAL = 10.0



def source_of(addr):
    """
    The source a connection is counted under (L{source_of_host} of its
    host); ``"local"`` for an address without a host (UNIX sockets, tests).
    """
    return source_of_host(getattr(addr, "host", None))



@dataclass(frozen=True)
class Sizes:
    """The connection limits, all counts of open connections."""

    #: terminal connections and device tunnels together
    max_connections: int
    #: of those, how many only device tunnels may use
    tunnel_reserve: int
    #: terminal connections from one source
    terminals_per_source: int
    #: device tunnels from one source (devices behind one NAT share it)
    tunnels_per_source: int

    @property
    def max_terminals(self):
        return self.max_connections - self.tunnel_reserve


def size(nofile, max_connections=0, tunnel_share=0.5, terminals_per_source=256,
         tunnels_per_source=1024):
    """
    The L{Sizes} for a process whose open-file limit is C{nofile}.

    @param max_connections: the configured cap (0: C{nofile} less
        L{SPARE_FDS}); never more than that, whatever is configured, since
        a cap above the descriptors there are protects nothing.
    @param tunnel_share: the share of C{max_connections} kept for tunnels.
    @return: ``(sizes, clamped)``: C{clamped} is whether the configured
        cap was lowered to fit the open-file limit.
    """
    if nofile < 0 or nofile > MAX_AUTO + SPARE_FDS:  # RLIM_INFINITY, or huge
        nofile = MAX_AUTO + SPARE_FDS
    room = max(2, nofile - SPARE_FDS)
    clamped = max_connections > room
    total = room if max_connections == 0 or clamped else max_connections
    reserve = min(total - 1, int(total * tunnel_share))
    return Sizes(total, reserve, terminals_per_source, tunnels_per_source), clamped


class Slot:
    """One admitted connection; L{release} it when the connection is gone."""

    __slots__ = ("_limits", "kind", "source")

    def __init__(self, limits, kind, source):
        self._limits = limits
        self.kind = kind
        self.source = source

    def release(self):
        """Give the slot back (again: nothing)."""
        limits, self._limits = self._limits, None
        if limits is not None:
            limits._release(self.kind, self.source)


class ConnectionLimits:
    """
    Admits or refuses new connections against L{Sizes}.

    The tables hold one entry per source with an open connection, so they
    are bounded by C{max_connections}.

    @param count: C{count(outcome)} counts a refusal (the relay's
        p2pnat_sessions_total metric, as ``refused-KIND-REASON``).
    """

    log = Logger(namespace="p2pnat.relay.limits")

    def __init__(self, sizes, clock, count=lambda outcome: None):
        self.sizes = sizes
        self.count = count
        self.throttle = Throttle(clock)
        self.total = 0
        self.open = {TERMINAL: 0, TUNNEL: 0}
        self._per_source = {TERMINAL: {}, TUNNEL: {}}
        self._cap = {TERMINAL: sizes.terminals_per_source, TUNNEL: sizes.tunnels_per_source}

    def admit(self, kind, source):
        """
        A new connection of C{kind} (L{TERMINAL} or L{TUNNEL}) from
        C{source} (L{source_of}).

        @return: its L{Slot}, or None when it must be closed at once.
        """
        per_source = self._per_source[kind]
        n = per_source.get(source, 0)
        if self.total >= self.sizes.max_connections:
            refused = "total"
        elif kind == TERMINAL and self.open[TERMINAL] >= self.sizes.max_terminals:
            refused = "reserve"
        elif n >= self._cap[kind]:
            refused = "per-source"
        else:
            refused = None
        if refused is not None:
            self._refused(kind, refused, source)
            return None
        per_source[source] = n + 1
        self.open[kind] += 1
        self.total += 1
        return Slot(self, kind, source)

    def from_source(self, kind, source):
        """How many connections of C{kind} C{source} has open."""
        return self._per_source[kind].get(source, 0)

    def _release(self, kind, source):
        per_source = self._per_source[kind]
        n = per_source[source] - 1
        if n:
            per_source[source] = n
        else:
            del per_source[source]
        self.open[kind] -= 1
        self.total -= 1

    def _refused(self, kind, reason, source):
        self.count(f"refused-{kind}-{reason}")
        held = self.throttle((kind, reason))
        if held is not None:
            limit = {"total": self.sizes.max_connections, "reserve": self.sizes.max_terminals,
                     "per-source": self._cap[kind]}[reason]
            self.log.warn("{kind} connection from {source} refused: " + _WHY[reason]
                          + " ({held} more refused since the last such line)", kind=kind,
                          source=source, limit=limit, held=held)


_WHY = {"total": "the relay holds {limit} connections, its most",
        "reserve": "terminals hold {limit} connections, all but the tunnels' reserve",
        "per-source": "this source holds {limit} {kind} connections, the most for one"}


class TooManyStreams(TooBusy):
    """The terminal's source holds as many of the device's tunnels as one may (503)."""


class StreamShares:
    """
    How many of one device's tunnels each terminal source holds (waiting
    for one, or streaming): at most C{per_source} at once (0: no limit).
    A holder (a terminal connection) holds at most one, for one device;
    asking again for the same device is free (a retry on a new tunnel).
    """

    def __init__(self, per_source):
        self.per_source = per_source
        self._held = {}  # (device ID, source) -> count
        self._holders = {}  # holder -> (device ID, source)

    def take(self, holder, device_id, source):
        """Whether C{holder} may hold one of C{device_id}'s tunnels (it then does)."""
        key = (device_id, source)
        current = self._holders.get(holder)
        if current == key:
            return True
        if current is not None:
            self.release(holder)
        n = self._held.get(key, 0)
        if n >= self.per_source > 0:
            return False
        self._held[key] = n + 1
        self._holders[holder] = key
        return True

    def release(self, holder):
        """C{holder} holds nothing any more."""
        key = self._holders.pop(holder, None)
        if key is None:
            return
        n = self._held[key] - 1
        if n:
            self._held[key] = n
        else:
            del self._held[key]

    def held(self, device_id, source):
        return self._held.get((device_id, source), 0)


class QuietProbe:
    """
    Whether any byte went down some direct data paths since it was last
    asked, at no cost per byte.

    A path is C{(obj, attribute)}: the attribute holds the one-argument
    callable each chunk is handed to, or None.  Each L{quiet} puts a
    one-shot trap in each path; the first chunk after it springs the trap,
    which puts the callable back and passes the chunk on (one extra call
    per look, not per chunk).  A trap still in place at the next look
    means nothing went that way.
    """

    def __init__(self, paths):
        self.paths = paths
        self._traps = [None] * len(paths)

    def quiet(self):
        quiet = True
        for i, (obj, attr) in enumerate(self.paths):
            current = getattr(obj, attr, None)
            if current is None or current is self._traps[i]:
                continue
            quiet = False  # sprung, or the path was set anew: data went, or may go
            trap = self._traps[i] = _trap(obj, attr, current)
            setattr(obj, attr, trap)
        return quiet


def _trap(obj, attr, target):
    def trap(data):
        setattr(obj, attr, target)
        target(data)
    return trap


class IdleWatch:
    """
    Calls C{on_idle()} once C{is_quiet()} (see L{QuietProbe}) has answered
    True for C{timeout} seconds in a row.  It asks every C{timeout/checks}
    seconds, so an idle stream ends between C{timeout} and
    C{timeout * (1 + 1/checks)} seconds after its last byte, never sooner.
    """

    def __init__(self, clock, timeout, is_quiet, on_idle, checks=4):
        self.clock = clock
        self.timeout = timeout
        self.period = timeout / checks
        self.is_quiet = is_quiet
        self.on_idle = on_idle
        self.quiet_since = clock.seconds()
        self._call = clock.callLater(self.period, self._check)

    def _check(self):
        self._call = None
        now = self.clock.seconds()
        if not self.is_quiet():
            self.quiet_since = now
        elif now - self.quiet_since >= self.timeout:
            return self.on_idle()
        self._call = self.clock.callLater(self.period, self._check)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
