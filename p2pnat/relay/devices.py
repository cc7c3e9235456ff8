# -*- test-case-name: tests.unit.test_relay_notify -*-
"""
The relay's table of devices: one entry per device with its MAC key, the
NAT mapping its notifies arrive from, and its last access time.

Pure logic: times are passed in, persistence is a queue the caller
flushes, the socket a notify arrived at is an opaque object.
"""

import functools
import ipaddress
from collections import namedtuple
from dataclasses import dataclass


class DeviceState:
    """
    What the relay knows of one device.

    @ivar addr: source (host, port) of its latest notify: the NAT's mapping.
    @ivar mapped: the (host, port) its gateway granted it by port mapping,
        as its latest notify told (L{usable_mapped}), or None.  Connect
        requests go there as well as to C{addr}: it stays open when the
        NAT drops the notifies' mapping early.
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
                 "access_mode", "record", "stamp", "disputed", "mapped")

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
        self.mapped = None

    def targets(self):
        """
        Where a connect request goes: the notifies' source, then the
        port-mapped address if the device has one.
        """
        if self.mapped is None:
            return (self.addr,)
        return (self.addr, self.mapped)


def usable_mapped(observed, mapped):
    """
    The port-mapped address a notify from C{observed} told (C{mapped}, or
    None), as the relay may send to it from the socket the notify reached;
    None if it may not.

    Refused: port 0, unspecified, multicast and broadcast addresses, a
    family that socket cannot reach, the observed address itself (one
    copy is enough), and an address more local than the observed one (a
    device reached over the internet cannot make the relay send to the
    relay's own loopback or LAN).  An IPv4 address is written IPv4-mapped
    when the notify came to a dual-stack socket as IPv4-mapped IPv6.
    """
    if mapped is None or observed is None or not mapped[1]:
        return None
    ip, seen = _scope(mapped[0]), _scope(observed[0])
    if ip is None or seen is None:
        return None
    if seen.ipv4_mapped is not None:
        if ip.version != 4:
            return None
        seen, host = seen.ipv4_mapped, f"::ffff:{ip.text}"
    elif ip.version != seen.version:
        return None
    else:
        host = ip.text
    if (ip.unusable or (ip.loopback and not seen.loopback)
            or (ip.link_local and not seen.link_local) or (not ip.is_global and seen.is_global)):
        return None
    target = (host, mapped[1])
    return None if target == tuple(observed) else target


_Scope = namedtuple("_Scope", "text version unusable loopback link_local is_global ipv4_mapped")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


@functools.lru_cache(maxsize=4096)
def _scope(host):
    # Cached: ipaddress's scope properties cost tens of µs, and notifies
    # come from few distinct hosts per second.
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    v4 = getattr(ip, "ipv4_mapped", None)
    return _Scope(str(ip), ip.version,
                  ip.is_unspecified or ip.is_multicast or ip == _BROADCAST,
                  ip.is_loopback, ip.is_link_local, ip.is_global,
                  _scope(str(v4)) if v4 is not None else None)


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
            state.mapped = old.mapped
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

    def notify_a(self, device_id, addr, local, socket, now, mapped=None):
        """
        Notify A: record the mapping (and the port-mapped address the
        notify told, L{usable_mapped}) and the last access time, and queue
        the store update.  Returns the device's state.
        """
        d = self._devices[device_id]
        d.addr, d.local, d.socket = addr, local, socket
        d.mapped = usable_mapped(addr, mapped)
        d.last_access = now
        self.pending[device_id] = (now, addr[0], addr[1])
        return d

    def notify_b(self, device_id, addr, local, socket, mapped=None):
        """
        Notify B: keep the mapping; update the address (the source, or the
        port-mapped one the notify told) only if it changed.  Never
        touches last access or the store.  Returns True if either address
        changed.
        """
        d = self._devices[device_id]
        mapped = usable_mapped(addr, mapped)
        changed = d.addr != addr or d.socket is not socket or d.mapped != mapped
        if changed:
            d.addr, d.socket, d.mapped = addr, socket, mapped
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
