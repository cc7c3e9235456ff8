# -*- test-case-name: tests.unit.test_relay_notify -*-
"""
The relay's table of devices: one entry per device with its MAC key, the
NAT mapping its notifies arrive from, and its last access time.

Pure logic: times are passed in, persistence is a queue the caller
flushes, the socket a notify arrived at is an opaque object.
"""

from dataclasses import dataclass


class DeviceState:
    """
    What the relay knows of one device.

    @ivar addr: source (host, port) of its latest notify: the NAT's mapping.
    @ivar socket: the UDP socket that notify reached; connect requests must
        leave from it so the NAT takes them for replies.
    @ivar last_access: time of the latest notify A (None: never).
    @ivar stamp: timestamp of the latest notify accepted (A or B), to know a
        copy of it when one arrives from elsewhere (see
        L{p2pnat.relay.notify.NotifyHandler.replayed}).
    @ivar disputed: whether a copy of that notify already came from
        elsewhere (it is answered once).
    """

    __slots__ = ("id", "mac_key", "revoked", "last_access", "addr", "local", "socket",
                 "access_mode", "record", "stamp", "disputed")

    def __init__(self, id, mac_key, revoked=False, last_access=None, addr=None,
                 access_mode="device", record=None):
        self.id = id
        self.mac_key = mac_key
        self.revoked = revoked
        self.last_access = last_access
        self.addr = addr
        self.local = None
        self.socket = None
        self.access_mode = access_mode
        self.record = record
        self.stamp = None
        self.disputed = False


@dataclass(frozen=True)
class Refusal:
    """Why a device cannot be reached now: ``status`` is an HTTP status."""

    reason: str
    status: int
    message: str


UNKNOWN = Refusal("unknown", 404, "No such device is registered with this relay.")
REVOKED = Refusal("revoked", 403, "This device has been removed from this relay.")
NEVER_SEEN = Refusal("offline", 503, "This device has not contacted the relay yet.")
STALE = Refusal("offline", 503,
                "This device has not contacted the relay within its access-check period:"
                " it is off or unreachable.")


class DeviceTable:
    """
    Devices by ID, with the notify rules of the relay method.

    @param period: the access-check period in seconds.
    """

    def __init__(self, period):
        self.period = period
        self._devices = {}
        #: notify-A updates not yet written to the store: id -> (when, host, port)
        self.pending = {}

    def __len__(self):
        return len(self._devices)

    def __iter__(self):
        return iter(self._devices.values())

    def get(self, device_id):
        return self._devices.get(device_id)

    def put(self, state):
        """Add or replace a device (from the store)."""
        old = self._devices.get(state.id)
        if old is not None:
            # Keep the live mapping: the store may lag behind notifies.
            state.addr = old.addr or state.addr
            state.socket = old.socket
            state.local = old.local
            state.stamp, state.disputed = old.stamp, old.disputed
            if old.last_access and (state.last_access or 0) < old.last_access:
                state.last_access = old.last_access
        self._devices[state.id] = state

    def remove(self, device_id):
        self.pending.pop(device_id, None)
        return self._devices.pop(device_id, None)

    def key_for(self, device_id):
        """The MAC key of a device that may talk to us, else None."""
        d = self._devices.get(device_id)
        if d is None or d.revoked:
            return None
        return d.mac_key

    def notify_a(self, device_id, addr, local, socket, now):
        """
        Notify A: record the mapping and the last access time, and queue
        the store update.  Returns the device's state.
        """
        d = self._devices[device_id]
        d.addr, d.local, d.socket = addr, local, socket
        d.last_access = now
        self.pending[device_id] = (now, addr[0], addr[1])
        return d

    def notify_b(self, device_id, addr, local, socket):
        """
        Notify B: keep the mapping; update the address only if it changed.
        Never touches last access or the store.  Returns True if the
        address changed.
        """
        d = self._devices[device_id]
        changed = d.addr != addr or d.socket is not socket
        if changed:
            d.addr, d.socket = addr, socket
        d.local = local
        return changed

    def reachable(self, device_id, now):
        """
        The device if a connect request may be sent to it now, else the
        L{Refusal} to answer the terminal with at once.
        """
        d = self._devices.get(device_id)
        if d is None:
            return UNKNOWN
        if d.revoked:
            return REVOKED
        if d.last_access is None or d.addr is None:
            return NEVER_SEEN
        if now - d.last_access > self.period:
            return STALE
        return d

    def online(self, now):
        """How many devices sent a notify A within the period."""
        return sum(1 for d in self._devices.values()
                   if not d.revoked and d.last_access is not None
                   and now - d.last_access <= self.period)

    def take_pending(self):
        """The queued store updates, emptying the queue."""
        pending, self.pending = self.pending, {}
        return pending
