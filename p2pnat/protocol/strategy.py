# -*- test-case-name: tests.unit.test_p2p_strategy -*-
"""
From the punch plan (L{p2pnat.protocol.nat.plan}) to what this side does in a
punch round (L{Actions}).  Pure functions.  Both peers
compute the same plan, mirrored, from the same inputs (the NAT
information the lobby passed on), so no plan travels on the wire.

Roles follow the seed: A asked for the connection (its fresh mapping, the
lobby saw, is P+b); B answered from its own fresh port (Q+d).  Each side
knows the other's fresh mapping from the lobby, which is all the bases a
prediction needs.
"""

from dataclasses import dataclass, field, replace

from p2pnat.protocol import nat as N


@dataclass
class Actions:
    """One side's part of a punch round."""

    from_fresh: list = field(default_factory=list)  # addresses probed from the fresh socket
    new_sockets: int = 0  # how many new sockets to open ...
    new_to: list = field(default_factory=list)  # ... each probing these addresses
    spray_ip: str = None  # spray probes at random ports of this IP ...
    spray_rate: float = 0.0  # ... this many per second ...
    spray_ports: tuple = (1024, 65535)  # ... in this range
    first_ttl: int = 0  # TTL of the first probe of each socket (0: the system's)
    interval: float = 0.2  # seconds between repeated probes of one socket
    to_candidates: list = field(default_factory=list)  # peer's IPv4 candidates, from fresh
    to_candidates6: list = field(default_factory=list)  # peer's IPv6 ones, from our IPv6 socket
    take_mapped: bool = False  # our port-mapped socket waits for the peer's probes

    @property
    def idle(self):
        return not (self.from_fresh or self.new_sockets or self.spray_ip or self.to_candidates
                    or self.to_candidates6 or self.take_mapped)



#: Seconds between the lobby observing a fresh mapping and the burst of
#: new ports that must land on the predicted one: a lobby round trip and
#: some scheduling, generously.
PREDICTION_DELAY = 0.5
#: How many of the one-packet side's next sequential ports the window
#: aims at.  It must stay 1 (the seed: n packets to Q+d+1): on a symmetric
#: NAT every (socket, destination) is a new mapping, so n sockets probing k
#: targets make k*n mappings interleaved by target, and the one packet,
#: aimed n allocations ahead, meets a mapping towards its own source port
#: only when (n - m) % k happens to pick that target; with k = 3 a window
#: of 5, 6, 8, 9, 11 ... missed in every round when nothing else took a
#: port (NAT lab, both sides sequential).  An allocation by other traffic
#: on the one-packet side between its answer and its packet is left to the
#: next round.
SPREAD = 1
#: Seconds a round of each strategy runs before a new one (or the relay).
ROUND = {"direct": 2.0, "simultaneous-open": 2.0, "predict": 1.5}
#: Seconds a round runs that only probes candidates (the plan itself had
#: nothing direct to try).
CANDIDATE_ROUND = 2.0
#: Seconds to wait, after a direct IPv4 path, for a direct IPv6 one when
#: both sides probe IPv6: the IPv6 path is preferred (no NAT whose
#: mapping can expire or change), and both sides' probes left at once, so
#: a working IPv6 path shows up within about the same round trip.
IPV6_GRACE = 0.05


def _is_v6(addr):
    return ":" in addr[0]


def with_candidates(actions, deadline, mine, theirs):
    """
    Add the candidates to one side's round.  Both sides compute the same
    from the same lists (each gets the other's from the lobby):

    - our fresh socket probes the peer's IPv4 candidates (port-mapped
      addresses take probes from anywhere; our NAT lets the answer back);
    - our IPv6 socket probes the peer's IPv6 candidates when we have one
      of our own: both send, and each side's probes open its own stateful
      firewall for the other's;
    - our port-mapped socket, if we offered it, waits for the peer's probes.

    @param mine: the candidates the peer was given of ours (none if the
        peer cannot read them).
    @param theirs: the peer's candidates.
    @return: ``(actions, deadline)``; unchanged without candidates, so that
        a pair without any punches as before.
    """
    v4 = [c for c in theirs if not _is_v6(c)]
    v6 = [c for c in theirs if _is_v6(c)] if any(_is_v6(c) for c in mine) else []
    mapped = any(not _is_v6(c) for c in mine)
    if not (v4 or v6 or mapped):
        return actions, deadline
    actions = replace(actions, to_candidates=v4, to_candidates6=v6, take_mapped=mapped)
    return actions, deadline or CANDIDATE_ROUND


def _add(addr, offset):
    host, port = addr
    port += offset
    return (host, port) if 1 <= port <= 65535 else None


def make_plan(role, mine, peer, peer_observed, my_public):
    same_ip = my_public is not None and peer_observed[0] == my_public[0]
    return N.plan(mine, peer, same_ip, initiator=(role == "a"), delay=PREDICTION_DELAY)


def actions_for(role, mine, peer, peer_observed, peer_local, my_public, low_ttl=0):
    """
    @param role: ``"a"`` (requester) or ``"b"`` (answerer).
    @param mine: our L{p2pnat.protocol.p2p.NatInfo}; C{peer}: the peer's.
    @param peer_observed: the peer's fresh mapping as the lobby saw it.
    @param peer_local: the peer's own socket address.
    @param my_public: our address as the lobby sees it.
    @param low_ttl: TTL for first probes where the plan asks for low-TTL
        ones (0: never; it must be the hop count to our outermost NAT,
        which only the operator knows).
    @return: ``(Actions, Plan, seconds this round may take)``.
    """
    plan = make_plan(role, mine, peer, peer_observed, my_public)
    ttl = low_ttl if plan.mine.low_ttl else 0
    s = plan.strategy
    if s == "direct" and isinstance(plan.params, N.Direct) and plan.params.local:
        # Same public IP: the peer's own address, and its public one in
        # case the NAT hairpins.
        targets = [a for a in (peer_local, peer_observed) if a and a[1]]
        then = plan.fallback
        if then is not None and then.strategy in ("simultaneous-open", "direct"):
            return Actions(from_fresh=targets, first_ttl=ttl), plan, ROUND["direct"]
        return Actions(from_fresh=targets), plan, ROUND["direct"]
    if s in ("direct", "simultaneous-open"):
        # Both send: the reachable side's probes cost nothing and cover a
        # lost packet from the other.
        return Actions(from_fresh=[peer_observed], first_ttl=ttl), plan, ROUND[s]
    if s == "predict":
        p = plan.params
        if p.window_side == "mine":
            # n packets from n new ports to the one-packet side's next port(s).
            if p.one_step:
                targets = [t for t in (_add(peer_observed, k * p.one_step)
                                       for k in range(1, SPREAD + 1)) if t]
            else:
                targets = [peer_observed]
            return Actions(new_sockets=p.n, new_to=targets), plan, ROUND[s]
        # One packet to the window side's port n allocations ahead, from our
        # next port (a new socket) or from the fresh one if it does not move.
        target = _add(peer_observed, p.n * p.step)
        if target is None:
            return Actions(), plan, 0
        if p.one_step:
            return Actions(new_sockets=1, new_to=[target], first_ttl=ttl), plan, ROUND[s]
        return Actions(from_fresh=[target], first_ttl=ttl), plan, ROUND[s]
    if s == "birthday":
        b = plan.params
        if b.random_side == "mine":
            return (Actions(new_sockets=b.sockets, new_to=[peer_observed], interval=0.5,
                            first_ttl=ttl), plan, b.duration + 1.0)
        return (Actions(from_fresh=[peer_observed], spray_ip=peer_observed[0],
                        spray_rate=b.rate, spray_ports=b.ports), plan, b.duration + 1.0)
    return Actions(), plan, 0


#: Rounds of a punch that repeats (the seed's window, the birthday punch),
#: counted back from the last one before the relay's reserve, that run
#: with the relay already carrying the traffic.
LAST_ROUNDS = 1

#: A birthday punch planned with less chance than this of a hit in its
#: round is uncertain from its first round.  The default plan aims at
#: 99.9 %: relaying first would only delay the direct path it nearly
#: always finds in its first round.
CERTAIN = 0.99


def relay_first(plan, rounds_left=None, hairpin=None, translated=True):
    """
    Whether this punch is uncertain enough that the pair should talk
    through the relay while it runs (the path is relayed at once and
    upgraded to direct if the punch succeeds), and why.

    Uncertain are:

    - the same public IP on both sides (``direct`` to the local addresses):
      one LAN, or two homes behind one carrier NAT, which only
      hairpinning (unknown unless C{hairpin} says so) lets meet;
    - a ``birthday`` punch whose plan gives it less than L{CERTAIN} chance
      of a hit in the round;
    - the last L{LAST_ROUNDS} rounds of a punch that repeats (the seed's
      window, ``predict``, or ``birthday``) before the relay's reserve.

    Both sides compute the same plan, mirrored, and so the same answer
    for the first two.  Only the asker (A) counts its rounds; the
    answering side cannot, and binds at once in every round of a
    repeating punch: the lobby relays only once both sides are bound, so
    the asker decides, and a round the punch wins cancels the bind.

    @param plan: the L{p2pnat.protocol.nat.Plan} of this round.
    @param rounds_left: rounds after this one that fit before the relay's
        reserve; None on the answering side, which does not count them.
    @param hairpin: whether the shared NAT is known to hairpin.
    @param translated: whether the peer's address as the lobby saw it
        differs from its own: False means no NAT in between (the lobby
        on the peers' own network, or on their host), where the same
        IP reaches the peer for certain.
    @return: the reason (text), or None when the punch goes first.
    """
    s = plan.strategy
    if s == "direct" and isinstance(plan.params, N.Direct) and plan.params.local:
        if hairpin or not translated:
            return None
        return ("same public IP: only one LAN or a hairpinning NAT lets the punch through"
                + (", and this NAT does not hairpin" if hairpin is False else ""))
    if s not in ("predict", "birthday"):
        return None
    if s == "birthday" and plan.params.hit_probability < CERTAIN:
        return (f"birthday punch with a {plan.params.hit_probability:.1%} chance of a hit"
                " in its round")
    if rounds_left is None:
        return f"{s}: the asker relays in its last round"
    if rounds_left < LAST_ROUNDS:
        return f"the last round of the {s} punch"
    return None
