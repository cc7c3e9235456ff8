# -*- test-case-name: tests.unit.test_cluster,tests.process.test_cluster -*-
"""
The Redis backend of L{p2pnat.cluster.state.IClusterState}: relay nodes
that share a Redis (``[cluster] redis = "redis://HOST:PORT/DB"``).

Keys (``docs/cluster.rst`` has the operations each costs):

- ``p2pnat:registry``: hash, device ID -> record (L{RecordCodec});
  ``p2pnat:registry:version``: bumped by every change;
- ``p2pnat:live:ID``: the device's L{LiveEntry} (with the owner's access-check
  period, which tells other nodes how often it is rewritten), with an
  expiry (L{LiveWrites.expiry});
- ``p2pnat:nodes``: hash, node name -> L{NodeInfo} (refreshed every
  L{HEARTBEAT} seconds; a node not heard from in L{NODE_TTL} is gone).

Channels (pub/sub), every message signed (L{Signer}):

- ``p2pnat:ch:registry``: "these devices' records changed": every node
  reads them again from the hash and applies them (a revocation closes
  the device's tunnels on every node at once);
- ``p2pnat:ch:node:NAME``: what other nodes ask of node NAME: send a
  device a connect request naming the asking node's tunnel address
  (``connect``); send a device a direct connect request for a terminal of
  the asking node, the secret sealed (``direct``), and the answer to that
  (``direct-answer``, on the asking node's channel); the device's
  notifies now reach another node (``released``).

Two connections, each kept up by a L{ClientService} with backoff: one for
commands, one subscribed.  While either is down the state is unavailable:
reads fail at once with L{ClusterUnavailable}, writes are dropped and
redone from later notifies (L{LiveWrites.forget_all}); registry changes
made meanwhile are pushed when Redis is back, and when Redis lost its
data (a new epoch) the registry and every live entry are written again.
"""

import os
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory
from zope.interface import implementer

from p2pnat.cluster.state import (
    DIRECT_ANSWER_TIMEOUT,
    ClusterUnavailable,
    DirectSeal,
    IClusterDirect,
    IClusterState,
    LiveEntry,
    LiveWrites,
    NodeInfo,
    RecordCodec,
    Signer,
    WriteQueue,
    cluster_keys,
)
from p2pnat.daemon.logs import Logger, Throttle

PREFIX = "p2pnat:"
REGISTRY = PREFIX + "registry"
VERSION = PREFIX + "registry:version"
#: A random value set when the registry is first filled: when it changes,
#: Redis lost its data, and every node merges its own registry again.
EPOCH = PREFIX + "registry:epoch"
NODES = PREFIX + "nodes"
CH_REGISTRY = PREFIX + "ch:registry"
#: Seconds between a node's "I am alive" writes, and after which a silent node is gone.
HEARTBEAT = 5.0
NODE_TTL = 20.0
#: Seconds of the node's own running in which a connection with a command
#: waiting must read something from Redis, else it is taken for dead.
COMMAND_TIMEOUT = 2.0
#: Live-entry writes a node has in flight at most; beyond it they wait, one
#: per device, the newest winning (L{WriteQueue}).
LIVE_IN_FLIGHT = 64
#: The longest a command may wait (times COMMAND_TIMEOUT) while its connection
#: still answers or the node is held up, before the connection is dropped.
LONGEST_WAIT = 5
#: Records merged per script call (each is one script's worth of work in Redis).
PUSH_BATCH = 200
#: Devices named in one registry message.
MESSAGE_IDS = 100
#: Records read (and decoded) per page when a node reads the whole registry.
RELOAD_PAGE = 500
#: Direct requests a node waits for answers to at once (more get no offer).
MAX_DIRECT_ASKS = 256


def live_key(device_id):
    return PREFIX + "live:" + device_id


def node_channel(name):
    return PREFIX + "ch:node:" + name


def pairs(reply):
    """A HGETALL reply (a flat list, or a dict) as a dict."""
    if isinstance(reply, dict):
        return reply
    reply = reply or []
    return dict(zip(reply[0::2], reply[1::2]))


def parse_url(url):
    """
    ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` -> ``(host, port, user,
    password, db)``.

    @raise ValueError: anything else (``rediss://``, TLS, is not supported yet).
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"not a redis://HOST[:PORT][/DB] address: {url!r}")
    path = parts.path.strip("/")
    db = int(path) if path else None
    return (parts.hostname, parts.port or 6379, unquote(parts.username or "") or None,
            unquote(parts.password) if parts.password else None, db)


#: Merges records into the registry hash: a record replaces the stored one
#: when it is newer (p2pnat.cluster.state.newer: later "created", or a
#: revocation at the same "created").  ARGV: id, created, revoked ("" if
#: not), record, ... .  Returns the version, then the IDs that changed.
_MERGE = """
local changed = {}
for i = 1, #ARGV, 4 do
  local id, created, revoked = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local cur = redis.call('HGET', KEYS[1], id)
  local win = not cur
  if cur then
    local c = cjson.decode(cur)
    win = created > c.created or (created == c.created and revoked ~= ''
                                  and c.revoked == cjson.null)
  end
  if win then
    redis.call('HSET', KEYS[1], id, ARGV[i + 3])
    changed[#changed + 1] = id
  end
end
local v = redis.call('GET', KEYS[2])
if #changed > 0 or not v then v = redis.call('INCR', KEYS[2]) end
table.insert(changed, 1, tostring(v))
return changed
"""


class _Factory(Factory):
    """Builds one kind of txredisapi protocol for a L{ClientService}."""

    isLazy = False  # what txredisapi's protocols ask of their factory
    noisy = False

    def __init__(self, link, protocol, user, password, db):
        self.link = link
        self.protocol = protocol
        self._args = {"username": user, "password": password, "dbid": db}

    def buildProtocol(self, addr):
        p = self.protocol(charset="utf-8", convertNumbers=False, **self._args)
        p.factory = self
        return p

    def stopTrying(self):
        pass  # a refused AUTH or SELECT: the ClientService retries, with backoff

    def connectionError(self, message):
        self.link.log.error("redis {url}: {message}", url=self.link.where, message=message)


class _Watched:
    """A txredisapi protocol that tells its link when it is ready, and when gone."""

    kind = None  # "commands" or "subscriber": the link's _KIND_up and _KIND_down

    def connectionMade(self):
        self.whenConnected().addCallback(getattr(self.factory.link, f"_{self.kind}_up"))
        return super().connectionMade()

    def connectionLost(self, why):
        super().connectionLost(why)
        getattr(self.factory.link, f"_{self.kind}_down")(self)


class _Commands(_Watched, txredisapi.RedisProtocol):
    kind = "commands"

    #: When this connection last read anything from Redis (the link's clock).
    last_read = None

    def dataReceived(self, data, *args, **kwargs):
        # txredisapi calls it again itself (unpause=True) with what it held back.
        self.last_read = self.factory.link.clock.seconds()
        return super().dataReceived(data, *args, **kwargs)


class _Subscriber(_Watched, txredisapi.SubscriberProtocol):
    kind = "subscriber"

    def messageReceived(self, pattern, channel, message):
        self.factory.link.on_message(channel, message)


class _Wait:
    """
    A command waiting for its reply: its connection and Deferred, when it
    was sent, when the node last got going after being held up, its timer
    and when that is due.
    """

    __slots__ = ("conn", "d", "sent", "resumed", "call", "due")

    def __init__(self, conn, d, sent):
        self.conn, self.d, self.sent, self.resumed = conn, d, sent, sent
        self.call = self.due = None


class RedisLink:
    """
    The node's two connections to Redis, kept up with backoff.

    @param on_message: C{on_message(channel, message)} for each pub/sub message.
    @param on_change: C{on_change(available)} when both connections are up
        (and subscribed) or one was lost.
    """

    log = Logger(namespace="p2pnat.cluster.redis")

    def __init__(self, reactor, url, channels, on_message, on_change,
                 timeout=COMMAND_TIMEOUT):
        host, port, user, password, db = parse_url(url)
        self.where = f"{host}:{port}"
        self.clock = reactor
        self.channels = list(channels)
        self.on_message = on_message
        self.on_change = on_change
        self.timeout = timeout
        self.commands = None  # the command connection, when up
        self._abandoned = None  # the command connection dropped for not answering
        self.subscriber = None  # the subscribed connection, when up
        endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
        policy = backoffPolicy(initialDelay=0.1, maxDelay=5.0)
        self._services = [
            ClientService(endpoint, _Factory(self, kind, user, password, db),
                          retryPolicy=policy, clock=reactor)
            for kind in (_Commands, _Subscriber)]

    @property
    def available(self):
        return self.commands is not None and self.subscriber is not None

    def start(self):
        for s in self._services:
            s.startService()

    def stop(self):
        was, self.on_change = self.available, lambda available: None
        d = Deferred.fromCoroutine(self._stop())
        if was:
            self.log.info("disconnected from redis {url}", url=self.where)
        return d

    async def _stop(self):
        for s in self._services:
            await s.stopService()

    def command(self, *args):
        """
        Deferred firing with the reply to one command; failing at once with
        L{ClusterUnavailable} when Redis is not connected, and when the
        connection read nothing for C{timeout} seconds of the node's own
        running while the command waited, or after C{LONGEST_WAIT} timeouts
        in all (then the connection is dropped: its replies would no longer
        match its commands).

        A node that falls behind is not taken for one whose Redis died: the
        timeout is judged only after the reactor has read the connection
        once more, against the last time it read anything (replies come in
        order, so a connection still delivering replies will deliver this
        one), and counted again from when the node got going if its timer
        ran late.  Judged at the timer alone, a node held up past the
        timeout dropped a connection whose replies were waiting in its
        socket, and the reconnection's rewrites held it up again
        (bench/cluster_notify.py).
        """
        conn = self.commands
        if not self.available:
            return fail(ClusterUnavailable(f"redis {self.where} not connected"))
        try:
            d = conn.execute_command(*args)
        except txredisapi.ConnectionError as e:
            return fail(ClusterUnavailable(str(e)))
        wait = _Wait(conn, d, self.clock.seconds())
        self._arm(wait, self.timeout)

        def done(result):
            if wait.call.active():
                wait.call.cancel()
            return result

        def failed(failure):
            if failure.check(ClusterUnavailable):
                return failure
            # An error reply, or the connection lost under the command.
            raise ClusterUnavailable(f"redis {self.where}: {failure.getErrorMessage()}")

        return d.addBoth(done).addErrback(failed)

    def _arm(self, wait, delay):
        wait.due = self.clock.seconds() + delay
        wait.call = self.clock.callLater(delay, self._expired, wait)

    def _expired(self, wait):
        if self.clock.seconds() - wait.due > self.timeout / 4:
            # The timer ran late: the node was held up (a busy machine), so
            # the command may not even have been written yet.  The timeout
            # counts from when the node got going again.
            wait.resumed = self.clock.seconds()
        # Timers run before the reactor polls its sockets: a reply that came
        # while the node was held up is still unread.  Judge after one more
        # pass of the reactor (a call for "now" made by a timer runs after
        # the next poll).
        wait.call = self.clock.callLater(0, self._judge, wait)

    def _judge(self, wait):
        if wait.d.called:
            return
        now = self.clock.seconds()
        heard = max(wait.sent, wait.resumed, getattr(wait.conn, "last_read", None) or 0)
        left = min(heard + self.timeout, wait.sent + self.timeout * LONGEST_WAIT) - now
        if left > 0 and wait.conn is not self._abandoned:
            # The connection still delivers replies, in order, or the node
            # has not given it a fair hearing yet: this reply may come.
            self._arm(wait, left)
            return
        self._timed_out(wait.conn, wait.d)

    def _timed_out(self, conn, d):
        if not d.called:
            d.errback(ClusterUnavailable(f"redis {self.where}: no answer in {self.timeout}s"))
        if conn is not self._abandoned:
            # One line and one abort per connection: the commands sent after
            # the first unanswered one time out in the same few moments, and
            # a busy node had thousands (a line each, bench/cluster_notify.py).
            self._abandoned = conn
            self.log.warn("redis {url} did not answer in {timeout}s; reconnecting",
                          url=self.where, timeout=self.timeout)
            conn.transport.abortConnection()

    # -- the connections ------------------------------------------------------

    def _commands_up(self, conn):
        self.commands = conn
        self._changed()

    def _commands_down(self, conn):
        if self.commands is conn:
            self._lost("commands")
            self.commands = None

    def _subscriber_up(self, conn):
        d = conn.subscribe(self.channels)

        def subscribed(_):
            if conn.connected:
                self.subscriber = conn
                self._changed()

        def refused(failure):
            self.log.warn("redis {url}: cannot subscribe: {error}", url=self.where,
                          error=failure.getErrorMessage())
            conn.transport.abortConnection()

        d.addCallbacks(subscribed, refused)

    def _subscriber_down(self, conn):
        if self.subscriber is conn:
            self._lost("subscriber")
            self.subscriber = None

    def _changed(self):
        if self.available:
            self.log.info("connected to redis {url}", url=self.where)
            self.on_change(True)

    def _lost(self, which):
        if self.available:
            self.log.warn("lost redis {url} ({which} connection); serving this node's own"
                          " devices and reconnecting", url=self.where, which=which)
            # Both connections are needed: a node that misses messages
            # would miss revocations, so the other is restarted too.
            other = self.subscriber if which == "commands" else self.commands
            self.on_change(False)
            if other is not None and other.transport is not None:
                other.transport.loseConnection()


@implementer(IClusterState, IClusterDirect)
class RedisState:
    """
    L{IClusterState} on Redis, for one relay node.

    @param reactor: the reactor (its clock times everything here).
    @param url: ``redis://...``.
    @param node: this node's name.
    @param addresses: its public addresses (UDP notify ``host:port``).
    @param secret: the secret all nodes share (L{cluster_keys}).
    @param period: the access-check period, seconds.
    @param tunnel: C{tunnel()} -> ``(host, port)`` devices open tunnels to
        on this node (known once the node listens).
    @param relay: what the node does on others' behalf:
        C{relay.send_connect(device_id, session_id, nonce, host, port)},
        C{relay.device_left(device_id)}, and
        C{relay.apply_records(records)} (records read from the shared
        registry) and C{relay.local_records()} (this node's registry).
    """

    log = Logger(namespace="p2pnat.cluster")
    shared = True

    def __init__(self, reactor, url, node, addresses, secret, period, tunnel, relay):
        self.clock = reactor
        self.node = node
        self.addresses = tuple(addresses)
        self.tunnel = tunnel
        self.relay = relay
        message_key, seal_key = cluster_keys(secret)
        self.signer = Signer(message_key)
        self.codec = RecordCodec(seal_key)
        self.direct_seal = DirectSeal(seal_key)
        self._direct_handler = None  # serve_direct's, if this node takes direct asks
        self._direct_asks = {}  # offer ID -> (Deferred, timeout call), answers awaited
        self.writes = LiveWrites(period)
        self.queue = WriteQueue(LIVE_IN_FLIGHT)
        self._pumping = False
        self.link = RedisLink(reactor, url, [CH_REGISTRY, node_channel(node)],
                              self._message, self._availability)
        self._throttle = Throttle(reactor)
        self._seen_version = None  # registry version this node's table is at
        self._epoch = None  # the registry epoch this node's records were merged into
        self._unpushed = {}  # local records not merged yet (Redis was away)
        self._pushed = {}  # device ID -> local record as last merged
        self._round = None
        self._last_heartbeat = None

    def available(self):
        return self.link.available

    def start(self):
        self.link.start()

    def stop(self):
        for direct_id in list(self._direct_asks):
            self._direct_answered(direct_id, None)
        d = succeed(None)
        if self.link.available:
            d = self.link.command("HDEL", NODES, self.node)
            d.addErrback(lambda f: None)
        return d.addCallback(lambda _: self.link.stop())

    # -- live entries -----------------------------------------------------------

    def notified(self, device_id, kind, addr, last_access, now):
        if not self.link.available or addr is None:
            return
        if not self.writes.due(device_id, kind, addr, last_access):
            return
        self.writes.wrote(device_id, addr, last_access)
        # With the period: other nodes judge the entry by how often it is
        # rewritten (LiveEntry.stale), not as if it were this node's table.
        self.queue.offer(device_id, LiveEntry(device_id, self.node, addr[0], addr[1],
                                              last_access, self.writes.period))
        self._pump()

    def _pump(self):
        """Send the waiting live-entry writes the cap lets through."""
        if self._pumping:
            return  # a write that failed at once: the loop below goes on
        self._pumping = True
        try:
            while (item := self.queue.next()) is not None:
                device_id, entry = item
                d = self.link.command("SET", live_key(device_id), entry.to_json(),
                                      "EX", self.writes.expiry(), "GET")
                d.addCallbacks(self._live_written, self._live_failed,
                               callbackArgs=(device_id,), errbackArgs=(device_id,))
                d.addBoth(self._live_finished)
        finally:
            self._pumping = False

    def _live_finished(self, _):
        self.queue.finished()
        if not self.link.available:
            for device_id in self.queue.drop():
                self.writes.forget(device_id)  # the next notify tries again
        self._pump()

    def _live_written(self, old, device_id):
        before = LiveEntry.from_json(device_id, old) if old else None
        if before is not None and before.node != self.node:
            # The device moved here (its old node died, or it chose
            # another): the old node must stop taking it for its own.
            self._publish(node_channel(before.node), {"t": "released", "device": device_id})

    def _live_failed(self, failure, device_id):
        self.writes.forget(device_id)  # the next notify tries again
        self._warn("live", "cannot write live entry of {device_id}: {error}",
                   device_id=device_id, error=failure.getErrorMessage())

    def locate(self, device_id):
        d = self.link.command("GET", live_key(device_id))
        return d.addCallback(lambda text: LiveEntry.from_json(device_id, text) if text else None)

    def forward_connect(self, entry, device_id, session_id, nonce):
        host, port = self.tunnel()
        return self._publish(node_channel(entry.node), {
            "t": "connect", "from": self.node, "device": device_id, "sid": session_id.hex(),
            "nonce": nonce.hex(), "host": host, "port": port})

    # -- direct requests for another node's terminals ---------------------------------

    def ask_direct(self, entry, device_id, service, terminal_addr, direct_id, secret):
        key = direct_id.hex()
        if not self.link.available or len(self._direct_asks) >= MAX_DIRECT_ASKS \
                or key in self._direct_asks:
            return succeed(None)
        answer = Deferred()
        call = self.clock.callLater(DIRECT_ANSWER_TIMEOUT, self._direct_answered, key, None)
        self._direct_asks[key] = (answer, call)
        self._publish(node_channel(entry.node), {
            "t": "direct", "from": self.node, "device": device_id, "service": service,
            "terminal": [terminal_addr[0], int(terminal_addr[1])], "id": direct_id.hex(),
            "secret": self.direct_seal.seal(secret, direct_id, device_id, self.node)})
        return answer

    def serve_direct(self, handler):
        self._direct_handler = handler

    def _direct_asked(self, fields):
        asker, device_id = str(fields["from"]), str(fields["device"])
        direct_id = bytes.fromhex(fields["id"])
        if asker == self.node or self._direct_handler is None or len(direct_id) != 16:
            return
        secret = self.direct_seal.open(str(fields["secret"]), direct_id, device_id, asker)
        host, port = fields["terminal"]
        terminal = (str(host), int(port))
        addr = self._direct_handler(device_id, str(fields["service"]), terminal, direct_id,
                                    secret)
        self._publish(node_channel(asker), {
            "t": "direct-answer", "from": self.node, "id": direct_id.hex(),
            "addr": None if addr is None else [addr[0], int(addr[1])]})

    def _direct_answered(self, direct_id, addr):
        """The owner's answer (or, with C{addr} None, its timeout) to one of this node's asks."""
        pending = self._direct_asks.pop(direct_id, None)
        if pending is None:
            return  # answered already, timed out, or never asked
        answer, call = pending
        if call.active():
            call.cancel()
        answer.callback(addr)

    def live_entries(self):
        return Deferred.fromCoroutine(self._live_entries())

    async def _live_entries(self, limit=100000):
        entries, cursor = [], "0"
        while True:
            cursor, keys = await self.link.command("SCAN", cursor, "MATCH",
                                                   live_key("*"), "COUNT", 1000)
            if keys:
                values = await self.link.command("MGET", *keys)
                for key, text in zip(keys, values):
                    e = text and LiveEntry.from_json(key[len(live_key("")):], text)
                    if e:
                        entries.append(e)
            if cursor == "0" or len(entries) >= limit:
                return entries

    # -- nodes ------------------------------------------------------------------

    def nodes(self):
        d = self.link.command("HGETALL", NODES)

        def alive(found):
            now = self.clock.seconds()
            infos = [NodeInfo.from_json(name, text) for name, text in pairs(found).items()]
            return sorted((i for i in infos if i is not None and now - i.seen <= NODE_TTL),
                          key=lambda i: i.name)

        return d.addCallback(alive)

    def _heartbeat(self, now):
        host, port = self.tunnel()
        info = NodeInfo(self.node, self.addresses, host, port, now)
        self._last_heartbeat = now
        return self.link.command("HSET", NODES, self.node, info.to_json())

    # -- the registry -------------------------------------------------------------

    def publish_registry(self, records):
        for r in records.values():
            if self._pushed.get(r.id) != r:
                self._unpushed[r.id] = r
        if self.link.available and self._round is None:
            self.round()

    def round(self):
        """
        One periodic round (the relay's store rounds call it): push the
        registry changes not merged yet (all of this node's records when
        Redis lost its data), read the whole registry again if a change
        message was missed, say this node is alive.  Never fails.
        """
        if self._round is not None or not self.link.available:
            return succeed(None)
        d = self._round = Deferred.fromCoroutine(self._do_round())

        def done(result):
            self._round = None

        return d.addErrback(self._round_failed).addBoth(done)

    async def _do_round(self):
        now = self.clock.seconds()
        mine = os.urandom(8).hex()
        epoch = await self.link.command("SET", EPOCH, mine, "NX", "GET")
        epoch = mine if epoch is None else epoch  # None: there was none, and this is it now
        if epoch != self._epoch:
            # A new Redis, or one restarted without its data (a new epoch):
            # the registry is rebuilt from every node's own, read again, and
            # every device's live entry written again from its next notify.
            self.log.info("merging this node's {n} devices into the registry in redis",
                          n=len(self.relay.local_records()))
            self._unpushed.update({r.id: r for r in self.relay.local_records().values()})
            self.writes.forget_all()
            self._seen_version = None
            # Recorded now: a merge that fails keeps what it did not merge
            # (in _unpushed), so the next round goes on from there instead
            # of merging the whole registry again.
            self._epoch = epoch
        version = await self.link.command("GET", VERSION)
        if self._unpushed or version is None:
            batch, self._unpushed = self._unpushed, {}
            try:
                await self._merge(batch)
            except Exception:
                for r in batch.values():
                    self._unpushed.setdefault(r.id, r)
                raise
            version = await self.link.command("GET", VERSION)
        if version is not None and version != self._seen_version:
            await self._reload(version)
        if self._last_heartbeat is None or now - self._last_heartbeat >= HEARTBEAT:
            await self._heartbeat(now)

    def _round_failed(self, failure):
        self._warn("round", "cluster round failed; retrying next round: {error}",
                   error=failure.getErrorMessage())

    async def _merge(self, records):
        """Merge C{records} (a dict, emptied as its batches are merged) into the registry."""
        items = list(records.values())
        for i in range(0, max(1, len(items)), PUSH_BATCH):  # once at least: sets the version
            args = []
            for r in items[i:i + PUSH_BATCH]:
                args += [r.id, repr(r.created), "" if r.revoked is None else repr(r.revoked),
                         self.codec.encode(r)]
            reply = await self.link.command("EVAL", _MERGE, 2, REGISTRY, VERSION, *args)
            for r in items[i:i + PUSH_BATCH]:
                self._pushed[r.id] = r
                del records[r.id]  # merged: a failure later on does not redo it
            changed = [str(x) for x in reply[1:]]
            for j in range(0, len(changed), MESSAGE_IDS):
                self._publish(CH_REGISTRY, {"t": "registry", "ids": changed[j:j + MESSAGE_IDS],
                                            "v": str(reply[0])})

    async def _reload(self, version):
        """
        Read the whole registry again.  A registry larger than a page is
        read in pages (HSCAN), each decoded and applied before the next is
        asked for: read at once, tens of thousands of records held the
        reactor (parsing, unsealing) longer than L{COMMAND_TIMEOUT}, other
        commands' timers fired before their answers were read, the node
        dropped its connection, and the reconnection read everything again.
        """
        size = await self.link.command("HLEN", REGISTRY)
        if int(size or 0) <= RELOAD_PAGE:
            found = await self.link.command("HGETALL", REGISTRY)
            self.relay.apply_records(self._decode(pairs(found)))
        else:
            cursor = "0"
            while True:
                cursor, found = await self.link.command("HSCAN", REGISTRY, cursor,
                                                        "COUNT", RELOAD_PAGE)
                self.relay.apply_records(self._decode(pairs(found)))
                if str(cursor) == "0":
                    break
        self._seen_version = version

    def _decode(self, texts):
        records = {}
        for device_id, text in texts.items():
            if not text:
                continue
            try:
                records[device_id] = self.codec.decode(device_id, text)
            except ValueError as e:
                self._warn("record", "registry record of {device_id} in redis ignored: {why}",
                           device_id=device_id, why=e)
        return records

    async def _registry_changed(self, ids, version):
        values = await self.link.command("HMGET", REGISTRY, *ids)
        self.relay.apply_records(self._decode(dict(zip(ids, values or []))))
        try:
            if self._seen_version is not None and int(version) == int(self._seen_version) + 1:
                self._seen_version = version  # else the next round reads everything
        except ValueError:
            pass

    # -- messages -----------------------------------------------------------------

    def _publish(self, channel, fields):
        """Publish a signed message: a Deferred of how many got it (None: not sent)."""
        d = self.link.command("PUBLISH", channel, self.signer.seal(fields, self.clock.seconds()))
        d.addErrback(lambda f: self._warn("publish", "cannot publish to {channel}: {error}",
                                          channel=channel, error=f.getErrorMessage()))
        return d

    def _message(self, channel, text):
        fields = self.signer.open(text, self.clock.seconds())
        if fields is None:
            self._warn("forged", "message on {channel} refused: not signed with the cluster's"
                       " key, garbled or too old", channel=channel)
            return
        try:
            kind = fields["t"]
            if channel == CH_REGISTRY and kind == "registry":
                ids = [str(i) for i in fields["ids"]][:MESSAGE_IDS]
                if ids:
                    d = Deferred.fromCoroutine(self._registry_changed(ids, str(fields["v"])))
                    d.addErrback(self._round_failed)
            elif channel == node_channel(self.node) and kind == "connect":
                if fields["from"] == self.node:
                    return
                self.relay.send_connect(str(fields["device"]), bytes.fromhex(fields["sid"]),
                                        bytes.fromhex(fields["nonce"]), str(fields["host"]),
                                        int(fields["port"]))
            elif channel == node_channel(self.node) and kind == "direct":
                self._direct_asked(fields)
            elif channel == node_channel(self.node) and kind == "direct-answer":
                addr = fields["addr"]
                if addr is not None:
                    host, port = addr
                    addr = (str(host), int(port))
                self._direct_answered(str(fields["id"]), addr)
            elif channel == node_channel(self.node) and kind == "released":
                self.relay.device_left(str(fields["device"]))
        except (KeyError, TypeError, ValueError) as e:
            self._warn("bad", "message on {channel} ignored: {error}", channel=channel,
                       error=f"{e.__class__.__name__}: {e}")

    def _availability(self, available):
        if available:
            # The round checks at once whether Redis lost its data (a new
            # epoch): only then is every device's entry written again and
            # the whole registry read again.  Done at every reconnection, a
            # node that fell behind added that load and fell behind again.
            self._last_heartbeat = None
            self.round()
        else:
            for device_id in self.queue.drop():
                self.writes.forget(device_id)  # the next notify tries again

    def _warn(self, kind, text, **fields):
        held = self._throttle(("cluster", kind))
        if held is not None:
            self.log.warn(text + " ({held} more since the last such line)", held=held, **fields)

