# -*- test-case-name: tests.unit.test_peer_rtt -*-
"""
The round-trip time to the lobby, and the timers derived from it.

A client measures its RTT to the lobby on every exchange it already has
(the clock probe and its Pong at login, each Keepalive and its Welcome,
NAT discovery's first answers) and derives its request retransmissions,
punch rounds and give-ups from it, as TCP does (RFC 6298): a smoothed RTT
C{srtt}, its variation C{rttvar}, and C{rto = srtt + 4 rttvar}.  The fixed
values the client had before serve only as caps (never wait longer than
that) and floors (never retransmit faster than the timer wheel or the
peer's own processing makes sensible).  Before the first sample every
timer is its cap: the old, fixed behaviour.

Pure logic: the clock is injected (C{IReactorTime}, C{task.Clock} in
tests), and no I/O.
"""

import math

__all__ = ["MAX_SAMPLE", "MIN_SAMPLE", "RttEstimator"]

#: Samples are clamped into this range (seconds): a zero RTT (the lab, a
#: lobby on loopback) would make every timer its floor anyway, and a
#: sample above a minute is a stale answer, not a round trip.
MIN_SAMPLE = 0.0001
MAX_SAMPLE = 60.0


class RttEstimator:
    """
    The smoothed RTT to one other end (the lobby), RFC 6298 section 2.

    @param clock: an C{IReactorTime}, the clock the callers' send times
        are on (L{since}).
    @param alpha: the weight of a new sample in C{srtt} (1/8).
    @param beta: the weight of a new deviation in C{rttvar} (1/4).
    @param k: the multiple of C{rttvar} in L{rto} (4).
    @ivar srtt: the smoothed RTT in seconds, None before the first sample.
    @ivar rttvar: its mean deviation, None before the first sample.
    @ivar samples: how many samples were taken.
    @ivar least: the shortest sample so far (None before the first): the
        path's own round trip, without the queueing and the busy hosts that
        inflate C{srtt} for a while (a probe timed to meet the peer's uses
        it: L{p2pnat.peer.punch.CATCH_RTTS}).
    """

    def __init__(self, clock, *, alpha=0.125, beta=0.25, k=4):
        self.clock = clock
        self.alpha = alpha
        self.beta = beta
        self.k = k
        self.srtt = None
        self.rttvar = None
        self.samples = 0
        self.least = None

    # -- samples ----------------------------------------------------------------------

    def sample(self, rtt):
        """
        Take one measured round trip of C{rtt} seconds (clamped to
        [L{MIN_SAMPLE}, L{MAX_SAMPLE}]; a negative one, from a clock that
        stepped back, is ignored).  Only an answer to a request sent once
        should be measured (Karn's rule): the caller decides that.
        """
        if rtt is None or rtt < 0 or math.isnan(rtt):
            return
        rtt = min(max(rtt, MIN_SAMPLE), MAX_SAMPLE)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = (1 - self.beta) * self.rttvar + self.beta * abs(self.srtt - rtt)
            self.srtt = (1 - self.alpha) * self.srtt + self.alpha * rtt
        self.least = rtt if self.least is None else min(self.least, rtt)
        self.samples += 1

    def since(self, sent):
        """
        Take the round trip of a request first sent at C{sent} (seconds on
        this estimator's clock) whose answer arrived now; return it.
        """
        rtt = self.clock.seconds() - sent
        self.sample(rtt)
        return rtt

    # -- timers -----------------------------------------------------------------------

    @property
    def known(self):
        """Whether there is a sample yet."""
        return self.srtt is not None

    def rto(self, floor, cap):
        """
        The retransmission timeout, RFC 6298 (C{srtt + k rttvar}), within
        C{[floor, cap]}; C{cap} before the first sample.
        """
        if self.srtt is None:
            return cap
        return _within(self.srtt + self.k * self.rttvar, floor, cap)

    def scaled(self, multiple, floor, cap):
        """
        C{multiple} RTOs (an unanswered request's give-up, a punch round),
        within C{[floor, cap]}; C{cap} before the first sample.
        """
        if self.srtt is None:
            return cap
        return _within(multiple * self.rto(0.0, MAX_SAMPLE), floor, cap)

    def to_json(self):
        """The figures, for logs and reports (milliseconds)."""
        if self.srtt is None:
            return {"samples": 0}
        return {"samples": self.samples, "srtt_ms": round(self.srtt * 1000, 3),
                "rttvar_ms": round(self.rttvar * 1000, 3)}


def _within(value, floor, cap):
    return max(floor, min(cap, value))
