# -*- test-case-name: tests.process.test_netcheck -*-
"""
``p2pnat netcheck``: what this host's network does to UDP, and what paths
to expect with which kinds of peer (``docs/netcheck.rst``).

The lobby comes from ``--lobby`` or from a client's ``--config``
(``client.lobby``, ``client.discovery``, ``client.interface``), relays
from ``--relay``; the measuring is :mod:`p2pnat.peer.netcheck`'s, the
verdicts and words :mod:`p2pnat.protocol.netcheck`'s.
"""

import json
import sys

from p2pnat.cli import CommandError

#: Bounds of --budget and --lifetime-max, seconds.
BUDGET = (0.5, 30.0)
LIFETIME_MAX = (1.0, 240.0)


def _resolve_all(role, texts, resolver=None):
    from p2pnat.peer.netcheck import resolve

    servers = []
    for text in texts:
        try:
            servers.append(resolve(role, text, resolver))
        except ValueError as e:
            raise CommandError(f"--{role} {text}: {e}")
    return servers


def _discovery(lobbies, config_discovery, resolver=None):
    """
    The discovery addresses, the primary first: the configured ones, else
    every ``--lobby`` of the primary's family, else (one lobby) it and the
    next port, as ``p2pnat peer`` does.
    """
    primary = next((s for s in lobbies if s.addresses), None)
    if primary is None:
        return []
    first = primary.addresses[0]
    v6 = ":" in first[0]
    if config_discovery:
        out = []
        for server in _resolve_all("lobby", config_discovery, resolver):
            out.extend(a for a in server.addresses[:1] if (":" in a[0]) == v6)
        return out or [first]
    out = [first]
    for server in lobbies:
        for a in server.addresses:
            if (":" in a[0]) == v6 and a not in out:
                out.append(a)
                break
    if len(out) == 1 and first[1] < 65535:
        out.append((first[0], first[1] + 1))
    return out


def plan_servers(args, resolver=None):
    """
    ``(lobbies, relays, discovery, interface)`` for ``args``, or a
    :class:`CommandError` that says what to give.
    """
    lobby_texts = list(args.lobby or [])
    config_discovery, interface = [], None
    if args.config:
        from p2pnat.cli.peer import CLIENT_SCHEMA
        from p2pnat.daemon import config as C

        try:
            config = C.load(args.config, CLIENT_SCHEMA)
        except C.ConfigError as e:
            raise CommandError(str(e))
        if not lobby_texts:
            if not config["client.lobby"]:
                raise CommandError(f"{args.config}: client.lobby is not set; give --lobby "
                                   "HOST:PORT")
            lobby_texts = [config["client.lobby"]]
            config_discovery = list(config["client.discovery"])
        interface = config["client.interface"] or None
    if not lobby_texts and not args.relay:
        raise CommandError("no server to measure against: give --lobby HOST:PORT (a p2pnat "
                           "lobby's UDP address) or --config client.toml (from `p2pnat client "
                           "add`)")
    lobbies = _resolve_all("lobby", lobby_texts, resolver)
    relays = _resolve_all("relay", args.relay or [], resolver)
    return lobbies, relays, _discovery(lobbies, config_discovery, resolver), interface


def run(args):
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from p2pnat.peer.netcheck import NetCheck, default_portmap, udp_listener

    if not BUDGET[0] <= args.budget <= BUDGET[1]:
        raise CommandError(f"--budget must be {BUDGET[0]:g}-{BUDGET[1]:g} seconds")
    if not LIFETIME_MAX[0] <= args.lifetime_max <= LIFETIME_MAX[1]:
        raise CommandError(f"--lifetime-max must be {LIFETIME_MAX[0]:g}-{LIFETIME_MAX[1]:g}"
                           " seconds")
    lobbies, relays, discovery, interface = plan_servers(args)
    if args.no_portmap:
        portmap, note = None, "turned off by --no-portmap"
    else:
        portmap, note = default_portmap(reactor, args.gateway)
    level = LogLevel.info if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(level)])],
        redirectStandardIO=False)
    check = NetCheck(reactor, udp_listener(reactor, interface), [*lobbies, *relays], discovery,
                     portmap=portmap, portmap_note=note,
                     lifetime=args.lifetime_max if args.lifetime else None, budget=args.budget)
    outcome = {}

    def done(result):
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: check.run().addBoth(done))
    reactor.run()
    result = outcome.get("result")
    if result is None:
        raise CommandError("interrupted")
    if hasattr(result, "getErrorMessage"):
        raise CommandError(f"failed: {result.getErrorMessage()}")
    if args.json:
        print(json.dumps(result.to_json()), flush=True)
    else:
        print(result.to_text(), flush=True)
    return 0 if result.answered else 1


def add_parser(subparsers):
    p = subparsers.add_parser(
        "netcheck", help="what this host's NAT does to UDP, and the paths to expect",
        description="Measure how this host's NAT maps, filters and allocates UDP ports, "
        "hairpinning, IPv4 and IPv6 reachability, the gateway's port mapping protocols and "
        "the latency to each lobby and relay, then say which path `p2pnat peer connect` "
        "takes with each kind of peer. Takes under 3 s unless --lifetime is given.")
    p.add_argument("--lobby", action="append", metavar="HOST:PORT",
                   help="a lobby's UDP address (repeatable; the first is the primary; default:"
                        " client.lobby of --config)")
    p.add_argument("--relay", action="append", metavar="HOST:PORT",
                   help="a relay's UDP address, for reachability and latency (repeatable)")
    p.add_argument("--config", metavar="FILE",
                   help="a client.toml from `p2pnat client add`: its lobby, discovery addresses"
                        " and interface")
    p.add_argument("--lifetime", action="store_true",
                   help="also measure how long the NAT keeps an idle mapping (takes up to"
                        " --lifetime-max seconds more)")
    p.add_argument("--lifetime-max", type=float, default=120.0, metavar="SECONDS",
                   help="the longest idle interval of --lifetime (default: 120)")
    p.add_argument("--no-portmap", action="store_true",
                   help="do not ask the gateway which of UPnP, NAT-PMP and PCP it offers")
    p.add_argument("--gateway", metavar="IP",
                   help="the gateway to ask about port mapping (default: the default route's)")
    p.add_argument("--budget", type=float, default=2.5, metavar="SECONDS",
                   help="seconds for everything but --lifetime (default: 2.5)")
    p.add_argument("--json", action="store_true", help="one JSON object (docs/netcheck.rst)")
    p.add_argument("--verbose", "-v", action="store_true", help="log what happens on stderr")
    p.set_defaults(func=run)
