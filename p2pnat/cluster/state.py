# -*- test-case-name: tests.unit.test_cluster -*-
"""
The relay's cluster state: what relay nodes share, behind one interface
with two backends.

- L{p2pnat.cluster.embedded.EmbeddedState}: one node, nothing shared; the
  relay's own SQLite registry and in-memory tables, exactly as before
  clustering existed (the default: no ``[cluster] redis`` key).
- L{p2pnat.cluster.redis.RedisState}: nodes that share a Redis.

What lives where (``docs/cluster.rst`` has the figures):

- the registry (devices, certificate fingerprints, MAC keys sealed under
  the cluster key, access policy, revocations): in Redis, merged from
  every node's SQLite registry (L{newer} decides), durable as Redis is
  configured (AOF everysec recommended);
- a device's live entry (L{LiveEntry}: owning node, NAT mapping, last
  access), with an expiry, written by the node its notifies reach under
  the rules of L{LiveWrites};
- sessions (ID and nonce) stay in the memory of the node where the
  terminal waits: the connect request names that node as the tunnel
  host, so the tunnel can only land there, and the node's own session
  table makes each single-use.

This module is the interface and the pure rules the backends share
(no I/O, times passed in).
"""

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from zope.interface import Attribute, Interface

__all__ = ["IClusterState", "ClusterUnavailable", "LiveEntry", "NodeInfo", "LiveWrites",
           "Signer", "RecordCodec", "WriteQueue", "newer", "cluster_keys", "check_node_name",
           "rewrite_interval", "IClusterDirect", "DirectSeal", "DIRECT_ANSWER_TIMEOUT"]


class ClusterUnavailable(Exception):
    """The shared state cannot be reached now (Redis down or restarting)."""


#: The longest access-check period an entry in the shared store may carry
#: (30 days); a larger one is taken for garbage.
MAX_PERIOD = 30 * 86400.0


def rewrite_interval(period):
    """
    Seconds of access time after which the owning node rewrites a device's
    live entry on a notify A: five sixths of the access-check period.
    Agents send notify A every third of a period, so every third notify A
    writes (C{3600 / period} writes per device and hour), even when
    network delays bring it early or late by up to a sixth of a period.
    """
    return period * 5 / 6


@dataclass(frozen=True)
class LiveEntry:
    """
    Where a device is live: the node its notifies reach (which owns its NAT
    mapping and sends its connect requests), the mapping, and the time of
    its last notify A (POSIX seconds; None if only notify B was seen).

    An entry read from the shared store carries C{period}, the owning
    node's access-check period, from which the other nodes know how often
    the owner rewrites it (L{LiveWrites}) and so how old it may be while
    the device is live (L{stale}).  An entry of a node's own table has none.
    """

    device_id: str
    node: str
    host: str
    port: int
    last_access: float | None
    period: float | None = None

    def to_json(self):
        v = {"node": self.node, "host": self.host, "port": self.port,
             "access": self.last_access}
        if self.period is not None:
            v["period"] = self.period
        return json.dumps(v, separators=(",", ":"))

    @classmethod
    def from_json(cls, device_id, text):
        """The entry stored as C{text}, or None if it is not one (never raises)."""
        try:
            v = json.loads(text)
            access, period = v["access"], v.get("period")
            entry = cls(device_id, str(v["node"]), str(v["host"]), int(v["port"]),
                        None if access is None else float(access),
                        None if period is None else float(period))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if entry.period is not None and not 0 < entry.period <= MAX_PERIOD:
            return None
        return entry

    def stale(self, now, period):
        """
        Whether a terminal must be refused: no notify A within the
        access-check period C{period}, as the owning node would judge it.

        An entry from the shared store holds the last access its owner
        I{wrote}, which is up to L{rewrite_interval} older than the last one
        the owner saw (L{LiveWrites}): it is stale only when even that
        allowance is spent, so that no node refuses a device its owner
        holds live.  An entry without a period (a node's own table, or one
        written by a node that rewrote every half period) keeps the plain
        rule.
        """
        if self.last_access is None:
            return True
        if self.period is None:
            return now - self.last_access > period
        return now - self.last_access > self.period + rewrite_interval(self.period)


@dataclass(frozen=True)
class NodeInfo:
    """
    A relay node as it announces itself: its public addresses (what
    devices' relay lists name), where devices open tunnels to it, and when
    it last said it is alive (POSIX seconds).
    """

    name: str
    addresses: tuple
    tunnel_host: str
    tunnel_port: int
    seen: float

    def to_json(self):
        return json.dumps({"addresses": list(self.addresses), "tunnel_host": self.tunnel_host,
                           "tunnel_port": self.tunnel_port, "seen": self.seen},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, name, text):
        """The node stored as C{text}, or None if it is not one (never raises)."""
        try:
            v = json.loads(text)
            return cls(name, tuple(str(a) for a in v["addresses"]), str(v["tunnel_host"]),
                       int(v["tunnel_port"]), float(v["seen"]))
        except (ValueError, TypeError, KeyError):
            return None


class IClusterState(Interface):
    """
    What a relay node shares with the others.  Everything here is safe to
    call whether the shared state is reachable or not: reads fail with
    L{ClusterUnavailable}, writes are dropped and redone from later
    notifies.  The lobby cluster, ``p2pnat cluster status`` and the admin
    page build on the same interface (``docs/cluster.rst``).
    """

    node = Attribute("this node's name (unique in the cluster)")
    shared = Attribute("True when nodes share state (a terminal may reach a device"
                       " whose notifies reach another node)")

    def available():
        """Whether the shared state is reachable now."""

    def notified(device_id, kind, addr, last_access, now):
        """
        A notify (C{kind} ``"A"`` or ``"B"``) from C{device_id} reached this
        node from C{addr}: record its live entry as L{LiveWrites} says.
        """

    def locate(device_id):
        """
        Deferred firing with the device's L{LiveEntry}, or None when no
        node has it live; failing with L{ClusterUnavailable}.
        """

    def forward_connect(entry, device_id, session_id, nonce):
        """
        Ask C{entry.node} to send the device a connect request (from the
        socket its notifies reach) for C{session_id} and C{nonce}, naming
        this node as the tunnel host.  The session's retransmission
        schedule calls it again.

        @return: None, or a Deferred firing with how many nodes got the
            request (0: the owner is gone), or None if that is not known.
        """

    def publish_registry(records):
        """
        This node's registry records changed (C{records}: device ID ->
        L{p2pnat.deployment.registry.DeviceRecord}): merge them into the
        shared registry and tell every node.
        """

    def nodes():
        """Deferred firing with the list of L{NodeInfo} alive in the cluster."""

    def live_entries():
        """Deferred firing with every L{LiveEntry} in the cluster (status pages)."""

    def start():
        """Connect and keep connected (reconnects by itself)."""

    def stop():
        """Disconnect; a Deferred firing when done."""

class IClusterDirect(Interface):
    """
    What a shared cluster state adds for direct sessions to devices owned by
    another node (``docs/direct.rst``): the terminal's node asks, the owner
    sends the device the request.  A backend without it (one node, or a
    shared state that does not carry it) gives such devices no direct offer.
    """

    def ask_direct(entry, device_id, service, terminal_addr, direct_id, secret):
        """
        Ask C{entry.node} to send the device a direct connect request (from
        the socket its notifies reach) for a terminal at C{terminal_addr}
        wanting C{service}, with the direct C{secret} (which travels sealed,
        L{DirectSeal}) under the offer ID C{direct_id}.

        @return: a Deferred firing with the device's address as the owner
            sees its notifies once the owner sent the request, or with None
            (not sent, no answer within L{DIRECT_ANSWER_TIMEOUT}, or the
            shared state unreachable); it never fails.
        """

    def serve_direct(handler):
        """
        Take other nodes' L{ask_direct}s: C{handler(device_id, service,
        terminal_addr, direct_id, secret)} sends the request if this node
        may, and returns the device's address, or None if it sent nothing.
        """


def check_redis_setting(value):
    """The C{cluster.redis} setting's check: empty (a single node) or a URL L{parse_url} takes."""
    if value:
        from p2pnat.cluster.redis import parse_url

        parse_url(value)


def check_node_setting(value):
    """The C{cluster.node} setting's check: empty (the host name) or a valid node name."""
    if value:
        check_node_name(value)


def check_node_name(name):
    """A node name: 1-64 characters of a-z, 0-9, '-', '_' and '.' (it names Redis keys)."""
    ok = 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_.")
                                     for c in name)
    if not ok or name != name.lower():
        raise ValueError(f"node name {name!r}: 1-64 characters of a-z, 0-9, '-', '_', '.'")
    return name


class LiveWrites:
    """
    When a node writes a device's live entry to the shared store (the
    seed's notify rules, cluster-wide):

    - a notify B writes only when the device's address changed, or when
      the node has not written the entry since the store lost its data or
      the write failed (L{forget_all}, L{forget}: so a Redis restarted
      without its data is refilled within one notify-B interval);
    - a notify A writes when the address changed or the last written
      access time is L{rewrite_interval} old: once per access-check period
      for an agent's notify A every third of a period.

    So the last access written is always less than L{rewrite_interval}
    older than the last one this node saw, and another node holds the
    device live for that much longer than the period (L{LiveEntry.stale});
    the entry's expiry (L{expiry}) outlasts that.

    Pure: the caller says what it wrote (L{wrote}) and when a write failed
    or the store was lost (L{forget}, L{forget_all}).

    @param period: the access-check period, seconds.
    """

    def __init__(self, period):
        self.period = period
        self.rewrite = rewrite_interval(period)
        self._written = {}  # device ID -> (addr, last_access) as last written

    def __len__(self):
        return len(self._written)

    def due(self, device_id, kind, addr, last_access):
        """Whether this notify must write the device's live entry."""
        w = self._written.get(device_id)
        if w is None or w[0] != addr:
            return True
        if kind != "A" or last_access is None:
            return False
        return w[1] is None or last_access - w[1] >= self.rewrite

    def wrote(self, device_id, addr, last_access):
        self._written[device_id] = (addr, last_access)

    def forget(self, device_id):
        self._written.pop(device_id, None)

    def forget_all(self):
        self._written.clear()

    def expiry(self):
        """
        Seconds a live entry lives unless rewritten: as long as another node
        may hold it live (the period and L{rewrite_interval}), and some
        slack.
        """
        return int(self.period + self.rewrite + max(30, self.period / 10))


class WriteQueue:
    """
    The live-entry writes a node has in flight, at most C{cap}; beyond it
    they wait, one per device, the newest replacing the one waiting (a live
    entry is a whole value: nothing is lost, only merged).  A device keeps
    its place in the line when its write is replaced, so one that notifies
    often is not pushed back behind the others.

    Without the bound, a node that reconnected to Redis sent a write for
    every device whose notify came in, thousands of commands at once, which
    held the node up past the command timeout again (bench/cluster_notify.py).

    Pure: the caller says what it L{offer}s, takes what to send from
    L{next}, and says when a write is L{finished}.
    """

    def __init__(self, cap):
        if cap < 1:
            raise ValueError("the cap on writes in flight must be at least 1")
        self.cap = cap
        self.in_flight = 0
        self._waiting = {}  # device ID -> newest value waiting, oldest device first

    def __len__(self):
        return len(self._waiting)

    def offer(self, device_id, value):
        self._waiting[device_id] = value

    def next(self):
        """The next C{(device_id, value)} to send now (counted in flight), or None."""
        if self.in_flight >= self.cap or not self._waiting:
            return None
        device_id = next(iter(self._waiting))
        self.in_flight += 1
        return device_id, self._waiting.pop(device_id)

    def finished(self):
        """A write sent from L{next} was answered or failed."""
        self.in_flight = max(0, self.in_flight - 1)

    def drop(self):
        """Drop every waiting write (the store is gone): the devices whose writes were dropped."""
        dropped, self._waiting = list(self._waiting), {}
        return dropped


def newer(a, b):
    """
    Whether registry record C{a} replaces C{b} (either None) when records
    from several nodes' registries meet: a later ``created`` wins (the
    device was provisioned again), and at the same ``created`` a
    revocation wins (it can never be undone but by provisioning again).
    """
    if a is None:
        return False
    if b is None:
        return True
    if a.created != b.created:
        return a.created > b.created
    return a.revoked is not None and b.revoked is None


def cluster_keys(secret):
    """
    The cluster's two keys from the secret every node shares (the
    relay's terminal.secret, which nodes must share anyway so that a login
    cookie holds on every node): ``(message_key, seal_key)``.
    """
    return (hmac.new(secret, b"p2pnat cluster messages", hashlib.sha256).digest(),
            hmac.new(secret, b"p2pnat cluster registry seal", hashlib.sha256).digest())


class Signer:
    """
    Signs and checks the messages nodes send each other over pub/sub:
    anyone who can reach Redis can publish, and only a node's message may
    make another node act.  A message older than C{max_age} seconds (or
    from the future by as much) is refused, which bounds replays.
    """

    MAC_LEN = 32

    def __init__(self, key, max_age=10.0):
        self._key = key
        self.max_age = max_age

    def seal(self, fields, now):
        body = json.dumps({**fields, "ts": now}, separators=(",", ":"), sort_keys=True)
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        return mac + body

    def open(self, text, now):
        """The message's fields, or None if it is forged, garbled or too old."""
        if not isinstance(text, str) or len(text) > 4096 or len(text) < 2 * self.MAC_LEN:
            return None
        mac, body = text[:2 * self.MAC_LEN], text[2 * self.MAC_LEN:]
        want = hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, want):
            return None
        try:
            fields = json.loads(body)
            ts = float(fields["ts"])
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(fields, dict) or abs(now - ts) > self.max_age:
            return None
        return fields


#: Seconds a node waits for the owner's answer to L{IClusterState.ask_direct}:
#: the offer is useful only before the terminal's 200, which for a device of
#: another node comes after a connect request through the same owner.
DIRECT_ANSWER_TIMEOUT = 2.0


class DirectSeal:
    """
    A direct session's secret as it travels from the terminal's node to the
    device's owner over pub/sub: AES-256-GCM under the cluster's seal key,
    bound (associated data) to the offer's ID, the device and the asking
    node, so that whoever reads Redis never sees it, and a sealed secret
    cannot be replayed for another offer, device or node.
    """

    SECRET_LEN = 16
    _AD = b"p2pnat direct secret\0"

    def __init__(self, seal_key):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(seal_key)

    def _ad(self, direct_id, device_id, asker):
        return self._AD + direct_id + f"\0{device_id}\0{asker}".encode()

    def seal(self, secret, direct_id, device_id, asker):
        nonce = os.urandom(12)
        return (nonce + self._aead.encrypt(nonce, secret,
                                           self._ad(direct_id, device_id, asker))).hex()

    def open(self, text, direct_id, device_id, asker):
        """The secret; raises ValueError if it was not sealed for this offer, device and node."""
        from cryptography.exceptions import InvalidTag

        try:
            sealed = bytes.fromhex(text)
            secret = self._aead.decrypt(sealed[:12], sealed[12:],
                                        self._ad(direct_id, device_id, asker))
        except (InvalidTag, ValueError, TypeError):
            raise ValueError("direct secret not sealed for this offer")
        if len(secret) != self.SECRET_LEN:
            raise ValueError("direct secret of the wrong length")
        return secret


class RecordCodec:
    """
    Registry records as stored in Redis: JSON, the MAC key sealed
    (AES-256-GCM under the cluster's seal key, the device ID as associated
    data), so that a copy of Redis's data does not hand out devices' keys.
    Live fields (last access, address) are not part of it: they live in
    the live entries.
    """

    def __init__(self, seal_key):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(seal_key)

    def encode(self, r):
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, r.mac_key, r.id.encode())
        return json.dumps({"mac_key": base64.b64encode(sealed).decode(),
                           "fingerprint": r.cert_fingerprint, "mode": r.access_mode,
                           "credential": r.access_credential_hash, "created": r.created,
                           "revoked": r.revoked}, separators=(",", ":"))

    def decode(self, device_id, text):
        """
        The L{p2pnat.deployment.registry.DeviceRecord} stored as C{text}.

        @raise ValueError: not a record, or sealed under another key.
        """
        from cryptography.exceptions import InvalidTag

        from p2pnat.deployment.registry import DeviceRecord

        try:
            v = json.loads(text)
            sealed = base64.b64decode(v["mac_key"], validate=True)
            mac_key = self._aead.decrypt(sealed[:12], sealed[12:], device_id.encode())
            revoked = v["revoked"]
            return DeviceRecord(device_id, mac_key, str(v["fingerprint"]), str(v["mode"]),
                                v["credential"], float(v["created"]),
                                None if revoked is None else float(revoked), None, None, None)
        except InvalidTag:
            raise ValueError("sealed under another cluster key (nodes must share"
                             " terminal.secret)")
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"not a registry record: {e.__class__.__name__}")
