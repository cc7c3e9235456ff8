# -*- test-case-name: tests.unit.test_cluster_status -*-
"""
``p2pnat cluster status``: an operator's view of a relay cluster (or of a
single relay): nodes, the devices each owns, lobby nodes and their
clients, Redis's health, and the traffic each node reports
(L{p2pnat.cluster.stats}).

``p2pnat cluster admin-password``: the password file of the relays' admin
page (``admin.credential_file``; L{p2pnat.relay.admin}).

Reading is I/O (L{read_cluster}, L{read_single}); what is shown is made
by pure functions (L{summarize}, L{format_text}) from what was read and
the time.  Redis unreachable: one line on standard error, exit status 1.
"""

import json
import os
import secrets
import sys
from dataclasses import asdict, dataclass, field

from p2pnat.cli import CommandError

__all__ = ["Snapshot", "read_cluster", "read_single", "summarize", "format_text",
           "add_parser"]

#: The lobby cluster's keys: a set of its nodes' names, each node's set of
#: registered client IDs, and each logged-in client's node (with expiry).
LOBBY_NODES = "p2pnat:lobby:nodes"
LOBBY_CLIENTS = "p2pnat:lobby:clients:"
LOBBY_PRESENCE = "p2pnat:lobby:presence:"
#: Seconds the command waits for Redis in all.
TIMEOUT = 5.0
#: Live entries read at most (a status command, not an export).
MAX_ENTRIES = 1_000_000


@dataclass
class Snapshot:
    """
    What was read, before it is summarized: C{nodes} (name -> L{NodeInfo}),
    C{entries} (L{LiveEntry} list), C{stats} (name -> L{NodeStats}),
    C{lobby} (lobby node name -> its clients ``registered`` and ``online``),
    C{redis} (health, or None on a single node), C{registered} (devices in
    the registry, revoked ones included).
    """

    mode: str
    nodes: dict
    entries: list
    stats: dict
    lobby: dict = field(default_factory=dict)
    redis: dict | None = None
    registered: int | None = None
    period: float = 300.0
    where: str = ""


def parse_info(text):
    """Redis's INFO reply as a dict of its ``key:value`` lines."""
    info = {}
    for line in (text or "").splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


async def _scan(command, prefix):
    """C{(key, value)} of every string key under C{prefix}, in pages (at most L{MAX_ENTRIES})."""
    found, cursor = [], "0"
    while True:
        cursor, keys = await command("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        values = await command("MGET", *keys) if keys else []
        found += [(key, value) for key, value in zip(keys, values) if value]
        if str(cursor) == "0" or len(found) >= MAX_ENTRIES:
            return found


async def _lobby(command):
    """Lobby node name -> {"registered": clients in its registry, "online": logged in}."""
    if await command("TYPE", LOBBY_NODES) != "set":
        return {}
    nodes = {}
    for name in sorted(await command("SMEMBERS", LOBBY_NODES) or []):
        nodes[name] = {"registered": int(await command("SCARD", LOBBY_CLIENTS + name)),
                       "online": 0}
    for _, node in await _scan(command, LOBBY_PRESENCE):
        nodes.setdefault(node, {"registered": 0, "online": 0})["online"] += 1
    return nodes


async def read_cluster(command, seconds, url, period=300.0):
    """
    Read a cluster's state from its Redis.

    @param command: C{command(*args)} -> Deferred of one Redis command's reply.
    @param seconds: the clock (C{reactor.seconds}).
    @param url: the Redis URL (shown without its password).
    """
    from p2pnat.cluster.redis import NODES, REGISTRY, live_key, pairs
    from p2pnat.cluster.state import LiveEntry, NodeInfo
    from p2pnat.cluster.stats import read_stats

    start = seconds()
    await command("PING")
    rtt = seconds() - start
    info = parse_info(await command("INFO"))
    nodes = {}
    for name, text in pairs(await command("HGETALL", NODES)).items():
        n = NodeInfo.from_json(name, text)
        if n is not None:
            nodes[name] = n
    prefix = live_key("")
    entries = [e for e in (LiveEntry.from_json(key[len(prefix):], text)
                           for key, text in await _scan(command, prefix)) if e is not None]
    registered = int(await command("HLEN", REGISTRY))
    health = {"reachable": True, "version": info.get("redis_version"),
              "memory_used": info.get("used_memory_human"),
              "aof": info.get("aof_enabled") == "1", "rtt_ms": round(rtt * 1000, 2)}
    return Snapshot("cluster", nodes, entries, await read_stats(command),
                    await _lobby(command), health, registered, period, _display_url(url))


def _display_url(url):
    """The Redis URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{parts.port or 6379}{parts.path}"


def read_single(config, now):
    """
    Read a single relay's state from its state directory: the registry
    (devices, their last notify A and address, written by the relay every
    ``relay.sync_interval``) and its stats file.
    """
    import socket

    from p2pnat.cluster.state import LiveEntry, NodeInfo
    from p2pnat.cluster.stats import STATS_FILE, NodeStats
    from p2pnat.deployment import provision

    state_dir = config.path_of("relay.state_dir")
    period = config["relay.access_check_period"]
    node = config["cluster.node"] or socket.gethostname().split(".")[0].lower()
    try:
        records = provision.devices(state_dir)
    except provision.ProvisionError as e:
        raise CommandError(str(e)) from e
    entries = [LiveEntry(r.id, node, r.addr_host, r.addr_port, r.last_access) for r in records
               if r.active and r.addr_host and r.last_access is not None
               and now - r.last_access <= period]
    stats = {}
    try:
        with open(os.path.join(state_dir, STATS_FILE)) as f:
            s = NodeStats.from_json(f.read())
        if s is not None:  # the node's name as the relay knows it
            node = s.node
            stats[node] = s
    except OSError:
        pass
    entries = [LiveEntry(e.device_id, node, e.host, e.port, e.last_access) for e in entries]
    info = NodeInfo(node, tuple(config["cluster.addresses"] or config["udp.listen"]), "", 0,
                    stats[node].at if node in stats else 0.0)
    return Snapshot("single", {node: info}, entries, stats, {}, None,
                    len(records), period, state_dir)


def summarize(snap, now, devices=False):
    """
    The status as plain data (what ``--json`` prints).

    @param devices: list each node's devices (else counts only).
    """
    from p2pnat.cluster.redis import NODE_TTL
    from p2pnat.cluster.stats import INTERVAL

    fresh = 3 * INTERVAL + 1  # a record older than this: the node is not writing it
    owned = {}
    for e in sorted(snap.entries, key=lambda e: e.device_id):
        owned.setdefault(e.node, []).append(e)
    nodes = []
    for name in sorted(set(snap.nodes) | set(owned)):
        n = snap.nodes.get(name)
        if snap.mode == "single":
            alive = name in snap.stats and now - snap.stats[name].at <= fresh
        else:
            alive = n is not None and now - n.seen <= NODE_TTL
        s = snap.stats.get(name)
        row = {"name": name, "addresses": list(n.addresses) if n else [],
               "tunnels_to": f"{n.tunnel_host}:{n.tunnel_port}" if n and n.tunnel_port else None,
               "last_heartbeat": n.seen if n and n.seen else None, "alive": alive,
               "devices": len(owned.get(name, [])),
               "online": sum(1 for e in owned.get(name, []) if not e.stale(now, snap.period)),
               "stats": ({k: v for k, v in asdict(s).items() if k != "node"}
                         if s is not None and alive and now - s.at <= fresh else None)}
        if devices:
            row["device_list"] = [{
                "id": e.device_id, "last_access": e.last_access,
                "nat_address": f"[{e.host}]:{e.port}" if ":" in e.host else f"{e.host}:{e.port}",
                "stale": e.stale(now, snap.period)} for e in owned.get(name, [])]
        nodes.append(row)
    lobby = [{"name": name, "clients_online": v["online"],
              "clients_registered": v["registered"]} for name, v in sorted(snap.lobby.items())]
    alive = [n for n in nodes if n["alive"]]
    return {
        "mode": snap.mode, "where": snap.where, "time": now, "nodes": nodes,
        "nodes_alive": len(alive), "devices_registered": snap.registered,
        "devices_live": len(snap.entries), "redis": snap.redis, "lobby_nodes": lobby,
        "sessions": {k: sum((n["stats"] or {}).get(k, 0) for n in alive)
                     for k in ("sessions", "tunnels", "streams", "terminals",
                               "bytes_from_devices", "bytes_to_devices")},
    }


def _when(t, now):
    from p2pnat.relay.admin.view import format_time

    return format_time(t, now) if t else "-"


def format_text(status):
    """The status as lines for a terminal."""
    from p2pnat.relay.admin.view import format_bytes

    now = status["time"]
    out = []
    if status["mode"] == "single":
        out.append(f"single node (no [cluster]): state directory {status['where']}")
    else:
        r = status["redis"]
        out.append(f"cluster on {status['where']}: {status['nodes_alive']} of"
                   f" {len(status['nodes'])} relay nodes alive")
        out.append(f"redis: reachable, version {r['version']}, {r['memory_used']} used,"
                   f" AOF {'on' if r['aof'] else 'OFF (a restart loses the registry)'},"
                   f" round trip {r['rtt_ms']} ms")
    out.append(f"devices: {status['devices_registered']} in the registry (revoked ones"
               f" included), {status['devices_live']} live")
    s = status["sessions"]
    out.append(f"traffic (nodes alive): {s['sessions']} sessions waiting, {s['tunnels']}"
               f" tunnels ({s['streams']} carrying streams), {s['terminals']} terminals;"
               f" {format_bytes(s['bytes_from_devices'])} from devices,"
               f" {format_bytes(s['bytes_to_devices'])} to devices")
    for n in status["nodes"]:
        out.append("")
        state = "alive" if n["alive"] else (
            "not running (no recent stats)" if status["mode"] == "single" else "GONE")
        out.append(f"node {n['name']}: {state}; addresses {', '.join(n['addresses']) or '-'};"
                   f" last heartbeat {_when(n['last_heartbeat'], now)}")
        out.append(f"  devices owned: {n['devices']} ({n['online']} online)")
        st = n["stats"]
        if st is not None:
            out.append(f"  {st['sessions']} sessions waiting, {st['tunnels']} tunnels"
                       f" ({st['streams']} streams), {st['terminals']} terminals,"
                       f" {format_bytes(st['bytes_from_devices'])} from devices,"
                       f" {format_bytes(st['bytes_to_devices'])} to devices")
        for d in n.get("device_list", ()):
            out.append(f"  {d['id']:<24} {d['nat_address']:<24} last access"
                       f" {_when(d['last_access'], now)}{' (stale)' if d['stale'] else ''}")
    if status["mode"] != "single":
        out.append("")
        if not status["lobby_nodes"]:
            out.append("lobby: no lobby nodes")
        for lob in status["lobby_nodes"]:
            out.append(f"lobby node {lob['name']}: {lob['clients_online']} clients logged in"
                       f" ({lob['clients_registered']} registered)")
    return out


# -- the commands ------------------------------------------------------------

def _run(coroutine_fn):
    """Run C{coroutine_fn(reactor)} on the reactor; its result, or its exception raised."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    outcome = {}

    def go():
        d = Deferred.fromCoroutine(coroutine_fn(reactor))
        timer = reactor.callLater(TIMEOUT, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            outcome["result"] = result
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    result = outcome.get("result")
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


async def _from_redis(reactor, url, period):
    import txredisapi

    from p2pnat.cluster.redis import parse_url

    host, port, user, password, db = parse_url(url)
    conn = await txredisapi.Connection(host, port, dbid=db, reconnect=False, password=password,
                                       username=user, connectTimeout=TIMEOUT,
                                       replyTimeout=TIMEOUT, convertNumbers=False)
    try:
        return await read_cluster(conn.execute_command, reactor.seconds, url, period)
    finally:
        await conn.disconnect()


def status(args, out=None):
    import time

    from p2pnat.daemon import config as C
    from p2pnat.relay.tap import SCHEMA

    out = out or sys.stdout
    try:
        config = C.load(args.config, SCHEMA, {"cluster.redis": args.redis})
    except C.ConfigError as e:
        raise CommandError(str(e)) from e
    url, period = config["cluster.redis"], config["relay.access_check_period"]
    if url:
        try:
            snap = _run(lambda reactor: _from_redis(reactor, url, period))
        except Exception as e:
            reason = str(e).replace("Redis error: ", "") or e.__class__.__name__
            print(f"p2pnat cluster status: cannot read redis {_display_url(url)}: {reason}",
                  file=sys.stderr)
            return 1
    else:
        snap = read_single(config, time.time())
    result = summarize(snap, time.time(), devices=args.devices)
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        out.write("\n".join(format_text(result)) + "\n")
    return 0


def admin_password(args, out=None):
    from p2pnat.deployment import pki
    from p2pnat.deployment.registry import hash_credential

    out = out or sys.stdout
    if args.generate:
        password = secrets.token_urlsafe(18)  # 24 characters
    else:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                password = f.read().strip("\r\n")
        except OSError as e:
            raise CommandError(f"{args.password_file}: {e.strerror}") from e
        if len(password) < 12:
            raise CommandError(f"{args.password_file}: an admin password has at least 12"
                               " characters")
    try:
        pki.write_secret(args.out, hash_credential(password) + "\n", replace=args.force)
    except pki.PKIError as e:
        raise CommandError(str(e)) from e
    print(f"{args.out}: admin password hash (0600); set [admin] credential_file to it",
          file=out)
    if args.generate:
        print(f"admin password (shown only now; stored hashed): {password}", file=out)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser("cluster", help="a relay cluster's state; the admin page's"
                              " password", description="A relay cluster's state, and the"
                              " password file of the relays' admin page.")
    sub = p.add_subparsers(dest="cluster_command", metavar="COMMAND")
    s = sub.add_parser("status", help="nodes, their devices and traffic, Redis's health",
                       description="Nodes (addresses, last heartbeat, alive), the devices each"
                       " owns, lobby nodes, Redis's health and the sessions the nodes report."
                       " Without [cluster] redis, the single relay's state directory.")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--config", help="the relay's relay.toml (its [cluster] redis, or its"
                       " state directory)")
    where.add_argument("--redis", help="redis://HOST:PORT/DB of the cluster")
    s.add_argument("--devices", action="store_true", help="list each node's devices")
    s.add_argument("--json", action="store_true", help="JSON instead of text")
    s.set_defaults(func=status)
    a = sub.add_parser("admin-password", help="make the relay admin page's password file",
                       description="Write the scrypt hash of the admin page's password to a"
                       " new file (mode 0600) for [admin] credential_file.")
    a.add_argument("--out", required=True, help="the file to write")
    given = a.add_mutually_exclusive_group(required=True)
    given.add_argument("--password-file", help="read the password (12 characters or more)"
                       " from this file")
    given.add_argument("--generate", action="store_true",
                       help="make a 24-character password and print it once")
    a.add_argument("--force", action="store_true", help="replace an existing file")
    a.set_defaults(func=admin_password)
    p.set_defaults(func=lambda args: p.print_help() or 2, cluster_command=None)
