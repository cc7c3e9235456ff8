# -*- test-case-name: tests.unit.test_cluster_status -*-
"""
What a relay node reports about its own traffic, for ``p2pnat cluster
status`` and the admin page: one small record per node, written with the
node's heartbeat (every L{INTERVAL} seconds).

- In a cluster: a field of the hash L{STATS_KEY} (node name -> JSON); a
  record is only shown for a node that is alive (``p2pnat:nodes``), so a
  dead node's last record needs no expiry.
- On a single node: the file L{STATS_FILE} in the relay's state
  directory, replaced whole each time.

Pure: the record, its codec and the byte counter; the relay
(L{p2pnat.relay.tap}) fills and writes it.
"""

import json
from dataclasses import asdict, dataclass

__all__ = ["INTERVAL", "STATS_KEY", "STATS_FILE", "NodeStats", "Traffic", "read_stats",
           "write_stats", "parse_stats"]

#: Seconds between two writes of a node's record.
INTERVAL = 5.0
STATS_KEY = "p2pnat:stats"
STATS_FILE = "node-stats.json"


@dataclass(frozen=True)
class NodeStats:
    """
    One node's traffic at time C{at} (POSIX seconds).

    @ivar sessions: terminals waiting for a device's new tunnel (sessions
        whose connect request is out).
    @ivar tunnels: devices' tunnels open on the node, idle ones included.
    @ivar streams: tunnels carrying a terminal's stream now.
    @ivar terminals: terminal connections open on the node.
    @ivar bytes_from_devices: bytes received on devices' tunnels since the
        node started (TLS payload: frames and their headers).
    @ivar bytes_to_devices: bytes sent on devices' tunnels since it started.
    """

    node: str
    at: float
    sessions: int = 0
    tunnels: int = 0
    streams: int = 0
    terminals: int = 0
    bytes_from_devices: int = 0
    bytes_to_devices: int = 0

    def to_json(self):
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text):
        """The record stored as C{text}, or None if it is not one (never raises)."""
        try:
            v = json.loads(text)
            return cls(str(v["node"]), float(v["at"]), *(
                max(0, int(v[k])) for k in ("sessions", "tunnels", "streams", "terminals",
                                            "bytes_from_devices", "bytes_to_devices")))
        except (ValueError, TypeError, KeyError, OverflowError):
            return None


class Traffic:
    """Bytes through devices' tunnels on this node, both ways (plain counters)."""

    __slots__ = ("from_devices", "to_devices")

    def __init__(self):
        self.from_devices = 0
        self.to_devices = 0


def write_stats(command, stats):
    """
    Store C{stats} in the cluster: C{command(*args)} is a Redis command's
    Deferred (L{p2pnat.cluster.redis.RedisLink.command}).
    """
    return command("HSET", STATS_KEY, stats.node, stats.to_json())


def parse_stats(found):
    """
    The records of a HGETALL of L{STATS_KEY} (a dict, or a flat list of
    names and values): node name -> L{NodeStats}; garbage is left out.
    """
    if not isinstance(found, dict):
        found = found or []
        found = dict(zip(found[0::2], found[1::2]))
    records = {}
    for name, text in found.items():
        record = NodeStats.from_json(text) if isinstance(text, str) else None
        if record is not None and record.node == name:
            records[name] = record
    return records


async def read_stats(command):
    """Every node's record in the cluster (L{parse_stats}); see L{write_stats}."""
    return parse_stats(await command("HGETALL", STATS_KEY))
