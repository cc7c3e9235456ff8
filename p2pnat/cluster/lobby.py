# -*- test-case-name: tests.unit.test_lobby_cluster,tests.process.test_lobby_cluster -*-
"""
Lobby nodes sharing a Redis (``[cluster] redis`` in ``lobby.toml``): two
clients logged into different nodes are introduced as if on one.

What is shared (``docs/cluster.rst``, "Lobby nodes"):

- ``p2pnat:lobby:presence:ID``: the node client ID is logged into
  (L{PresenceWrites} says when it is written; it expires by itself);
- ``p2pnat:lobby:nodes``: set of the nodes' names; ``p2pnat:lobby:clients:NODE``:
  the IDs in node NODE's client registry, so that a request for an ID no
  node knows is refused as "no such client", one for a known client
  logged in nowhere as "peer offline".  The registries (and the clients'
  MAC keys) stay on their nodes: a client logs into the node its
  ``client.toml`` names, and only that node needs its key.

Channels: ``p2pnat:lobby:ch:node:NAME``, what other nodes ask of node
NAME, every message signed (L{p2pnat.cluster.state.Signer}): ``invite``
(send the Invite to a client logged in here), ``answer`` (that client's
Answer, for the asking node to introduce), ``refuse``.  The session key,
and the invitee's bind secret for the relay, travel sealed under the
cluster's seal key (L{KeySeal}): Redis never sees them, and only the two
nodes of the request receive them.  A relayed session runs on the asking
node alone (L{p2pnat.lobby.server}).

This module is the Redis side (L{RedisLobbyCluster}) and its pure rules;
the introduction logic is in L{p2pnat.lobby.server.Lobby}.
"""

import os

from twisted.internet.defer import succeed
from zope.interface import Attribute, Interface, implementer

from p2pnat.cluster.state import ClusterUnavailable, Signer, cluster_keys
from p2pnat.daemon.logs import Logger, Throttle
from p2pnat.protocol import p2p as M

PREFIX = "p2pnat:lobby:"
NODES = PREFIX + "nodes"
#: A random value the first node to reach a Redis without one sets: a
#: different value after a reconnection means Redis lost its data (the
#: relays' cluster keeps its own, L{p2pnat.cluster.redis.EPOCH}).
EPOCH = PREFIX + "epoch"
#: Refusal code for a request the node cannot route: the peer is not logged
#: in here and the cluster's shared state cannot be reached now.
REFUSAL_CLUSTER_DOWN = 6
#: Client IDs written per SADD (a registry of any size in bounded commands).
ID_BATCH = 500


def presence_key(client_id):
    return PREFIX + "presence:" + client_id


def clients_key(node):
    return PREFIX + "clients:" + node


def node_channel(node):
    return PREFIX + "ch:node:" + node


#: Where is client ARGV[1]?  KEYS[1]: its presence key, KEYS[2]: the node
#: set.  Returns {"online", node}, {"offline"} (some node's registry has
#: it) or {"unknown"}: one round trip for every answer a request needs.
_LOCATE = """
local node = redis.call('GET', KEYS[1])
if node then return {'online', node} end
for _, n in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('SISMEMBER', 'p2pnat:lobby:clients:' .. n, ARGV[1]) == 1 then
    return {'offline'}
  end
end
return {'unknown'}
"""

#: Delete KEYS[1] only if it still names this node (ARGV[1]): a client that
#: moved to another node keeps the entry that node wrote.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Replace node ARGV[1]'s client set with ARGV[2..]: KEYS[1] the set, KEYS[2] the node set.
_CLIENTS = """
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, BATCH do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + BATCH - 1, #ARGV)))
end
return #ARGV - 1
""".replace("BATCH", str(ID_BATCH))


class PresenceWrites:
    """
    When a node writes a client's presence to Redis: at login, when the
    client's address changed, when the entry was written C{2 * keepalive}
    seconds ago or more (every second keepalive), and whenever the node
    has not written it since Redis came back without its data (a new
    epoch, L{RedisLobbyCluster}).  The entry expires after
    C{4 * keepalive} seconds and a node that forgets the client (logout,
    three missed keepalives) deletes it, so other nodes see a client that
    is gone for at most that long; a request routed to it meanwhile gets
    "peer offline" back from the node, or at once when that node is dead.

    Pure: times are passed in.
    """

    def __init__(self, keepalive):
        self.keepalive = keepalive
        self._written = {}  # client ID -> (address, time) as last written

    def due(self, client_id, addr, now):
        w = self._written.get(client_id)
        return w is None or w[0] != addr or now - w[1] >= 2 * self.keepalive

    def wrote(self, client_id, addr, now):
        self._written[client_id] = (addr, now)

    def forget(self, client_id):
        self._written.pop(client_id, None)

    def forget_all(self):
        self._written.clear()

    def expiry(self):
        return int(4 * self.keepalive)


#: What L{KeySeal} seals: purpose -> (associated data prefix, length).
_PURPOSES = {"session": (b"p2pnat lobby session\0", 32),
             "bind": (b"p2pnat lobby bind secret\0", M.BIND_SECRET_LEN)}


class KeySeal:
    """
    A session's secret as it travels between two nodes: AES-256-GCM under
    the cluster's seal key, bound (associated data) to what it is (its
    C{purpose}), the session ID and both clients, so that Redis (and
    whoever reads it) never sees it, and a sealed secret cannot be moved to
    another session nor stand for another secret.

    Purposes: ``"session"``, the session key (32 bytes); ``"bind"``, the
    bind secret of the session's role on the other node (16 bytes, see
    L{M.bind_proof}).
    """

    def __init__(self, seal_key):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(seal_key)

    def _ad(self, purpose, session_id, a, b):
        return _PURPOSES[purpose][0] + session_id + f"\0{a}\0{b}".encode()

    def seal(self, secret, session_id, a, b, nonce, purpose="session"):
        return (nonce + self._aead.encrypt(nonce, secret,
                                           self._ad(purpose, session_id, a, b))).hex()

    def open(self, text, session_id, a, b, purpose="session"):
        """The secret; raises ValueError if it was not sealed for this session and purpose."""
        from cryptography.exceptions import InvalidTag

        try:
            sealed = bytes.fromhex(text)
            key = self._aead.decrypt(sealed[:12], sealed[12:],
                                     self._ad(purpose, session_id, a, b))
        except (InvalidTag, ValueError, TypeError):
            raise ValueError(f"{purpose} key not sealed for this session")
        if len(key) != _PURPOSES[purpose][1]:
            raise ValueError(f"{purpose} key of the wrong length")
        return key


# -- the fields of introductions as they travel between nodes -------------------------

def addr_out(addr):
    return [addr[0], int(addr[1])]


def addr_in(value):
    """An ``(ip, port)`` from a message; ValueError if it is not one."""
    host, port = value
    port = int(port)
    if not isinstance(host, str) or not 0 <= port <= 65535:
        raise ValueError(f"not an address: {value!r}")
    return (host, port)


def nat_out(nat):
    return nat.encode().hex()


def nat_in(text):
    return M.NatInfo.decode(bytes.fromhex(text))[0]


def candidates_in(values):
    """Candidates from a message: valid ones only, at most L{M.MAX_CANDIDATES}."""
    found = tuple(addr_in(v) for v in values[:M.MAX_CANDIDATES])
    return tuple(c for c in found if M.valid_candidate(c))


class ILobbyCluster(Interface):
    """What a lobby node shares with the others (L{p2pnat.lobby.server.Lobby} uses it)."""

    node = Attribute("this node's name")

    def available():
        """Whether the shared state is reachable now."""

    def present(client_id, addr, now):
        """Client C{client_id} is logged in here (from C{addr}): write its presence if due."""

    def gone(client_id):
        """Client C{client_id} logged out or timed out here."""

    def locate(client_id):
        """
        Deferred firing with ``("online", node)``, ``("offline", None)`` or
        ``("unknown", None)``; failing with L{ClusterUnavailable}.
        """

    def send(node, fields):
        """
        Send node C{node} a signed message: a Deferred firing with how many
        nodes got it (0: that node is gone), failing with L{ClusterUnavailable}.
        """

    def seal_key(secret, session_id, a, b, purpose="session"):
        """The session key, or another secret of the session, as a message carries it (L{KeySeal})."""

    def open_key(text, session_id, a, b, purpose="session"):
        """The secret from a message; ValueError if it is not one sealed for that purpose."""


@implementer(ILobbyCluster)
class RedisLobbyCluster:
    """
    L{ILobbyCluster} on Redis, for one lobby node.

    @param secret: the secret every lobby node shares (their messages are
        signed and session keys sealed under keys derived from it).
    @param lobby: what this node does for the others:
        C{lobby.cluster_message(fields)} for each genuine message, and
        C{lobby.client_ids()}: the IDs of this node's registry.
    """

    log = Logger(namespace="p2pnat.cluster.lobby")

    def __init__(self, reactor, url, node, secret, keepalive, lobby, random=None):
        # Here, not at the top: a single lobby (which imports this module's
        # pure helpers) never loads the Redis client.
        from p2pnat.cluster.redis import RedisLink

        self.clock = reactor
        self.node = node
        self.lobby = lobby
        message_key, seal_key = cluster_keys(secret)
        self.signer = Signer(message_key)
        self.keys = KeySeal(seal_key)
        self.writes = PresenceWrites(keepalive)
        self.link = RedisLink(reactor, url, [node_channel(node)], self._message,
                              self._availability)
        self._random = random or os.urandom
        self._throttle = Throttle(reactor)
        self._ids = None  # the client IDs last written to Redis
        self._epoch = None  # the Redis epoch what this node wrote went into

    def available(self):
        return self.link.available

    def start(self):
        self.link.start()

    def stop(self):
        return self.link.stop()

    # -- presence ----------------------------------------------------------------------

    def present(self, client_id, addr, now):
        if not self.link.available or not self.writes.due(client_id, addr, now):
            return
        self.writes.wrote(client_id, addr, now)
        d = self.link.command("SET", presence_key(client_id), self.node,
                              "EX", self.writes.expiry())

        def failed(failure):
            self.writes.forget(client_id)  # the next keepalive tries again
            self._warn("presence", "cannot write the presence of {client}: {error}",
                       client=client_id, error=failure.getErrorMessage())

        d.addErrback(failed)

    def gone(self, client_id):
        self.writes.forget(client_id)
        if self.link.available:
            d = self.link.command("EVAL", _RELEASE, 1, presence_key(client_id), self.node)
            d.addErrback(lambda f: None)  # it expires by itself

    def locate(self, client_id):
        d = self.link.command("EVAL", _LOCATE, 2, presence_key(client_id), NODES, client_id)

        def where(reply):
            reply = [str(x) for x in (reply or ["unknown"])]
            if reply[0] == "online" and len(reply) > 1:
                return ("online", reply[1])
            return (reply[0] if reply[0] in ("offline", "unknown") else "unknown", None)

        return d.addCallback(where)

    def sync_clients(self):
        """
        Write this node's client IDs to Redis when they changed (or Redis
        came back); the lobby calls it every sync round.  Never fails.
        """
        ids = sorted(self.lobby.client_ids())
        if not self.link.available or ids == self._ids:
            return succeed(None)
        self._ids = ids
        d = self.link.command("EVAL", _CLIENTS, 2, clients_key(self.node), NODES, self.node,
                              *ids)

        def failed(failure):
            self._ids = None
            self._warn("clients", "cannot write this node's client list: {error}",
                       error=failure.getErrorMessage())

        return d.addErrback(failed)

    # -- messages ----------------------------------------------------------------------

    def send(self, node, fields):
        text = self.signer.seal({**fields, "from": self.node}, self.clock.seconds())
        return self.link.command("PUBLISH", node_channel(node), text).addCallback(int)

    def seal_key(self, secret, session_id, a, b, purpose="session"):
        return self.keys.seal(secret, session_id, a, b, self._random(12), purpose)

    def open_key(self, text, session_id, a, b, purpose="session"):
        return self.keys.open(text, session_id, a, b, purpose)

    def _message(self, channel, text):
        fields = self.signer.open(text, self.clock.seconds())
        if fields is None:
            self._warn("forged", "message on {channel} refused: not signed with the lobby"
                       " cluster's key, garbled or too old", channel=channel)
            return
        if fields.get("from") == self.node:
            return
        try:
            self.lobby.cluster_message(fields)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            self._warn("bad", "message on {channel} ignored: {error}", channel=channel,
                       error=f"{e.__class__.__name__}: {e}")

    def _availability(self, available):
        if available:
            self._check_epoch()

    def _check_epoch(self):
        """
        After a (re)connection: if Redis lost its data (a new epoch, or
        the check failed), forget what this node wrote, so that each
        client's presence is written again at its next keepalive and the
        client list at once.  A Redis that kept its data still has them:
        only what changed meanwhile is written (L{present}, L{sync_clients}).
        """
        mine = self._random(8).hex()
        d = self.link.command("SET", EPOCH, mine, "NX", "GET")

        def got(epoch):
            epoch = mine if epoch is None else str(epoch)  # None: there was none, now mine
            if epoch != self._epoch:
                self._rewrite(epoch)
            self.sync_clients()

        def failed(failure):
            self._warn("epoch", "cannot read the cluster's epoch; writing presence and the"
                       " client list again: {error}", error=failure.getErrorMessage())
            self._rewrite(None)
            self.sync_clients()

        d.addCallbacks(got, failed)

    def _rewrite(self, epoch):
        self.writes.forget_all()
        self._ids = None
        self._epoch = epoch

    def _warn(self, kind, text, **fields):
        held = self._throttle(("lobby-cluster", kind))
        if held is not None:
            self.log.warn(text + " ({held} more since the last such line)", held=held, **fields)


def lobby_secret(path):
    """
    The lobby cluster's shared secret, read from C{path} (at least 32
    bytes; every node has a copy).

    @raise ValueError: missing or too short, with what to do.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read the cluster secret {path}: {e.strerror}; make one with"
                         f" `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {path}`"
                         " and copy it to every lobby node")
    if len(secret) < 32:
        raise ValueError(f"the cluster secret {path} is shorter than 32 bytes")
    return secret


__all__ = ["REFUSAL_CLUSTER_DOWN", "ClusterUnavailable", "ILobbyCluster", "KeySeal",
           "PresenceWrites", "RedisLobbyCluster", "lobby_secret"]
