# -*- test-case-name: tests.lab.test_portmap_lab -*-
"""
``python -m p2pnat.portmap``: ask this host's gateway for a port mapping
and hold it, or see what the gateway offers.  Events are JSON lines on
standard output.

``map --port PORT [--transport udp|tcp] [--protocols pcp,nat-pmp,upnp]
[--budget S] [--lifetime S] [--gateway IP] [--duration S]``
    Listen on UDP ``PORT`` (so that what reaches the mapping shows as
    ``{"event": "datagram"}``), run a PortMapper for it, print
    ``{"event": "mapping", ...}`` on every change and
    ``{"event": "first", "mapping": ..., "took": seconds}`` after the
    first race; on SIGTERM/SIGINT or
    after ``--duration``, delete the mapping and print
    ``{"event": "stopped"}``.
``probe [--budget S] [--gateway IP]``
    Print what the gateway offers (``pcp``, ``nat-pmp``, ``upnp``,
    ``external``) and exit.
"""

import argparse
import json
import sys

from twisted.internet.protocol import DatagramProtocol

from p2pnat.portmap import PROTOCOLS, PortMapper, probe

#: The most of a received datagram that is printed.
SHOWN = 200


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def _mapping(mapping):
    if mapping is None:
        return None
    return {"protocol": mapping.protocol, "external": f"{mapping.external[0]}:{mapping.external[1]}",
            "internal_port": mapping.internal_port, "lifetime": mapping.lifetime,
            "granted_at": mapping.granted_at}


class _Show(DatagramProtocol):
    def datagramReceived(self, data, addr):
        emit("datagram", source=f"{addr[0]}:{addr[1]}",
             data=data[:SHOWN].decode("utf-8", "replace"))


def _protocols(text):
    names = tuple(p for p in text.split(",") if p)
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown protocol(s): {', '.join(unknown)}")
    return names


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m p2pnat.portmap")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("map", help="hold a mapping of a local UDP port")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    m.add_argument("--protocols", type=_protocols, default=PROTOCOLS)
    m.add_argument("--budget", type=float, default=1.0)
    m.add_argument("--lifetime", type=int, default=7200)
    m.add_argument("--gateway")
    m.add_argument("--duration", type=float, default=3600.0)
    p = sub.add_parser("probe", help="what the gateway offers")
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--gateway")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from twisted.internet import reactor

    if args.command == "probe":
        try:
            d = probe(reactor, args.gateway, args.budget)
        except ValueError as e:
            print(f"p2pnat.portmap: {e}", file=sys.stderr)
            return 2
        d.addCallback(lambda found: emit("probe", **found)).addBoth(lambda _: reactor.stop())
        reactor.run()
        return 0

    try:
        mapper = PortMapper(reactor, args.port, transport=args.transport,
                            protocols=args.protocols, gateway=args.gateway,
                            budget=args.budget, lifetime=args.lifetime)
    except ValueError as e:
        print(f"p2pnat.portmap: {e}", file=sys.stderr)
        return 2
    if args.transport == "udp":
        reactor.listenUDP(args.port, _Show())
    mapper.subscribe(lambda mapping: emit("mapping", mapping=_mapping(mapping)))

    def start():
        started = reactor.seconds()
        mapper.startService()
        # The service's first race is under way: a second call shares it.
        mapper.map().addCallback(lambda mapping: emit(
            "first", mapping=_mapping(mapping), took=round(reactor.seconds() - started, 3)))

    def stop():
        return mapper.stopService().addCallback(lambda _: emit("stopped"))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.callLater(args.duration, reactor.stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
