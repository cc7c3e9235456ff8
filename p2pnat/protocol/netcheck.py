# -*- test-case-name: tests.unit.test_netcheck -*-
"""
``p2pnat netcheck``'s verdicts and report: pure logic, no sockets, no clock.

:mod:`p2pnat.peer.netcheck` does the measuring and hands the raw results
here:

- :func:`nat_kind`: a discovery run's :class:`~p2pnat.protocol.nat.NatBehaviour`
  -> one word for the kind of NAT (:data:`KINDS`);
- :func:`hairpin_verdict`, :func:`lifetime_verdict`, :func:`latency`,
  :func:`family_verdict`: one verdict each from what was seen;
- :func:`expected_paths`: for each kind of peer (:data:`PEERS`), what path
  ``p2pnat peer connect`` takes, from the same planner it uses
  (:func:`p2pnat.protocol.strategy.make_plan`'s :func:`~p2pnat.protocol.nat.plan`);
- :class:`Report`: everything, as JSON (``docs/netcheck.rst`` documents
  every field) and as plain text.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from p2pnat.protocol import nat as N
from p2pnat.protocol.p2p import NatInfo
from p2pnat.protocol.strategy import PREDICTION_DELAY

__all__ = [
    "FAMILIES",
    "KINDS",
    "LIFETIME_INTERVALS",
    "PEERS",
    "PORTMAP_PROTOCOLS",
    "Family",
    "Lifetime",
    "PathExpectation",
    "Report",
    "ServerResult",
    "clean_rtts",
    "describe_kind",
    "expected_paths",
    "family_verdict",
    "format_addr",
    "hairpin_verdict",
    "latency",
    "lifetime_intervals",
    "lifetime_untestable",
    "lifetime_verdict",
    "mapping_helps",
    "nat_kind",
]

#: The kinds of NAT a run can find, and what each means for people.
KINDS = {
    "unknown": "not determined (the lobby did not answer, or too few of its addresses did)",
    "no-nat": "no NAT: this host's own address is its public one, nothing filtered",
    "firewall": "no NAT, but a stateful firewall that lets in only replies",
    "cone": "a cone NAT: one public address for all destinations",
    "symmetric-preserving": "a symmetric NAT that keeps the local port where it can",
    "symmetric-sequential": "a symmetric NAT handing out ports in sequence",
    "symmetric-random": "a symmetric NAT handing out random ports",
    "symmetric": "a symmetric NAT whose port allocation was not determined",
}

#: The kinds of peer :func:`expected_paths` plans against, as the wire's
#: NAT information a peer of that kind would report.  Same-NAT peers are
#: planned separately (``same-nat``).
PEERS = {
    "no-nat": ("a peer with no NAT", NatInfo(N.NONE, N.NONE, "preserving", 0, 0.0)),
    "cone": ("a peer behind a cone NAT (most home routers)",
             NatInfo(N.EI, N.APD, "preserving", 0, 0.0)),
    "symmetric-sequential": ("a peer behind a symmetric NAT with sequential ports (many "
                             "carrier-grade NATs)", NatInfo(N.APD, N.APD, "sequential", 1, 0.0)),
    "symmetric-random": ("a peer behind a symmetric NAT with random ports",
                         NatInfo(N.APD, N.APD, "random", 0, 0.0)),
}

FAMILIES = ("ipv4", "ipv6")
#: The port mapping protocols a gateway may offer, as :mod:`p2pnat.portmap` names them.
PORTMAP_PROTOCOLS = ("pcp", "nat-pmp", "upnp")
_PORTMAP_NAMES = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP"}
#: Idle intervals (seconds) of the mapping lifetime test, shortest first.
LIFETIME_INTERVALS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0)

_WORDS = {
    "direct": "direct",
    "simultaneous-open": "direct, both sides sending at once",
    "predict": "direct, by predicting the sequential side's next port",
    "birthday": "direct, by a birthday punch",
    "relay": "relayed through the lobby",
}


# --- verdicts ------------------------------------------------------------------------


def nat_kind(b) -> str:
    """
    One of :data:`KINDS` for a :class:`~p2pnat.protocol.nat.NatBehaviour`
    (or anything with ``mapping``, ``filtering``, ``allocation``): what its
    mapping says, and for a symmetric one its port allocation.  Filtering
    is reported as it is beside the kind, except that it is what tells a
    stateful firewall from no NAT at all.
    """
    if b.mapping == N.UNKNOWN:
        return "unknown"
    if b.mapping == N.NONE:
        return "no-nat" if b.filtering in (N.NONE, N.UNKNOWN) else "firewall"
    if b.mapping == N.EI:
        return "cone"
    return {"preserving": "symmetric-preserving", "sequential": "symmetric-sequential",
            "random": "symmetric-random"}.get(b.allocation, "symmetric")


def describe_kind(kind: str) -> str:
    """:data:`KINDS`' words for ``kind``."""
    return KINDS[kind]


def hairpin_verdict(mapped, answered: bool | None) -> bool | None:
    """
    Hairpinning (a packet sent to our own public address comes back to us,
    so two hosts behind this NAT can reach each other at their public
    addresses): ``answered`` is whether the probe sent to ``mapped`` (our
    mapped address; ``None``: never learnt) came back, ``None`` if it was
    not sent.  ``None``: not tested.
    """
    if mapped is None or answered is None:
        return None
    return bool(answered)


def lifetime_intervals(maximum: float) -> tuple[float, ...]:
    """The idle intervals of :data:`LIFETIME_INTERVALS` up to ``maximum`` seconds."""
    return tuple(t for t in LIFETIME_INTERVALS if t <= maximum)


@dataclass(frozen=True)
class Lifetime:
    """
    How long the NAT keeps an idle UDP mapping, as far as the test told:
    at least ``at_least`` seconds (``None``: not even the shortest interval
    survived, or nothing tested) and less than ``at_most`` (``None``: every
    interval tested survived).  ``tested``: ``{seconds: kept}`` for each
    interval that finished (kept: the same mapping after that long idle);
    ``note``: why the figure is missing or partial.
    """

    at_least: float | None = None
    at_most: float | None = None
    tested: tuple[tuple[float, bool], ...] = ()
    note: str = ""

    def to_json(self) -> dict:
        return {"at_least": self.at_least, "at_most": self.at_most,
                "tested": [[t, kept] for t, kept in self.tested], "note": self.note}


def lifetime_untestable(behaviour) -> str:
    """Why the lifetime test cannot tell anything behind this NAT (``""``: it can)."""
    if behaviour.mapping == N.NONE:
        return "no NAT: no mapping to expire"
    if behaviour.allocation == "preserving":
        return ("the NAT keeps the local port, so a new mapping looks like the old one: "
                "the lifetime cannot be seen this way")
    return ""


def lifetime_verdict(results, behaviour) -> Lifetime:
    """
    The mapping lifetime from ``results``: ``(idle seconds, mapped before,
    mapped after)`` for each interval tested (one socket each: it asked the
    lobby, idled, asked again; ``None`` for an address not learnt).  A
    mapping that expired comes back with a new port, unless the NAT keeps
    the local port (``behaviour.allocation == "preserving"``), when an
    expired and a kept mapping look the same: then no figure is given.
    """
    why = lifetime_untestable(behaviour)
    if why:
        return Lifetime(note=why)
    tested = sorted((t, before == after) for t, before, after in results
                    if before is not None and after is not None)
    if not tested:
        return Lifetime(note="no interval could be tested (the lobby did not answer)")
    kept = [t for t, same in tested if same]
    lost = [t for t, same in tested if not same]
    at_most = min(lost) if lost else None
    below = [t for t in kept if at_most is None or t < at_most]
    at_least = max(below) if below else None
    note = ""
    if at_most is None:
        note = f"every interval tested (up to {tested[-1][0]:g} s) kept its mapping"
    elif any(t > at_most for t in kept):
        note = "some longer intervals kept their mapping: the NAT's timer is not a plain one"
    return Lifetime(at_least, at_most, tuple(tested), note)


def clean_rtts(samples, retransmit_after: float) -> list[float]:
    """
    The round trips of ``samples`` (seconds from first send to answer;
    ``None`` for no answer) that were answered before the first
    retransmission: a later answer may be the retransmission's, so its
    time says nothing (Karn's rule).
    """
    return [s for s in samples if s is not None and s < retransmit_after]


def latency(rtts) -> float | None:
    """The median round trip in milliseconds, rounded to 0.01 ms (``None``: no sample)."""
    rtts = [r for r in rtts if r is not None]
    if not rtts:
        return None
    return round(statistics.median(rtts) * 1000.0, 2)


@dataclass(frozen=True)
class ServerResult:
    """
    One server address's STUN round trips: ``role`` (``lobby`` or
    ``relay``), the ``name`` it was given as (``host:port``), the
    ``address`` it resolved to and its ``family``; the mapped address seen
    (``public``, ``None``: no answer), the ``rtts`` answered cleanly
    (seconds) and the number of requests that got an answer.  ``error``:
    why nothing could be sent (no route, say).
    """

    role: str
    name: str
    address: tuple[str, int]
    family: str
    public: tuple[str, int] | None = None
    rtts: tuple[float, ...] = ()
    answered: int = 0
    asked: int = 0
    error: str = ""

    @property
    def reachable(self) -> bool:
        return self.public is not None

    def to_json(self) -> dict:
        return {"role": self.role, "name": self.name, "address": format_addr(self.address),
                "family": self.family, "reachable": self.reachable,
                "public": format_addr(self.public), "latency_ms": latency(self.rtts),
                "answered": self.answered, "asked": self.asked, "error": self.error or None}


@dataclass(frozen=True)
class Family:
    """
    IPv4 or IPv6 reachability: ``reachable`` (``None``: no server address
    of this family was configured or resolvable), the ``public`` address
    the first answering server saw, the ``servers`` tried and the
    ``latency_ms`` of the fastest.
    """

    family: str
    reachable: bool | None
    public: tuple[str, int] | None
    servers: int
    latency_ms: float | None

    def to_json(self) -> dict:
        return {"reachable": self.reachable, "public": format_addr(self.public),
                "servers": self.servers, "latency_ms": self.latency_ms}


def family_verdict(family: str, results) -> Family:
    """A :class:`Family` from the :class:`ServerResult` of every address of ``family``."""
    mine = [r for r in results if r.family == family]
    if not mine:
        return Family(family, None, None, 0, None)
    up = [r for r in mine if r.reachable]
    latencies = [latency(r.rtts) for r in up if r.rtts]
    return Family(family, bool(up), up[0].public if up else None, len(mine),
                  min(latencies) if latencies else None)


# --- paths -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathExpectation:
    """
    What ``p2pnat peer connect`` does with one kind of peer: the ``peer``
    key (:data:`PEERS`, or ``same-nat``), its description, the
    ``strategy`` of the plan (:data:`p2pnat.protocol.nat.STRATEGIES`),
    whether the path ends ``direct``, and the planner's ``reason``.
    """

    peer: str
    description: str
    strategy: str
    direct: bool
    reason: str
    #: ``"mapped"`` when the path is direct only through the port mapping
    #: our gateway grants (the peer sends to it), as ``peer connect``'s
    #: ``path`` event names that candidate; ``None`` otherwise.
    candidate: str | None = None

    @property
    def words(self) -> str:
        if self.candidate == "mapped":
            return (f"{self.description}: direct, the peer sending to the port mapping our"
                    f" gateway grants; without it {_WORDS[self.strategy]} ({self.reason})")
        return f"{self.description}: {_WORDS[self.strategy]}; {self.reason}"

    def to_json(self) -> dict:
        return {"peer": self.peer, "description": self.description, "strategy": self.strategy,
                "direct": self.direct, "reason": self.reason, "words": self.words}


def _info(b) -> NatInfo:
    # What this host would send the lobby (p2pnat.peer.discovery.to_nat_info).
    return NatInfo(b.mapping, b.filtering, b.allocation, b.step or 0, b.rate or 0.0)


def mapping_helps(behaviour, portmap) -> bool:
    """
    Whether ``p2pnat peer`` would get a direct path from a port mapping
    here: the gateway offers one of :data:`PORTMAP_PROTOCOLS` (``portmap``
    as :class:`Report` holds it), we are behind a NAT, and the gateway's
    external address, when it told one, is our public address (a home
    router behind a carrier-grade NAT maps a port of an address nobody
    outside can reach).  The client offers a granted mapping to every
    peer, whose fresh socket sends to it: a path no NAT kind of the peer's
    stops.
    """
    if not portmap or not any(portmap.get(p) for p in PORTMAP_PROTOCOLS):
        return False
    if behaviour is None or behaviour.mapping in (N.NONE, N.UNKNOWN):
        return False
    external = portmap.get("external")
    return external is None or behaviour.public is None or external == behaviour.public[0]


def expected_paths(behaviour, portmap=None) -> tuple[PathExpectation, ...]:
    """
    For each kind of peer in :data:`PEERS`, and for a peer behind this
    same NAT, the plan ``p2pnat peer connect`` makes (this host asking),
    with the planner and the parameters the P2P client uses.  An unknown
    behaviour is planned as it is, which is as the client would: for the
    worst.  Where the plan relays but a port mapping would be granted
    (:func:`mapping_helps` of ``portmap``), the path is direct on the
    mapped candidate, as the client's is.
    """
    mine = _info(behaviour)
    mapped = mapping_helps(behaviour, portmap)
    out = []
    for key, (description, peer) in PEERS.items():
        p = N.plan(mine, peer, False, initiator=True, delay=PREDICTION_DELAY)
        direct = p.strategy != "relay"
        out.append(PathExpectation(key, description, p.strategy, direct or mapped, p.reason,
                                   "mapped" if mapped and not direct else None))
    if behaviour.mapping not in (N.NONE, N.UNKNOWN):
        same = N.plan(mine, mine, True, initiator=True, delay=PREDICTION_DELAY)
        out.append(PathExpectation("same-nat", "a peer behind this same NAT", same.strategy,
                                   True, same.reason))
    return tuple(out)


# --- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """
    Everything one ``p2pnat netcheck`` run found.

    ``behaviour``: the discovery run's
    :class:`~p2pnat.protocol.nat.NatBehaviour` (``None``: discovery did not
    run); ``hairpin`` (:func:`hairpin_verdict`); ``lifetime`` (``None``: not
    asked for); ``servers``: a :class:`ServerResult` per server address;
    ``portmap``: what the gateway offers (``{"pcp": bool, "nat-pmp": bool,
    "upnp": bool, "external": str | None}``), ``None`` when not tested,
    with ``portmap_note`` saying why; ``elapsed`` and ``budget`` seconds;
    ``notes``: caveats for people.
    """

    behaviour: N.NatBehaviour | None
    hairpin: bool | None = None
    lifetime: Lifetime | None = None
    servers: tuple[ServerResult, ...] = ()
    portmap: dict | None = None
    portmap_note: str = ""
    elapsed: float = 0.0
    budget: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return nat_kind(self.behaviour) if self.behaviour is not None else "unknown"

    @property
    def families(self) -> dict[str, Family]:
        return {f: family_verdict(f, self.servers) for f in FAMILIES}

    @property
    def answered(self) -> bool:
        """Whether any server answered at all."""
        return any(s.reachable for s in self.servers) or (
            self.behaviour is not None and self.behaviour.public is not None)

    def expected_paths(self) -> tuple[PathExpectation, ...]:
        """:func:`expected_paths` for what was measured; none when nothing answered."""
        if not self.answered:
            return ()
        return expected_paths(self.behaviour or N.NatBehaviour(), self.portmap)

    def summary(self) -> str:
        """One sentence: the kind, and with whom a direct path is out of reach."""
        if not self.answered:
            return "No server answered: nothing could be measured."
        paths = self.expected_paths()
        relayed = [p for p in paths if not p.direct]
        words = describe_kind(self.kind)
        sentence = words[0].upper() + words[1:]
        if not relayed:
            return f"{sentence}; direct paths with every kind of peer."
        who = ", ".join(p.description.removeprefix("a peer ") for p in relayed)
        return f"{sentence}; relayed paths with peers {who}, direct with the others."

    def to_json(self) -> dict:
        b = self.behaviour
        nat = b.to_json() if b is not None else N.NatBehaviour().to_json()
        for k in ("hairpin", "lifetime"):
            nat.pop(k, None)
        for k in ("public", "local"):
            # As every other address of the report: [v6]:port for IPv6.
            nat[k] = format_addr(getattr(b, k, None))
        nat["kind"] = self.kind
        return {
            "version": 1,
            "summary": self.summary(),
            "nat": nat,
            "hairpin": self.hairpin,
            "lifetime": self.lifetime.to_json() if self.lifetime is not None else None,
            **{f: v.to_json() for f, v in self.families.items()},
            "portmap": dict(self.portmap) if self.portmap is not None else None,
            "portmap_note": self.portmap_note or None,
            "servers": [s.to_json() for s in self.servers],
            "paths": [p.to_json() for p in self.expected_paths()],
            "elapsed": round(self.elapsed, 3),
            "budget": self.budget,
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        """The report for people, one fact a line."""
        b = self.behaviour or N.NatBehaviour()
        lines = [self.summary(), ""]
        lines.append(f"NAT:           {self.kind} ({describe_kind(self.kind)})")
        lines.append(f"  mapping:     {b.mapping}")
        lines.append(f"  filtering:   {b.filtering}")
        alloc = b.allocation
        if alloc == "sequential":
            rate = "not measured" if b.rate is None else f"{b.rate:g} ports/s taken by others"
            alloc += f", step {b.step}, {rate}"
        lines.append(f"  ports:       {alloc}")
        if b.public is not None:
            local = f" (local {format_addr(b.local)})" if b.local is not None else ""
            lines.append(f"  public:      {format_addr(b.public)}{local}")
        lines.append(f"  hairpinning: {_yes_no(self.hairpin)}")
        if self.lifetime is not None:
            lt = self.lifetime
            if lt.at_least is None and lt.at_most is None:
                what = "not measured"
            elif lt.at_most is None:
                what = f"at least {lt.at_least:g} s"
            elif lt.at_least is None:
                what = f"under {lt.at_most:g} s"
            else:
                what = f"between {lt.at_least:g} s and {lt.at_most:g} s"
            lines.append(f"  lifetime:    {what}" + (f" ({lt.note})" if lt.note else ""))
        for name, fam in self.families.items():
            if fam.reachable is None:
                what = "not tested (no server address of this family)"
            elif fam.reachable:
                what = f"yes, as {format_addr(fam.public)}"
            else:
                what = f"no (none of {fam.servers} server addresses answered)"
            lines.append(f"{name.upper() + ':':<15}{what}")
        if self.portmap is None:
            lines.append(f"Port mapping:  not tested ({self.portmap_note or 'skipped'})")
        else:
            offered = [p for p in PORTMAP_PROTOCOLS if self.portmap.get(p)]
            what = ", ".join(_PORTMAP_NAMES[p] for p in offered) if offered else "none offered"
            if self.portmap.get("external"):
                what += f" (external address {self.portmap['external']})"
            lines.append(f"Port mapping:  {what}")
        lines.append("Latency:")
        for s in self.servers:
            ms = latency(s.rtts)
            if s.reachable:
                what = f"{ms:g} ms" if ms is not None else "answered (round trip unclear)"
            else:
                what = f"no answer ({s.error})" if s.error else "no answer"
            address = format_addr(s.address)
            name = s.name if s.name == address else f"{s.name} ({address})"
            lines.append(f"  {s.role} {name}: {what}")
        paths = self.expected_paths()
        if paths:
            lines.append("Paths p2pnat peer connect will take, with:")
            lines.extend(f"  {p.words}" for p in paths)
        for note in (*b.notes, *self.notes):
            lines.append(f"Note: {note}")
        lines.append(f"({self.elapsed:.2f} s)")
        return "\n".join(lines)


def _yes_no(value) -> str:
    return "not tested" if value is None else "yes" if value else "no"


def format_addr(a) -> str | None:
    if a is None:
        return None
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
