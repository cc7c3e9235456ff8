# -*- test-case-name: tests.unit.test_peer_health -*-
"""
The health of one P2P path, as pure logic on an injected clock: when the
peer was last heard, when its silence makes the route dead, and the
keepalive interval, learnt from the NAT.

A path's two ends each send a keepalive every interval, so a peer that
has not been heard for two of them and a grace is gone from this route:
a NAT dropped the mapping (its UDP timeout is shorter than the interval,
and the refreshed mapping got a port the peer's NAT filters) or the peer
is down.  After such a silent death the interval is halved, down to a
floor, so that the next mapping is refreshed in time; a measured mapping
lifetime sets it below that lifetime at once.  Nothing is told to the
peer: each end learns on its own.
"""

#: Seconds of silence past two keepalives before the route is dead.
GRACE = 3.0

#: The shortest keepalive interval learnt (seconds).
FLOOR = 5.0

#: A measured mapping lifetime is used at this fraction, for the jitter
#: of timers and of the NAT's own timeout sweep.
LIFETIME_MARGIN = 0.6


class PathHealth:
    """
    Liveness of one route of a path.

    @param clock: an C{IReactorTime}.
    @param keepalive: the starting keepalive interval (seconds).
    @param dead_after: seconds of silence that make the route dead; by
        default two starting intervals and L{GRACE}.  It stays fixed when
        the interval is learnt, because the peer learns on its own and may
        still send at the starting interval.
    @param floor: the shortest interval learnt.

    @ivar state: ``"alive"`` or ``"silent"`` (dead since L{check} said so,
        until the peer is heard again or L{reset}).
    @ivar deaths: how many silent deaths were seen.
    """

    def __init__(self, clock, keepalive=15.0, dead_after=None, floor=FLOOR):
        if keepalive <= 0:
            raise ValueError("the keepalive interval must be positive")
        self.clock = clock
        self.floor = min(floor, keepalive)
        self.interval = float(keepalive)
        self.dead_after = float(dead_after if dead_after is not None
                                else 2 * keepalive + GRACE)
        if self.dead_after <= self.interval:
            raise ValueError("dead_after must be longer than the keepalive interval")
        self.state = "alive"
        self.deaths = 0
        self.last_heard = clock.seconds()

    def heard(self):
        """
        The peer was heard (authenticated traffic on this path).

        @return: True if this revives a route that was silent.
        """
        self.last_heard = self.clock.seconds()
        if self.state == "silent":
            self.state = "alive"
            return True
        return False

    def reset(self):
        """The path runs on a new route: its silence counts from now."""
        self.last_heard = self.clock.seconds()
        self.state = "alive"

    def silence(self):
        """Seconds since the peer was last heard."""
        return self.clock.seconds() - self.last_heard

    def next_check(self):
        """Seconds from now until the route would be dead if nothing is heard (>= 0)."""
        return max(0.0, self.dead_after - self.silence())

    def suspect(self):
        """
        True if the peer has missed at least one keepalive: a peer that
        reconnects now most likely found this route dead too.
        """
        return self.state == "silent" or self.silence() > self.interval + 1.0

    def check(self):
        """
        Look at the silence now.

        @return: True exactly once per silent death: the route just died.
            The keepalive interval is then halved (not below the floor).
        """
        if self.state == "silent" or self.silence() < self.dead_after:
            return False
        self.state = "silent"
        self.deaths += 1
        self.interval = max(self.floor, self.interval / 2)
        return True

    def shorten(self):
        """
        The NAT dropped a mapping within the interval (seen elsewhere: the
        lobby's keepalive answers, L{MappingWatch}): halve the interval,
        not below the floor.

        @return: True if the interval changed.
        """
        shorter = max(self.floor, self.interval / 2)
        changed, self.interval = shorter != self.interval, shorter
        return changed

    def at_most(self, seconds):
        """Keep the interval at C{seconds} or below (not below the floor); None: no bound."""
        if seconds is not None and seconds > 0:
            self.interval = max(self.floor, min(self.interval, float(seconds)))

    def mapping_lifetime(self, seconds):
        """
        The NAT's mapping lifetime was measured as C{seconds}: keep the
        interval below it (not below the floor, nor above what it is).
        """
        if seconds is None or seconds <= 0:
            return
        self.interval = max(self.floor, min(self.interval, seconds * LIFETIME_MARGIN))


class MappingWatch:
    """
    The NAT's mapping lifetime, learnt cheaply from the lobby's answers to
    our presence keepalives: each tells the address the lobby saw.  A new
    address between two answers means that the NAT dropped our mapping
    within the interval (the keepalive that followed made a new one, and
    until then the lobby could not reach us): the interval is halved,
    down to the floor; it is never longer than the lobby asks for.

    Pure logic: L{answer} is fed each keepalive answer.

    @ivar interval: the presence keepalive interval to use now (seconds).
    @ivar learnt: the bound learnt from the NAT (None: none yet).
    """

    def __init__(self, asked=20, floor=FLOOR):
        self.floor = floor
        self.asked = asked
        self.learnt = None
        self.last = None

    @property
    def interval(self):
        if self.learnt is None:
            return self.asked
        return max(min(self.floor, self.asked), min(self.asked, self.learnt))

    def ask(self, seconds):
        """The lobby asks for keepalives every C{seconds} (its Welcome says so)."""
        self.asked = max(1, seconds)

    def answer(self, observed):
        """
        An answer (to a keepalive or a login: both leave from the same
        socket) said the lobby saw us at C{observed}.

        @return: the new interval if this answer shortened it, else None.
        """
        last, self.last = self.last, tuple(observed)
        if last is None or last == self.last:
            return None
        before = self.interval
        self.learnt = max(self.floor, before / 2)
        return self.interval if self.interval != before else None
