# -*- test-case-name: tests.test_p2p_strategy -*-
"""
From two NATs' behaviour to what each side does in a punch round
(L{p2pnat.p2p.punch.Actions}).  Pure functions; both peers compute the
same decision from the same inputs (the NAT information the lobby passed
on), so no plan travels on the wire.

Roles follow the seed: A asked for the connection (its fresh mapping is
P+b), B answered from its own fresh port (Q+d).
"""

import math

from p2pnat.p2p.punch import Actions

#: Seconds between the lobby observing a fresh mapping and the burst of
#: new ports that must land on the predicted one: a lobby round trip and
#: some scheduling, generously.
PREDICTION_DELAY = 0.5
#: Sockets a random-port side opens, and probes per second the easy side
#: sprays, in a birthday punch: with 256 mappings open among ~64 000 ports,
#: 1000 probes find one with probability 1 - (1 - 256/64512)^1000 ≈ 98 %,
#: 2000 with 99.98 %.
BIRTHDAY_SOCKETS = 256
BIRTHDAY_RATE = 1000.0
#: How many of the peer's next sequential ports we aim at, to absorb a few
#: allocations by other traffic on its side.
SPREAD = 3


def easy(nat):
    """A NAT whose mapping does not depend on the destination (or no NAT)."""
    return nat.mapping in ("none", "endpoint-independent", "unknown")


def sequential(nat):
    return not easy(nat) and nat.allocation in ("sequential", "preserving")


def random_ports(nat):
    return not easy(nat) and nat.allocation in ("random", "unknown")


def window(nat, delay=PREDICTION_DELAY):
    """
    The seed's window n: how many new ports to open so that one of them
    is the predicted P+b+n, given the ports other traffic consumes per
    second (each allocation moves the next port by the NAT's step).
    """
    return max(4, min(64, 2 + math.ceil(nat.rate * delay * 2)))


def _step(nat):
    return nat.step or 1


def _add(addr, offset):
    host, port = addr
    port += offset
    if not 1 <= port <= 65535:
        return None
    return (host, port)


def actions_for(role, mine, peer, peer_observed, peer_local, my_public):
    """
    @param role: ``"a"`` (requester) or ``"b"`` (answerer).
    @param mine: our L{p2pnat.p2p.messages.NatInfo}; C{peer}: the peer's.
    @param peer_observed: the peer's fresh mapping as the lobby saw it.
    @param peer_local: the peer's own socket address.
    @param my_public: our address as the lobby sees it (for same-NAT peers).
    @return: ``(Actions, strategy name)``.
    """
    a_nat, b_nat = (mine, peer) if role == "a" else (peer, mine)
    if my_public is not None and peer_observed[0] == my_public[0]:
        # Behind the same NAT (or both public on one host): the peer's own
        # address first; the NAT may also hairpin.
        targets = [peer_local] if peer_local[1] else []
        return Actions(from_fresh=targets + [peer_observed]), "same-nat"
    if easy(a_nat) and easy(b_nat):
        # Cone or public on both sides: each mapping is what the lobby saw.
        return Actions(from_fresh=[peer_observed]), "simultaneous-open"
    if random_ports(mine) and easy(peer):
        return Actions(new_sockets=BIRTHDAY_SOCKETS, new_to=[peer_observed],
                       interval=0.5), "birthday"
    if easy(mine) and random_ports(peer):
        return Actions(spray_ip=peer_observed[0], spray_rate=BIRTHDAY_RATE,
                       from_fresh=[peer_observed]), "birthday"
    if random_ports(mine) or random_ports(peer):
        # Random against sequential or random: no sound prediction exists
        # for the random side, and a birthday punch needs one fixed side.
        return Actions(), "relay"
    # Sequential on one or both sides: the seed's prediction.
    n = window(a_nat)
    if role == "b":
        # One packet to A's port n allocations ahead (P+b+n), from B's next
        # mapping (a new socket when B is sequential, else the fresh one).
        target = peer_observed if easy(a_nat) else _add(peer_observed, n * _step(a_nat))
        if sequential(b_nat):
            return Actions(new_sockets=1, new_to=[target]), "predict"
        return Actions(from_fresh=[target]), "predict"
    # A: n packets from n new ports (or from the fresh one if A is easy) to
    # B's next mapping(s): Q+d+step (B sequential, new socket) or Q+d.
    if sequential(b_nat):
        targets = [t for t in (_add(peer_observed, k * _step(b_nat)) for k in range(1, SPREAD + 1))
                   if t]
    else:
        targets = [peer_observed]
    if sequential(a_nat):
        return Actions(new_sockets=n, new_to=targets), "predict"
    return Actions(from_fresh=targets), "predict"
