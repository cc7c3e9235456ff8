# -*- test-case-name: tests.unit.test_relay_sessions -*-
"""
The relay's pending sessions: a terminal is waiting for a device's tunnel.

Pure logic on a clock: a session has a unique ID and a nonce, belongs to
one device, is used at most once and expires at its deadline.  The
connect-request retransmission schedule is here too.
"""

import hmac
import os

from twisted.internet.defer import Deferred

#: Seconds after the first connect request at which it is sent again.
RETRANSMIT = (0.25, 0.5, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 25.0, 30.0)


class Session:
    """
    One terminal request waiting for its tunnel.

    @ivar ready: fires with the tunnel protocol, or errbacks with
        L{SessionTimeout} at the deadline.
    """

    __slots__ = ("id", "nonce", "device_id", "deadline", "ready", "sent", "_timer", "_retx")

    def __init__(self, session_id, nonce, device_id, deadline):
        self.id = session_id
        self.nonce = nonce
        self.device_id = device_id
        self.deadline = deadline
        self.ready = Deferred()
        self.sent = 0
        self._timer = None
        self._retx = None

    def matches(self, session_id, nonce):
        """Whether a hello naming C{session_id} and C{nonce} is for this session."""
        return session_id == self.id and hmac.compare_digest(nonce, self.nonce)


class SessionTimeout(Exception):
    """The device's tunnel did not arrive before the deadline."""


class TooBusy(Exception):
    """
    Too many sessions pending, in all or for this device: the relay is
    full for now (503), which is not the device failing to answer (504).
    """


class DeviceRevoked(Exception):
    """The device was revoked while a terminal waited for it."""


class SessionTable:
    """
    Pending sessions by ID, at most C{limit} at once and at most
    C{per_device} for one device.
    """

    def __init__(self, clock, timeout=10.0, limit=10000, per_device=64, random=os.urandom):
        self.clock = clock
        self.timeout = timeout
        self.limit = limit
        self.per_device = per_device
        self._random = random
        self._sessions = {}
        self._by_device = {}

    def __len__(self):
        return len(self._sessions)

    def create(self, device_id, send):
        """
        Start a session for C{device_id}: C{send(session)} sends its connect
        request now and on the retransmission schedule until the tunnel
        arrives or the deadline passes.

        @return: the L{Session}.
        @raise TooBusy: when the limits are reached.
        """
        if len(self._sessions) >= self.limit:
            raise TooBusy(f"{self.limit} sessions pending in all")
        if self._by_device.get(device_id, 0) >= self.per_device:
            raise TooBusy(f"{self.per_device} sessions pending for this device")
        session_id = self._random(16)
        while session_id in self._sessions:
            session_id = self._random(16)
        s = Session(session_id, self._random(16), device_id, self.clock.seconds() + self.timeout)
        self._sessions[session_id] = s
        self._by_device[device_id] = self._by_device.get(device_id, 0) + 1
        s._timer = self.clock.callLater(self.timeout, self._expire, session_id)

        start = self.clock.seconds()

        def retransmit(i):
            s._retx = None
            if session_id not in self._sessions:
                return
            send(s)
            s.sent += 1
            if i < len(RETRANSMIT) and RETRANSMIT[i] < self.timeout:
                # Against the start, so that late timer calls do not add up.
                delay = max(0.0, start + RETRANSMIT[i] - self.clock.seconds())
                s._retx = self.clock.callLater(delay, retransmit, i + 1)

        retransmit(0)
        return s

    def claim(self, session_id, device_id, nonce):
        """
        Bind a tunnel's hello to its session: the session must exist, belong
        to C{device_id} and have this nonce.  A claimed session is gone
        (single use), a wrong device or nonce leaves it waiting.

        @return: ``(session, None)`` or ``(None, error code)`` with the codes
            of L{p2pnat.protocol.tunnel.HELLO_ERRORS}.
        """
        s = self._sessions.get(session_id)
        if s is None:
            return None, 2
        if s.device_id != device_id:
            return None, 3
        if not hmac.compare_digest(s.nonce, nonce):
            return None, 4
        self._remove(s)
        return s, None

    def claim_early(self, session_id, device_id):
        """
        Bind a tunnel to its session before its hello, on a resumed TLS
        handshake that proved the device (see RelayTunnel.tlsResumed): the
        session must exist and belong to C{device_id}; the caller checks
        the nonce when the hello comes.

        @return: the session (now gone from the table), or None.
        """
        s = self._sessions.get(session_id)
        if s is None or s.device_id != device_id:
            return None
        self._remove(s)
        return s

    def cancel(self, session_id):
        """The terminal went away: forget the session."""
        s = self._sessions.get(session_id)
        if s is not None:
            self._remove(s)

    def cancel_device(self, device_id):
        """End every pending session of a device (it was revoked)."""
        for s in [s for s in self._sessions.values() if s.device_id == device_id]:
            self._remove(s)
            s.ready.errback(DeviceRevoked(device_id))

    def _remove(self, s):
        del self._sessions[s.id]
        n = self._by_device[s.device_id] - 1
        if n:
            self._by_device[s.device_id] = n
        else:
            del self._by_device[s.device_id]
        for call in (s._timer, s._retx):
            if call is not None and call.active():
                call.cancel()

    def _expire(self, session_id):
        s = self._sessions.get(session_id)
        if s is None:
            return
        s._timer = None
        self._remove(s)
        s.ready.errback(SessionTimeout(f"no tunnel after {self.timeout:g}s"))
