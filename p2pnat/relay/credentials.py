# -*- test-case-name: tests.unit.test_relay_credentials -*-
"""
How the relay checks terminals' access credentials without letting anyone
guess fast or take its CPU.

A check is a scrypt hash, slow on purpose (about 50 ms and 16 MiB).  So,
before any hashing:

- guesses are limited per (source, device), per source, and per device
  (L{GuessLimiter}): token buckets, bounded tables, keyed by the source's
  IP address (an IPv6 source by its /64, one subscriber's network);
- a source that gave a device's credential lately skips that device's
  own limit: an attacker spraying guesses at a device from many addresses
  does not lock out its real users, who log in from where they did
  before (and, with a login cookie, are never checked at all);
- a success is remembered for a minute, so a CLI presenting the
  credential on every connection hashes once, and a right credential
  gives back the guess it took;
- at most C{running + waiting} checks are under way at once
  (L{CredentialChecker}); beyond that the terminal is told to come back
  (503).  The daemon hashes on a small thread pool of its own, so that
  credential checks never hold up the reactor's pool (DNS, the store).

Pure logic with an injected clock; the hashing runs through the
C{run_blocking} it is given.
"""

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.defer import fail, succeed

from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.net.sources import source_of_host

__all__ = ["CheckerBusy", "CredentialChecker", "CredentialLimits", "GuessLimiter",
           "NotChecked", "TooManyGuesses", "source_of"]


class NotChecked(Exception):
    """
    A credential was not checked: the terminal should try again in
    C{retry_after} seconds.  C{status} and C{title} are the answer's.
    """

    status = 503
    title = "Relay busy"

    def __init__(self, message, retry_after, limit=""):
        super().__init__(message)
        self.retry_after = max(1, int(math.ceil(retry_after)))
        #: which limit (for the log)
        self.limit = limit


class TooManyGuesses(NotChecked):
    """Over a guess limit (HTTP 429)."""

    status = 429
    title = "Too many attempts"


class CheckerBusy(NotChecked):
    """Too many credential checks under way in the relay (HTTP 503)."""


@dataclass(frozen=True)
class CredentialLimits:
    """
    The relay's credential settings (``credentials.*`` of ``twistd relay``).

    Each guess limit allows its number of guesses at once, then one more
    every C{..._interval} seconds.
    """

    #: guesses one source may make at one device
    per_source_device: int = 5
    per_source_device_interval: float = 30.0
    #: guesses one source may make at all devices together
    per_source: int = 20
    per_source_interval: float = 6.0
    #: guesses at one device from sources that have not given its credential lately
    per_device: int = 30
    per_device_interval: float = 2.0
    #: seconds a source that gave a device's credential skips the per-device limit
    trusted_for: float = 12 * 3600.0
    #: credential hashes computed at once (the daemon's hashing threads)
    running: int = 1
    #: checks waiting for a hashing thread; more are answered 503
    waiting: int = 16
    #: entries kept per table (least recently used forgotten first)
    max_keys: int = 65536


def source_of(peer):
    """
    The guess limits' key for a terminal at C{peer} (``"host:port"``, as
    the terminal's C{peer()} gives it): the source its address counts as
    for every per-source limit (L{p2pnat.relay.limits.source_of_host}).
    """
    return source_of_host(peer.rsplit(":", 1)[0].strip("[]"))


class _Buckets:
    """
    Token buckets by key: C{burst} tokens, one more each C{interval}
    seconds.  At most C{max_keys} keys are kept; the least recently used
    goes first (a full bucket and a forgotten one are the same).
    """

    def __init__(self, burst, interval, max_keys):
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._level = OrderedDict()  # key -> (tokens, when)

    def _tokens(self, key, now):
        tokens, then = self._level.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) / self.interval)

    def wait(self, key, now):
        """Seconds until C{key} has a token (0: it has one now)."""
        return max(0.0, (1 - self._tokens(key, now)) * self.interval)

    def add(self, key, now, n):
        """Take (C{n} = -1) or give back (C{n} = 1) a token."""
        tokens = self._tokens(key, now) + n
        self._level.pop(key, None)
        if tokens < self.burst:
            self._level[key] = (tokens, now)
            if len(self._level) > self.max_keys:
                self._level.popitem(last=False)


class GuessLimiter:
    """The guess limits of L{CredentialLimits}, checked before any hashing."""

    def __init__(self, limits):
        n = limits.max_keys
        self.pair = _Buckets(limits.per_source_device, limits.per_source_device_interval, n)
        self.source = _Buckets(limits.per_source, limits.per_source_interval, n)
        self.device = _Buckets(limits.per_device, limits.per_device_interval, n)
        self.trusted_for = limits.trusted_for
        self.max_keys = n
        self._trusted = OrderedDict()  # (source, device ID) -> until

    def admit(self, source, device_id, now):
        """
        Take one guess of C{source} at C{device_id}.

        @return: what was taken, for L{give_back}.
        @raise TooManyGuesses: over a limit (nothing is taken).
        """
        pair = (source, device_id)
        taken = [(self.pair, pair, "source-device"), (self.source, source, "source")]
        if self._trusted.get(pair, 0) <= now:
            self._trusted.pop(pair, None)
            taken.append((self.device, device_id, "device"))
        wait, which = max((b.wait(k, now), name) for b, k, name in taken)
        if wait > 0:
            message = ("This device has had too many wrong attempts lately."
                       if which == "device" else "Too many attempts from your address.")
            raise TooManyGuesses(f"{message} Try again in {math.ceil(wait)} seconds.", wait,
                                 which)
        for b, k, _ in taken:
            b.add(k, now, -1)
        return taken

    def give_back(self, taken, now):
        """The guesses L{admit} took were not spent (or were right)."""
        for b, k, _ in taken:
            b.add(k, now, 1)

    def trust(self, source, device_id, now):
        """C{source} gave C{device_id}'s credential: it skips the device's limit for a while."""
        pair = (source, device_id)
        self._trusted.pop(pair, None)
        self._trusted[pair] = now + self.trusted_for
        if len(self._trusted) > self.max_keys:
            self._trusted.popitem(last=False)


class _QuietLog:
    """
    A warning per kind of refusal at most once a minute, then how many more
    there were: a flood of guesses cannot fill the disk.
    """

    def __init__(self, log, clock):
        self.log = log
        self.throttle = Throttle(clock, interval=60.0)

    def __call__(self, kind, format, **kw):
        held = self.throttle(kind)
        if held is None:
            return
        if held:
            self.log.warn("{n} more credential checks refused ({kind}) since the last such"
                          " warning", n=held, kind=kind)
        self.log.warn(format, **kw)


class CredentialChecker:
    """
    Checks terminals' access credentials for the relay (see the module's
    docstring for the rules).

    @param clock: IReactorTime.
    @param run_blocking: C{run_blocking(f, *args)} runs the hash and returns a
        Deferred of its result (the daemon's own small thread pool).
    @param verify: C{verify(stored, given)}, the hash check: false for a
        C{stored} of None, after as long as a real check.
    @param limits: the L{CredentialLimits}.
    """

    log = Logger(namespace="p2pnat.relay.credentials")

    def __init__(self, clock, run_blocking, verify, limits=CredentialLimits()):
        self.clock = clock
        self.run_blocking = run_blocking
        self.verify = verify
        self.limits = limits
        self.guesses = GuessLimiter(limits)
        self.under_way = 0  # checks hashing or waiting for a thread
        self._remembered = {}  # hash of (device, stored hash, credential) -> until
        self._quiet = _QuietLog(self.log, clock)

    def check(self, device_id, stored, given, source):
        """
        Whether C{given} is the credential whose hash is C{stored} (None:
        there is none, which takes as long to learn).

        @param source: the key of the terminal's address (L{source_of}).
        @return: Deferred firing with a bool, or failing with
            L{TooManyGuesses} or L{CheckerBusy}, before any hashing.
        """
        key = hashlib.sha256(f"{device_id}\0{stored}\0{given}".encode()).digest()
        now = self.clock.seconds()
        if stored and self._remembered.get(key, 0) > now:
            return succeed(True)
        try:
            taken = self.guesses.admit(source, device_id, now)
        except TooManyGuesses as e:
            self._quiet(f"limit-{e.limit}", "credential guess for {device_id} from {source}"
                        " refused: over the {limit} limit", device_id=device_id, source=source,
                        limit=e.limit)
            return fail(e)
        if self.under_way >= self.limits.running + self.limits.waiting:
            self.guesses.give_back(taken, now)
            self._quiet("busy", "credential check for {device_id} from {source} refused:"
                        " {n} checks under way", device_id=device_id, source=source,
                        n=self.under_way)
            return fail(CheckerBusy("The relay has too many logins to check right now."
                                    " Try again in a few seconds.", 2))
        self.under_way += 1

        def done(ok):
            self.under_way -= 1
            ok = bool(ok)
            if ok:
                now = self.clock.seconds()
                self.guesses.give_back(taken, now)
                self.guesses.trust(source, device_id, now)
                if len(self._remembered) >= 1024:
                    self._remembered.clear()
                self._remembered[key] = now + 60
            return ok

        def failed(failure):
            self.under_way -= 1
            return failure

        return self.run_blocking(self.verify, stored, given).addCallbacks(done, failed)
