# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
``p2pnat lab``: build, inspect and tear down named NAT labs by hand.

``up`` builds a lab that outlives the command (its state file is under
``/run/p2pnat-lab/``), ``down`` removes it, ``status``/``list`` show what
exists.  Needs root, ``ip`` and ``nft``.
"""

_PROBE_PORT = 3478


def _nat_spec(text):
    import argparse

    from p2pnat.lab.nft import KINDS

    name, sep, kind = text.partition("=")
    if not sep or not name or not kind:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST=KIND")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    return name, kind


def _rate_spec(text):
    import argparse

    name, sep, rate = text.partition("=")
    try:
        return name, float(rate) if sep else 10.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST[=RATE]") from None


def add_parser(subparsers):
    """Register ``p2pnat lab`` and its commands."""
    p = subparsers.add_parser(
        "lab",
        help="build and tear down NAT lab topologies (root)",
        description="Network namespaces with real kernel NAT, for trying p2pnat by hand.",
    )
    p.set_defaults(func=lambda args: p.print_help() or 2)
    sub = p.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")

    up = sub.add_parser("up", help="build a named lab and leave it up")
    up.add_argument("--name", required=True, help="the lab's name (a-z0-9, up to 12)")
    up.add_argument("--nat", action="append", type=_nat_spec, default=[], metavar="HOST=KIND",
                    help="a host behind a router of KIND (cone, symmetric-random, "
                    "symmetric-sequential, double, public); repeatable")
    up.add_argument("--server", default="relay", help="name of the public server (default relay)")
    up.add_argument("--server-addresses", type=int, default=2,
                    help="public addresses of the server (default 2, for RFC 5780 tests)")
    up.add_argument("--delay-ms", type=int, default=0, help="delay on every router's WAN link")
    up.add_argument("--loss", type=float, default=0.0, help="loss %% on every router's WAN link")
    up.add_argument("--ipv6", action="store_true",
                    help="dual-stack: global IPv6 on the internet segment and on every home"
                         " router's LAN, behind a stateful IPv6 firewall (no NAT66)")
    up.add_argument("--same-lan", action="store_true",
                    help="put every LAN on 192.168.1.0/24 (same private range)")
    up.add_argument("--background", action="append", type=_rate_spec, default=[],
                    metavar="HOST[=RATE]", help="a background host beside HOST opening RATE "
                    "new UDP flows per second to the server; repeatable")
    up.add_argument("--no-probe-server", action="store_true",
                    help=f"do not start the probe echo server on the server (udp {_PROBE_PORT})")
    up.add_argument("--duration", type=int, default=86400,
                    help="seconds the lab's own processes run at most (default a day)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="tear a named lab down")
    down.add_argument("--name", required=True)
    down.set_defaults(func=cmd_down)

    for cmd in ("status", "list"):
        st = sub.add_parser(cmd, help="show the labs that exist (and one in detail with --name)")
        st.add_argument("--name", help="show this lab in detail")
        st.set_defaults(func=cmd_status)


def _error(e):
    from p2pnat.cli import CommandError

    return CommandError(str(e))


def _require(tools=("ip", "nft")):
    from p2pnat.lab.topology import unavailable_reason

    reason = unavailable_reason(tools)
    if reason:
        raise _error(reason)


def cmd_up(args):
    """Build the lab described by the options and leave it up."""
    import subprocess

    from p2pnat.lab import Lab, LabError

    _require()
    if not args.nat:
        raise _error("give at least one --nat HOST=KIND")
    try:
        lab = Lab(name=args.name, persistent=True, ipv6=args.ipv6)
    except LabError as e:
        raise _error(e) from e
    try:
        server = lab.add_server(args.server, addresses=args.server_addresses)
        routers = {}
        for host, kind in args.nat:
            router = lab.add_router(
                f"r{host}"[:12],
                kind=kind,
                lan="192.168.1.0/24" if args.same_lan and kind != "public" else None,
                delay_ms=args.delay_ms,
                loss_pct=args.loss,
                ipv6=args.ipv6,
            )
            routers[host] = router
            lab.add_host(host, behind=router)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if not args.no_probe_server:
            listen = [f"--listen={ip}:{_PROBE_PORT}" for ip in server.ips]
            server.popen(server.python("-m", "p2pnat.lab.probe", "serve", *listen,
                                       f"--duration={args.duration}"), **quiet)
        for host, rate in args.background:
            if host not in routers or routers[host].kind == "public":
                raise LabError(f"--background {host}: no NAT host of that name")
            bg = lab.add_host(f"bg{host}"[:12], behind=routers[host])
            bg.popen(bg.python("-m", "p2pnat.lab.probe", "flows", f"--to={server.ip}:9",
                               f"--rate={rate}", f"--duration={args.duration}"), **quiet)
    except (LabError, ValueError) as e:
        lab.close()
        raise _error(e) from e
    except BaseException:
        lab.close()
        raise
    lab.detach()
    print(f"lab {args.name} is up")
    print(lab.describe())
    some_host = args.nat[0][0]
    print()
    print("enter a namespace:")
    print(f"  ip netns exec {lab.nodes[some_host].ns} bash")
    if not args.no_probe_server:
        print("ask the server what a host's NAT looks like:")
        print(f"  ip netns exec {lab.nodes[some_host].ns} {server.python()[0]}"
              f" -m p2pnat.lab.probe query --to {server.ip}:{_PROBE_PORT}")
    print(f"tear it down:  p2pnat lab down --name {args.name}")
    return 0


def cmd_down(args):
    """Tear a named lab down."""
    from p2pnat.lab import LabError, destroy_named

    _require(("ip",))
    try:
        gone = destroy_named(args.name)
    except LabError as e:
        raise _error(e) from e
    print(f"lab {args.name} is down ({len(gone)} namespaces removed)")
    return 0


def cmd_status(args):
    """List the labs, or show one."""
    from p2pnat.lab import state
    from p2pnat.lab.topology import netns_list

    existing = set(netns_list())
    states = state.load_states(state.STATE_DIR)
    if args.name:
        # A named lab, or any lab by its id (as in a namespace name).
        states = [s for s in states if s["lab_id"] in ("-" + args.name, args.name)]
        if not states:
            raise _error(f"no lab named {args.name}")
    if not states:
        print("no labs")
        return 0
    for s in states:
        names = s.get("namespaces", [])
        present = sum(ns in existing for ns in names)
        if s.get("persistent"):
            owner = "named"
        else:
            alive = state.owner_alive(s.get("pid", -1), s.get("pid_start"))
            owner = f"pid {s.get('pid')} ({'running' if alive else 'dead: reaped by the next lab'})"
        print(f"{s.get('name') or s['lab_id']}: {present}/{len(names)} namespaces, {owner}")
        if args.name:
            for node in s.get("nodes", []):
                extra = " ".join(
                    f"{k}={v}" for k, v in sorted(node.items())
                    if k not in ("role", "name", "ns") and v is not None
                )
                print(f"  {node['role']:<8} {node['name']:<10} {node.get('ns') or '-':<20} {extra}")
    return 0
