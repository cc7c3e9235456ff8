# -*- test-case-name: tests.unit.test_nat -*-
"""
NAT behaviour and hole-punch planning: pure logic, no sockets, no clock.

- :class:`Observations` / :class:`Probe`: the raw results of a discovery
  run (:mod:`p2pnat.peer.discovery` makes them);
- :func:`classify`: observations -> :class:`NatBehaviour` (RFC 5780
  mapping and filtering, port allocation, the port consumption rate);
- port prediction for the seed's window:
  :func:`window_size`, :func:`window_hit_probability`, :func:`predict_ports`;
- :func:`plan`: two behaviours -> :class:`Plan`, which strategy each side
  runs and with what parameters.

The words used for behaviours are those of RFC 4787 / RFC 5780 and of the
wire's ``NatInfo`` (:data:`MAPPINGS`, :data:`FILTERINGS`,
:data:`ALLOCATIONS`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import reduce

__all__ = [
    "MAPPINGS",
    "FILTERINGS",
    "ALLOCATIONS",
    "CHANGES",
    "STRATEGIES",
    "ACTIONS",
    "Probe",
    "Observations",
    "NatBehaviour",
    "classify",
    "window_size",
    "window_hit_probability",
    "predict_ports",
    "birthday_probes",
    "birthday_hit_probability",
    "Role",
    "Direct",
    "Predict",
    "Birthday",
    "Plan",
    "plan",
]

UNKNOWN = "unknown"
NONE = "none"
EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"

#: Mapping behaviours; ``none``: no NAT (the mapped address is the local one).
MAPPINGS = (UNKNOWN, NONE, EI, AD, APD)
#: Filtering behaviours; ``none``: no NAT and nothing filtered.
FILTERINGS = (UNKNOWN, NONE, EI, AD, APD)
#: Port allocation: the mapped port is the local one (``preserving``), the
#: previous mapping's plus a fixed ``step`` (``sequential``), or neither.
ALLOCATIONS = (UNKNOWN, "preserving", "sequential", "random")
#: CHANGE-REQUEST variants a probe can carry ("" for none).
CHANGES = ("", "port", "ip", "ip+port")

#: The lowest and highest port a NAT hands out, as far as we know.
PORT_RANGE = (1024, 65535)

# classify(): two consecutive new mappings count as sequential when the
# second is above the first by at most this many ports, or by what other
# traffic could take at MAX_RATE ports per second in the time between them.
_SEQ_GAP = 32
_MAX_RATE = 1000.0


# --- observations ---------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """
    One Binding request of a discovery run and what came of it.

    ``socket`` numbers the local sockets of the run (0: the main one, which
    queries every lobby address); ``local`` is that socket's address;
    ``server`` the lobby address the request went to; ``sent`` when it was
    first sent (seconds, any origin); ``change`` the CHANGE-REQUEST it
    carried (one of :data:`CHANGES`).  ``mapped`` is the mapped address of
    the answer (``None``: no answer, after retransmissions), ``answered_from``
    the answer's source address, and ``refused`` says the server answered
    with an error (420: it cannot change address).
    """

    socket: int
    local: tuple[str, int]
    server: tuple[str, int]
    sent: float
    mapped: tuple[str, int] | None = None
    change: str = ""
    refused: bool = False
    answered_from: tuple[str, int] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("local", "server", "mapped", "answered_from"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> Probe:
        d = dict(d)
        for k in ("local", "server", "mapped", "answered_from"):
            if d.get(k) is not None:
                d[k] = (d[k][0], int(d[k][1]))
        return cls(**d)


@dataclass(frozen=True)
class Observations:
    """
    Everything a discovery run saw: the lobby ``servers`` it used (the
    first is the primary, which the allocation and filtering probes go to)
    and its ``probes`` in the order they were sent.
    """

    servers: tuple[tuple[str, int], ...]
    probes: tuple[Probe, ...] = ()

    def to_json(self) -> dict:
        return {"servers": [list(s) for s in self.servers],
                "probes": [p.to_json() for p in self.probes]}

    @classmethod
    def from_json(cls, d: dict) -> Observations:
        return cls(tuple((s[0], int(s[1])) for s in d["servers"]),
                   tuple(Probe.from_json(p) for p in d["probes"]))


# --- behaviour ------------------------------------------------------------------


@dataclass(frozen=True)
class NatBehaviour:
    """
    How a host's NAT (the outermost one, when there are several) treats
    UDP, as far as discovery could tell.

    - ``mapping``, ``filtering``: one of :data:`MAPPINGS` / :data:`FILTERINGS`.
      When a test could not be run (a lobby with one IP cannot tell
      address-dependent from endpoint-independent behaviour), the most
      restrictive behaviour consistent with what was seen is given for
      filtering, the usual one for mapping, and ``notes`` says so.
    - ``allocation``: one of :data:`ALLOCATIONS`; ``step`` the port increment
      of a ``sequential`` NAT (0 otherwise).
    - ``rate``: ports per second other traffic behind the same NAT consumed
      during the run (sequential NATs only; ``None`` when not measurable).
    - ``public``: the main socket's mapped address as the primary lobby
      address saw it; ``local``: that socket's own address.
    - ``hairpin``, ``lifetime``: not tested by discovery (``None``).
    - ``notes``: caveats, for people.
    """

    mapping: str = UNKNOWN
    filtering: str = UNKNOWN
    allocation: str = UNKNOWN
    step: int = 0
    rate: float | None = None
    public: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    hairpin: bool | None = None
    lifetime: float | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping {self.mapping!r} not one of {MAPPINGS}")
        if self.filtering not in FILTERINGS:
            raise ValueError(f"filtering {self.filtering!r} not one of {FILTERINGS}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r} not one of {ALLOCATIONS}")

    @property
    def nat(self) -> bool | None:
        """True behind a NAT, False without one, None when unknown."""
        if self.mapping == UNKNOWN:
            return None
        return self.mapping != NONE

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("public", "local"):
            if d[k] is not None:
                d[k] = f"{d[k][0]}:{d[k][1]}"
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> NatBehaviour:
        d = dict(d)
        for k in ("public", "local"):
            if d.get(k):
                host, _, port = d[k].rpartition(":")
                d[k] = (host, int(port))
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)


def classify(obs: Observations) -> NatBehaviour:
    """
    The NAT behaviour the observations of one discovery run show.

    - No NAT: every answer maps a socket to its own address.
    - Mapping (RFC 5780 4.3), from the main socket's mapped address at each
      lobby address: the same everywhere -> endpoint-independent; different
      for two ports of one IP -> address-and-port-dependent; different only
      across IPs -> address-dependent.
    - Allocation, from every new mapping in the order the probes were sent:
      the local port kept (all but at most one) -> preserving; each above
      the previous by a small multiple of one step (three quarters of the
      time at least, which tolerates one wrap of the NAT's port range) ->
      sequential, step the greatest common divisor; otherwise random.
    - Rate (sequential): the ports the NAT handed out between two of our
      mappings that we did not take ourselves, over the time between them.
    - Filtering (RFC 5780 4.4), from the change-request probes of the
      filtering socket: an answer from the other IP and port ->
      endpoint-independent; only from the other port -> address-dependent;
      none -> address-and-port-dependent; a lobby that refused (420) or
      lacks a test -> the most restrictive reading, with a note.
    """
    notes: list[str] = []
    normal = [p for p in obs.probes if not p.change]
    answered = [p for p in normal if p.mapped is not None]
    if not answered:
        return NatBehaviour(notes=("no answer from the lobby",))
    primary = obs.servers[0] if obs.servers else answered[0].server
    main = 0 if any(p.socket == 0 for p in answered) else answered[0].socket
    main_probes = [p for p in answered if p.socket == main]
    at_primary = [p for p in main_probes if p.server == primary] or main_probes
    public = at_primary[0].mapped
    local = at_primary[0].local
    nat = any(p.mapped != p.local for p in answered)
    if any(_wildcard(p.local[0]) for p in answered):
        notes.append("local address unknown (wildcard socket): NAT presence guessed")
        nat = any(p.mapped[1] != p.local[1] for p in answered)

    mapping = _mapping(main_probes, nat, notes)
    allocation, step, rate = _allocation(obs, nat, notes)
    filtering = _filtering([p for p in obs.probes if p.change], nat, notes)
    return NatBehaviour(mapping=mapping, filtering=filtering, allocation=allocation, step=step,
                        rate=rate, public=public, local=local, notes=tuple(notes))


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _mapping(main_probes: list[Probe], nat: bool, notes: list[str]) -> str:
    if not nat:
        return NONE
    seen: dict[tuple[str, int], tuple[str, int]] = {}
    for p in main_probes:
        seen.setdefault(p.server, p.mapped)
    if len(seen) < 2:
        notes.append("only one lobby address answered: mapping not tested")
        return UNKNOWN
    servers = list(seen)
    if len(set(seen.values())) == 1:
        if len({s[0] for s in servers}) < 2:
            notes.append("one lobby IP: an address-dependent mapping would look "
                         "endpoint-independent")
        return EI
    for i, a in enumerate(servers):
        for b in servers[i + 1:]:
            if a[0] == b[0] and seen[a] != seen[b]:
                return APD
    return AD


def _allocation(obs: Observations, nat: bool, notes: list[str]):
    """``(allocation, step, rate)``."""
    if not nat:
        return "preserving", 0, None
    normal = sorted((p for p in obs.probes if not p.change), key=lambda p: p.sent)
    answered_sockets = {p.socket for p in normal if p.mapped is not None}
    events = []  # (time, mapped port, local port): each new mapping, in order
    lost = []  # times of flows that may have taken a port we never saw
    seen = set()
    for p in normal:
        if p.mapped is None:
            if p.socket not in answered_sockets:
                lost.append(p.sent)
            continue
        if p.mapped not in seen:
            seen.add(p.mapped)
            events.append((p.sent, p.mapped[1], p.local[1]))
    if len(events) < 3:
        notes.append(f"{len(events)} mappings seen: allocation not tested")
        return UNKNOWN, 0, None
    kept = sum(1 for _, port, local in events if port == local)
    if kept >= 2 and kept >= len(events) - 1:
        return "preserving", 0, None
    pairs = []  # (port difference, seconds, our lost flows in between)
    for (t0, p0, _), (t1, p1, _) in zip(events, events[1:]):
        d, dt = p1 - p0, max(0.0, t1 - t0)
        if 0 < d <= max(_SEQ_GAP, _MAX_RATE * dt):
            pairs.append((d, dt, sum(1 for t in lost if t0 < t < t1)))
    if len(pairs) < 2 or len(pairs) < math.ceil(0.75 * (len(events) - 1)):
        return "random", 0, None
    step = reduce(math.gcd, (d for d, _, _ in pairs))
    others = sum(d // step - 1 - n for d, _, n in pairs)
    seconds = sum(dt for _, dt, _ in pairs)
    rate = round(max(0, others) / seconds, 1) if seconds > 0 else None
    return "sequential", step, rate


def _filtering(probes: list[Probe], nat: bool, notes: list[str]) -> str:
    results: dict[str, str] = {}
    rank = {"silent": 0, "refused": 1, "answered": 2}
    for p in probes:
        state = "answered" if p.mapped is not None else "refused" if p.refused else "silent"
        if rank[state] >= rank[results.get(p.change, "silent")]:
            results[p.change] = state
    both, port, ip = results.get("ip+port"), results.get("port"), results.get("ip")
    tested = [r for r in (both, port, ip) if r in ("answered", "silent")]
    if not tested:
        notes.append("the lobby cannot answer from another address: filtering not tested")
        return UNKNOWN
    if both == "answered" or (ip == "answered" and port == "answered"):
        return NONE if not nat else EI
    if port == "answered":
        if both != "silent" and ip != "silent":
            notes.append("one lobby IP: endpoint-independent filtering would look "
                         "address-dependent")
        return AD
    if port is None or port == "refused":
        notes.append("change-port not available: filtering taken as address-and-port-dependent")
    return APD


# --- port prediction -----------------------------------------------------------------


def window_size(rate: float | None, delay: float, *, margin: float = 2.0, low: int = 4,
                high: int = 64) -> int:
    """
    The seed's ``n``: how many consecutive new ports the window side opens
    (and how far ahead the one packet aims).  Other traffic takes about
    ``rate * delay`` ports between the observation of the window side's
    port and its burst; ``n >= 1 + rate * delay * margin``, kept within
    ``[low, high]`` (a larger window costs packets and time, and a NAT
    that moves that fast is better left to the relay).
    """
    rate = max(0.0, rate or 0.0)
    n = math.ceil(1 + rate * max(0.0, delay) * margin)
    return max(low, min(high, n))


def window_hit_probability(rate: float | None, delay: float, n: int) -> float:
    """
    The chance that the window of ``n`` covers the predicted port: other
    traffic (Poisson, ``rate`` ports per second over ``delay`` seconds) must
    take at most ``n - 1`` ports before the burst.
    """
    lam = max(0.0, rate or 0.0) * max(0.0, delay)
    if n < 1:
        return 0.0
    term = total = math.exp(-lam)
    for k in range(1, n):
        term *= lam / k
        total += term
    return min(1.0, total)


def predict_ports(base: int, step: int, count: int, *, start: int = 1,
                  port_range: tuple[int, int] = PORT_RANGE) -> list[int]:
    """
    The ports a sequential NAT hands out after ``base``: ``base + step*k``
    for ``k`` in ``start .. start+count-1``, wrapped into ``port_range``.
    """
    lo, hi = port_range
    span = hi - lo + 1
    return [lo + (base + step * k - lo) % span for k in range(start, start + count)]


def birthday_probes(sockets: int, probability: float = 0.999,
                    port_range: tuple[int, int] = PORT_RANGE) -> int:
    """
    How many probes at random ports find one of ``sockets`` open mappings
    spread over ``port_range`` with the given ``probability``.
    """
    space = port_range[1] - port_range[0] + 1
    miss = 1.0 - min(sockets, space) / space
    if miss <= 0.0:
        return 1
    return math.ceil(math.log(1.0 - probability) / math.log(miss))


def birthday_hit_probability(sockets: int, probes: int,
                             port_range: tuple[int, int] = PORT_RANGE) -> float:
    """The chance that ``probes`` random ports hit one of ``sockets`` open ones."""
    space = port_range[1] - port_range[0] + 1
    return 1.0 - (1.0 - min(sockets, space) / space) ** max(0, probes)


# --- strategies --------------------------------------------------------------------

#: Strategies, in the order plan() prefers them.
STRATEGIES = ("direct", "simultaneous-open", "predict", "birthday", "relay")

#: What a side can be asked to do.
ACTIONS = {
    "send-local": "probe the peer's local addresses (same LAN) from the punch socket",
    "send": "probe the peer's public address from the punch socket (the one the lobby saw)",
    "answer": "answer the peer's probes on the punch socket",
    "open-ip": "send one probe from the punch socket to the peer's public IP (any port), "
    "which opens an address-dependent filter, then answer",
    "one-packet": "send one probe from the next new local port (or the punch socket when "
    "the mapping does not move) to the window side's predicted port",
    "window": "send probes from n new local ports to the one-packet side's predicted port",
    "sockets": "open many new sockets, each probing the easy side's public address",
    "spray": "probe random ports of the random side's public IP from the punch socket, "
    "at a bounded rate for a bounded time",
    "relay": "send through the lobby's relay",
}

_MINE, _PEER = "mine", "peer"


def _other(side: str) -> str:
    return {_MINE: _PEER, _PEER: _MINE}.get(side, side)


@dataclass(frozen=True)
class Role:
    """
    One side's part of a strategy: an :data:`ACTIONS` key, and whether its
    first probe should go out with a low TTL: one that passes this side's
    own NAT(s), so that they open the mapping, but expires before the
    peer's NAT, which would otherwise see an unsolicited packet (and might
    drop it noisily, count it as a scan, or keep a conntrack entry that
    takes the very port the punch needs).
    """

    action: str
    low_ttl: bool = False


@dataclass(frozen=True)
class Direct:
    """
    ``initiator`` ("mine", "peer" or "both") sends first; ``local``: to the
    peer's local addresses (same public IP: probably the same LAN).
    """

    initiator: str
    local: bool = False

    def mirrored(self) -> Direct:
        return replace(self, initiator=_other(self.initiator))


@dataclass(frozen=True)
class Predict:
    """
    The seed's port prediction window (steps 4-5 of the published method; docs/protocol.rst).

    The one-packet side sends one probe to the window side's port predicted
    ``n`` allocations ahead (``window_base + step * n``), from its own next
    port (``one_base + one_step``; ``one_step`` 0: the punch socket, whose
    mapping does not move); right after, the window side sends from ``n``
    consecutive new local ports to that one port.  Its NAT maps them to
    ``window_base + step * (m .. m+n-1)``, where ``m - 1`` counts ports
    other traffic took meanwhile; one of them is the predicted port when
    ``m <= n``.  ``hit_probability`` is the chance of that for the rates
    measured (and of the one-packet side's next port being the predicted
    one).  Bases are the last ports the lobby saw; :meth:`rebase` sets
    fresh ones.
    """

    window_side: str
    n: int
    step: int
    one_step: int = 0
    window_base: int | None = None
    one_base: int | None = None
    hit_probability: float = 1.0

    def mirrored(self) -> Predict:
        return replace(self, window_side=_other(self.window_side))

    def rebase(self, window_base: int | None = None, one_base: int | None = None) -> Predict:
        """The same plan from newly observed ports."""
        return replace(self,
                       window_base=self.window_base if window_base is None else window_base,
                       one_base=self.one_base if one_base is None else one_base)

    @property
    def one_packet_target(self) -> int | None:
        """The window side's port the one packet is sent to."""
        if self.window_base is None:
            return None
        return predict_ports(self.window_base, self.step, 1, start=self.n)[0]

    @property
    def one_packet_source(self) -> int | None:
        """The public port the one packet is expected to leave from."""
        if self.one_base is None:
            return None
        if not self.one_step:
            return self.one_base
        return predict_ports(self.one_base, self.one_step, 1)[0]

    @property
    def window_target(self) -> int | None:
        """The port the window side's ``n`` probes go to (the one packet's source)."""
        return self.one_packet_source

    @property
    def window_ports(self) -> list[int] | None:
        """Where the window's probes leave from if no other traffic intervenes."""
        if self.window_base is None:
            return None
        return predict_ports(self.window_base, self.step, self.n)


@dataclass(frozen=True)
class Birthday:
    """
    Birthday-paradox punching against a random-port symmetric NAT.  The
    random side opens ``sockets`` sockets, each probing the easy side's
    public address ``target`` (each makes a mapping at a random port, open
    to that address only); the easy side probes random ports of the random
    side's IP in ``ports`` from its punch socket, ``rate`` per second for at
    most ``duration`` seconds.  ``hit_probability``: of a hit within that
    time; ``expected`` seconds to the first hit.
    """

    random_side: str
    sockets: int
    rate: float
    duration: float
    ports: tuple[int, int] = PORT_RANGE
    target: tuple[str, int] | None = None
    hit_probability: float = 0.0
    expected: float = 0.0

    def mirrored(self) -> Birthday:
        return replace(self, random_side=_other(self.random_side))


@dataclass(frozen=True)
class Plan:
    """
    Which strategy to run (one of :data:`STRATEGIES`), what each side does
    (``mine``, ``peer``: :class:`Role`), the strategy's parameters
    (:class:`Direct`, :class:`Predict`, :class:`Birthday`, or ``None`` for
    simultaneous open and relay), why, and what to try if it fails
    (``fallback``; every chain ends with the relay).
    """

    strategy: str
    mine: Role
    peer: Role
    params: Direct | Predict | Birthday | None = None
    reason: str = ""
    fallback: Plan | None = field(default=None, repr=False)

    def mirrored(self) -> Plan:
        """The same plan as the peer sees it."""
        return replace(self, mine=self.peer, peer=self.mine,
                       params=self.params.mirrored() if self.params is not None else None,
                       fallback=self.fallback.mirrored() if self.fallback else None)

    def chain(self) -> list[Plan]:
        """This plan and its fallbacks, in order."""
        out, p = [], self
        while p is not None:
            out.append(p)
            p = p.fallback
        return out

    def to_json(self) -> dict:
        d = {"strategy": self.strategy, "mine": asdict(self.mine), "peer": asdict(self.peer),
             "reason": self.reason}
        if self.params is not None:
            d["params"] = asdict(self.params)
        if self.fallback is not None:
            d["fallback"] = self.fallback.to_json()
        return d


def _side_kind(b) -> str:
    """
    What a side is for planning:

    - ``open``: anyone can reach it at a known address (no NAT and no
      filtering, or an endpoint-independent mapping and filtering);
    - ``ip-open``: a known address that opens to a whole IP once it has sent
      there (address-dependent filtering);
    - ``easy``: a known address (no NAT, an endpoint-independent mapping, or
      a NAT that keeps the local port) with filtering that lets in only
      replies;
    - ``sequential``: a new port per destination, the next of a known step;
    - ``hard``: a new port per destination, unpredictable (random
      allocation, or too little known).
    """
    mapping, filtering = b.mapping, b.filtering
    allocation = getattr(b, "allocation", UNKNOWN)
    if mapping in (NONE, EI):
        if filtering in (NONE, EI):
            return "open"
        if filtering == AD:
            return "ip-open"
        return "easy"
    if allocation == "preserving":
        return "easy"
    if allocation == "sequential" and (getattr(b, "step", 0) or 0) > 0:
        return "sequential"
    return "hard"


def _restrictive(b) -> bool:
    """Whether an early probe to this side's NAT (or firewall) would be dropped (or worse)."""
    return b.filtering not in (NONE, EI)


def _port(b) -> int | None:
    public = getattr(b, "public", None)
    return public[1] if public else None


def plan(mine, peer, same_public_ip: bool = False, *, initiator: bool = True,
         delay: float = 1.0, margin: float = 2.0, min_window: int = 4, max_window: int = 64,
         one_delay: float = 0.005, sockets: int = 256, spray_rate: float = 1000.0,
         max_spray: float = 3.0, port_range: tuple[int, int] = PORT_RANGE) -> Plan:
    """
    Choose how ``mine`` (this side's :class:`NatBehaviour`, or anything with
    ``mapping``, ``filtering``, ``allocation``, ``step``, ``rate`` and
    optionally ``public``, such as the wire's ``NatInfo``) and ``peer``
    connect.  ``initiator``: this side asked for the connection (the seed's
    A).  Both sides get the same plan, mirrored: ``plan(a, b,
    initiator=True) == plan(b, a, initiator=False).mirrored()``.

    In order of preference:

    - same public IP: ``direct`` to the local addresses (probably one LAN),
      falling back to the plan for different IPs (which needs hairpinning);
    - one side ``open`` (see below): ``direct``, the other side sends; one
      side with an endpoint-independent mapping and address-dependent
      filtering: ``direct``, after that side sends one probe to the other's
      IP to open its filter;
    - both with a known address: ``simultaneous-open``;
    - sequential on one or both sides: ``predict``, the seed's window.  The
      window side is the sequential one (its ports must be hit); with both
      sequential, as in the seed, the side that asked (A) sends the ``n``
      packets and the other sends the one packet.  ``n`` is
      :func:`window_size` of the window side's rate over ``delay``, the
      expected time from the lobby's observation to the burst;
    - a random-port symmetric NAT against an easy peer: ``birthday`` (the
      easy side's fixed address is what makes the guess one-sided);
    - otherwise ``relay``.  Random against random: both ports unknown, two
      independent guesses of one port in ~64k must meet. Random against
      sequential: the sequential side's port moves with every destination
      port it sprays to, so its probes never come from the one address the
      random side's sockets opened to, and the random side's port cannot
      be predicted for the window.  An unknown behaviour counts as random.

    Parameters: ``delay``, ``margin``, ``min_window``, ``max_window`` for
    :func:`window_size`; ``one_delay``, the seconds between the lobby's
    observation of the one-packet side's port and its one packet (a
    sequential one-packet side must not lose its next port meanwhile: it
    sends right after answering); ``sockets``, ``spray_rate``,
    ``max_spray`` (seconds) and ``port_range`` for the birthday punch, whose
    duration is what a 99.9 % hit needs, at most ``max_spray``.

    Low-TTL first probes (:class:`Role`) are asked for where a side's first
    probes are meant to reach the peer's NAT before the peer has opened it
    (both sides of a simultaneous open, the one packet of the window, the
    random side's sockets, the ``open-ip`` probe), and only when the peer's
    NAT filters (a NAT with endpoint-independent filtering, or none, takes
    the packet anyway).
    """
    options = dict(initiator=initiator, delay=delay, margin=margin, min_window=min_window,
                   max_window=max_window, one_delay=one_delay, sockets=sockets,
                   spray_rate=spray_rate, max_spray=max_spray, port_range=port_range)
    if same_public_ip:
        rest = plan(mine, peer, False, **options)
        return Plan("direct", Role("send-local"), Role("send-local"), Direct("both", local=True),
                    "same public IP: probably the same LAN; try the local addresses first",
                    rest)
    relay = Plan("relay", Role("relay"), Role("relay"), None, "", None)
    kinds = {_MINE: _side_kind(mine), _PEER: _side_kind(peer)}
    nat = {_MINE: mine, _PEER: peer}
    asker = _MINE if initiator else _PEER

    def roles(actions, low_ttl=(False, False)):
        return dict(mine=Role(actions[_MINE], low_ttl[0]), peer=Role(actions[_PEER], low_ttl[1]))

    def fallback(reason):
        return replace(relay, reason=f"if {reason} fails")

    def is_(side, *what):
        return kinds[side] in what

    # 1. Someone is reachable.
    # When both are reachable the asker sends.
    opened = [s for s in (_other(asker), asker) if is_(s, "open")]
    if opened:
        target = opened[0]
        sender = _other(target)
        why = f"one side is reachable as it is ({_describe(nat[target])}): the other sends"
        return Plan("direct", **roles({sender: "send", target: "answer"}),
                    params=Direct(sender), reason=why, fallback=fallback("direct"))
    ip_open = [s for s in (_other(asker), asker) if is_(s, "ip-open")]
    if ip_open:
        target = ip_open[0]
        sender = _other(target)
        low = {target: _restrictive(nat[sender]), sender: False}
        why = ("one side has an endpoint-independent mapping and address-dependent "
               "filtering: one probe to the other's IP opens it, then the other sends")
        return Plan("direct", **roles({sender: "send", target: "open-ip"},
                                      (low[_MINE], low[_PEER])),
                    params=Direct(sender), reason=why, fallback=fallback("direct"))

    # 2. Both addresses known.
    if is_(_MINE, "easy") and is_(_PEER, "easy"):
        return Plan("simultaneous-open", **roles({_MINE: "send", _PEER: "send"},
                                                 (_restrictive(peer), _restrictive(mine))),
                    reason="both addresses are known: both send at once",
                    fallback=fallback("simultaneous open"))

    # 3. The seed's window.
    seq = [s for s in (asker, _other(asker)) if is_(s, "sequential")]
    if seq and all(is_(s, "easy", "sequential") for s in (_MINE, _PEER)):
        window = seq[0]  # the asker when both are sequential (the seed's A)
        one = _other(window)
        w, o = nat[window], nat[one]
        n = window_size(w.rate, delay, margin=margin, low=min_window, high=max_window)
        one_step = o.step if is_(one, "sequential") else 0
        p = window_hit_probability(w.rate, delay, n)
        if one_step:
            p *= math.exp(-max(0.0, o.rate or 0.0) * one_delay)
        params = Predict(window, n, w.step, one_step, _port(w), _port(o), round(p, 4))
        low = {one: _restrictive(w), window: False}
        why = (f"the window side allocates sequentially (step {w.step}, {w.rate or 0:g} "
               f"ports/s taken by others): window of {n}")
        return Plan("predict", **roles({window: "window", one: "one-packet"},
                                       (low[_MINE], low[_PEER])),
                    params=params, reason=why, fallback=fallback("the prediction"))

    # 4. Birthday against an easy peer.
    hard = [s for s in (_MINE, _PEER) if is_(s, "hard")]
    if len(hard) == 1 and is_(_other(hard[0]), "easy"):
        rnd = hard[0]
        easy = _other(rnd)
        space = port_range[1] - port_range[0] + 1
        probes = min(birthday_probes(sockets, 0.999, port_range),
                     max(1, int(spray_rate * max_spray)))
        duration = round(probes / spray_rate, 3)
        params = Birthday(rnd, sockets, spray_rate, duration, tuple(port_range),
                          getattr(nat[easy], "public", None),
                          round(birthday_hit_probability(sockets, probes, port_range), 4),
                          round(space / (min(sockets, space) * spray_rate), 3))
        low = {rnd: _restrictive(nat[easy]), easy: False}
        why = (f"one side's ports are unpredictable, the other's address is known: "
               f"{sockets} sockets against {spray_rate:g} probes/s")
        return Plan("birthday", **roles({rnd: "sockets", easy: "spray"}, (low[_MINE], low[_PEER])),
                    params=params, reason=why, fallback=fallback("the birthday punch"))

    # 5. Nothing direct can work.
    why = _relay_reason(kinds[_MINE], kinds[_PEER])
    return replace(relay, reason=why)


def _describe(b) -> str:
    if b.mapping == NONE:
        return "no NAT" + ("" if b.filtering in (NONE, UNKNOWN) else f", {b.filtering} filtering")
    return f"{b.mapping} mapping, {b.filtering} filtering"


def _relay_reason(a: str, b: str) -> str:
    pair = {a, b}
    if pair == {"hard"}:
        return "both sides' ports are unpredictable: no direct method"
    if pair == {"hard", "sequential"}:
        return ("unpredictable ports against a sequential NAT whose port moves with every "
                "destination: no direct method")
    return f"no direct method for {a} against {b}"
