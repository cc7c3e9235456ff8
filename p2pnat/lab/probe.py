# -*- test-case-name: tests.unit.test_lab_rules,tests.lab.test_lab -*-
"""
A tiny UDP probe for the NAT lab: ``python -m p2pnat.lab.probe COMMAND ...``.

The standard library and the daemons' address parser only (no Twisted), so
that it starts fast inside a namespace.  Every command prints JSON on
standard output (one object per line) and every loop is bounded by a count
or a deadline.  Addresses are ``ip:port`` or, for IPv6, ``[ip]:port``, in
arguments and output alike; a socket's family follows the address it binds
or, by default, the address it sends to.

Commands:

``serve --listen ADDR:PORT[-PORT] ...``
    An echo server that answers each datagram with the source address it
    observed (``"observed": "ip:port"``).  A request may ask for the answer
    to come from another of the server's sockets (``"reply_from"``), which is
    how filtering is tested (RFC 5780's CHANGE-REQUEST, in spirit).  A reply
    is never larger than its request, so it cannot amplify.
``query --to IP:PORT[/IP:PORT] ...``
    Ask servers what they observe, from one socket (``--local-port`` or an
    ephemeral one) or from a new socket per step (``--new-socket``).
``listen --port PORT [--punch IP:PORT ...]``
    Receive datagrams for a while, optionally sending "punch" datagrams to
    peers from the same socket first and meanwhile (simple hole punching).
``send --to IP:PORT``
    Send datagrams and exit.
``flows --to IP:PORT --rate R``
    Open a new UDP flow (a new socket) per datagram at ``rate`` per second:
    background traffic that consumes NAT ports.
"""

import argparse
import json
import select
import socket
import sys
import time

from p2pnat.daemon.config import parse_hostport

#: Requests are padded to this size so that replies (which carry two
#: addresses) always fit within their request: no amplification.
REQUEST_SIZE = 300
MAX_DATAGRAM = 2048


def parse_addr(text, default_host=None):
    """
    Parse ``"ip:port"`` (or ``":port"``/``"port"`` when ``default_host`` is
    given) into an ``(ip, port)`` tuple: the daemons' own parser, so that
    the lab reads addresses as they do.

    @raise ValueError: with a reason.
    """
    return parse_hostport(text, default_host)


def parse_listen(text):
    """
    Parse ``"ip:port"`` or ``"ip:first-last"`` (``"[ipv6]:..."`` for IPv6)
    into a list of ``(ip, port)``.  A missing ip means every IPv4 address
    (``0.0.0.0``).
    """
    if text.startswith("["):
        host, sep, ports = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [ipv6]:port")
    else:
        host, sep, ports = text.rpartition(":")
        if not sep:
            host, ports = "", text
    first, dash, last = ports.partition("-")
    first = int(first)
    last = int(last) if dash else first
    if not 0 < first <= last <= 65535 or last - first >= 256:
        raise ValueError(f"{text!r}: bad port range (at most 256 ports)")
    return [(host or "0.0.0.0", p) for p in range(first, last + 1)]


def fmt(addr):
    """Format an ``(ip, port)`` tuple as ``"ip:port"``, or ``"[ip]:port"`` for IPv6."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wildcard(addr):
    """The any-address of ``addr``'s family: ``"::"`` for IPv6, else ``"0.0.0.0"``."""
    return "::" if addr is not None and ":" in addr[0] else "0.0.0.0"


def emit(obj):
    """Print one JSON object on its own line, at once."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _udp_socket(bind=("0.0.0.0", 0)):
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(bind)
    return s


def _send(sock, data, target):
    try:
        sock.sendto(data, target)
    except OSError:
        pass  # e.g. an ICMP error from an earlier send: the loops are bounded anyway


def _receive(sock, until):
    """
    Wait until monotonic time C{until} for one datagram on C{sock}:
    ``(data, peer)``, or None if none came (or the socket reported an
    error instead, such as an ICMP unreachable).
    """
    readable, _, _ = select.select([sock], [], [], max(until - time.monotonic(), 0.0))
    if not readable:
        return None
    try:
        return sock.recvfrom(MAX_DATAGRAM)
    except OSError:
        return None


def serve(listen, duration, verbose=False, stop=None, ready=None):
    """
    Answer datagrams on every ``(ip, port)`` in ``listen`` for ``duration``
    seconds, or until ``stop.is_set()`` (a :class:`threading.Event`, for
    in-process use); return the number answered.  ``ready``, if given, is
    called with the list of bound addresses once listening.
    """
    socks = {}
    try:
        for addr in listen:
            s = _udp_socket(addr)
            socks[fmt(s.getsockname())] = s
        if ready is None:
            emit({"listening": sorted(socks)})
        else:
            ready(sorted(socks))
        return _serve(socks, duration, verbose, stop)
    finally:
        for s in socks.values():
            s.close()


def _serve(socks, duration, verbose, stop):
    answered = 0
    deadline = time.monotonic() + duration
    while stop is None or not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        tick = 1.0 if stop is None else 0.05
        readable, _, _ = select.select(list(socks.values()), [], [], min(left, tick))
        for s in readable:
            try:
                data, peer = s.recvfrom(MAX_DATAGRAM)
            except OSError:
                continue  # e.g. an ICMP error reported on this socket
            here = fmt(s.getsockname())
            try:
                request = json.loads(data)
                if not isinstance(request, dict):
                    request = {}
            except ValueError:
                request = {}
            reply_from = request.get("reply_from")
            out = socks.get(reply_from if isinstance(reply_from, str) else here)
            if out is None:
                continue  # not one of ours: never send from elsewhere
            reply = json.dumps(
                {
                    "id": request.get("id"),
                    "observed": fmt(peer),
                    "to": here,
                    "from": fmt(out.getsockname()),
                }
            ).encode()
            if len(reply) > len(data):
                continue  # never amplify
            try:
                out.sendto(reply, peer)
            except OSError:
                continue
            answered += 1
            if verbose:
                emit({"served": fmt(peer), "to": here, "from": fmt(out.getsockname())})
    return answered


def _request(step_id, reply_from=None):
    body = {"id": step_id}
    if reply_from:
        body["reply_from"] = reply_from
    data = json.dumps(body).encode()
    # Pad with spaces (still valid JSON) so the reply always fits.
    return data + b" " * max(0, REQUEST_SIZE - len(data))


def query(steps, local_port=0, bind=None, new_socket=False, timeout=1.0, tries=2):
    """
    Run ``steps`` (a list of ``(target, reply_from)``, ``reply_from`` being
    ``None`` or ``"ip:port"``) and return one result dict per step.  The
    socket binds ``bind``, by default the any-address of the first target's
    family.

    Each step sends up to ``tries`` requests, ``timeout / tries`` apart, and
    waits at most ``timeout`` seconds in all for the matching answer.
    """
    results = []
    sock = None
    if bind is None:
        bind = wildcard(steps[0][0] if steps else None)
    try:
        for n, (target, reply_from) in enumerate(steps):
            if sock is None or new_socket:
                if sock is not None:
                    sock.close()
                sock = _udp_socket((bind, local_port))
            local = fmt(sock.getsockname())
            step_id = f"{n}-{time.monotonic_ns()}"
            request = _request(step_id, reply_from)
            result = {
                "to": fmt(target),
                "reply_from": reply_from,
                "local": local,
                "observed": None,
                "answered_by": None,
            }
            start = time.monotonic()
            deadline = start + timeout
            sent = 0
            next_send = start
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if sent < tries and now >= next_send:
                    _send(sock, request, target)
                    sent += 1
                    next_send = now + timeout / tries
                got = _receive(sock, min(deadline, next_send if sent < tries else deadline))
                if got is None:
                    continue
                data, peer = got
                try:
                    reply = json.loads(data)
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("id") == step_id:
                    result["observed"] = reply.get("observed")
                    result["answered_by"] = fmt(peer)
                    result["rtt_ms"] = round((time.monotonic() - start) * 1000, 2)
                    break
            results.append(result)
    finally:
        if sock is not None:
            sock.close()
    return results


def listen(port, bind=None, punch=(), timeout=2.0, max_count=1, interval=0.1):
    """
    Receive up to ``max_count`` datagrams within ``timeout`` seconds on
    ``bind:port``, sending a punch datagram to each of ``punch`` every
    ``interval`` seconds meanwhile (only while nothing has been received
    from that peer yet).  Return the list of received datagrams.  ``bind``
    is by default the any-address of the first punch target's family (IPv4
    without one).
    """
    if bind is None:
        bind = wildcard(punch[0] if punch else None)
    sock = _udp_socket((bind, port))
    received = []
    try:
        emit({"ready": fmt(sock.getsockname())})
        hello = b"punch from " + fmt(sock.getsockname()).encode()
        heard = set()
        deadline = time.monotonic() + timeout
        next_punch = time.monotonic()
        while len(received) < max_count:
            now = time.monotonic()
            if now >= deadline:
                break
            if punch and now >= next_punch:
                for target in punch:
                    if fmt(target) not in heard:
                        _send(sock, hello, target)
                next_punch = now + interval
            got = _receive(sock, min(deadline, next_punch) if punch else deadline)
            if got is None:
                continue
            data, peer = got
            heard.add(fmt(peer))
            received.append({"from": fmt(peer), "data": data[:200].decode("utf-8", "replace")})
        # Give the peers a last packet, so that both sides of a punch hear
        # each other even if this side heard first.
        for target in punch:
            _send(sock, hello, target)
    finally:
        sock.close()
    return received


def send(target, local_port=0, bind=None, count=1, data=b"hello", interval=0.05):
    """
    Send ``count`` datagrams to ``target`` (from ``bind``, by default the
    any-address of its family); return the local address used.
    """
    sock = _udp_socket((bind or wildcard(target), local_port))
    try:
        for i in range(count):
            if i:
                time.sleep(interval)
            _send(sock, data, target)
        return fmt(sock.getsockname())
    finally:
        sock.close()


def flows(target, rate, duration, max_flows):
    """
    Send one datagram from a new socket ``rate`` times per second, for at
    most ``duration`` seconds and ``max_flows`` flows; return the count.
    """
    period = 1.0 / rate
    start = time.monotonic()
    n = 0
    while n < max_flows and time.monotonic() - start < duration:
        s = _udp_socket((wildcard(target), 0))
        try:
            _send(s, b"background flow", target)
        finally:
            s.close()
        n += 1
        # Sleep to the schedule, not by a fixed amount, so the rate holds.
        delay = start + n * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return n


def _step(text):
    target, _, reply_from = text.partition("/")
    if reply_from:
        parse_addr(reply_from)  # validate
    return parse_addr(target), reply_from or None


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m p2pnat.lab.probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="answer each datagram with the source address observed")
    p.add_argument("--listen", action="append", required=True, type=parse_listen,
                   metavar="[IP:]PORT[-PORT]", help="address(es) to answer on; repeatable")
    p.add_argument("--duration", type=float, default=3600.0, help="stop after this many seconds")
    p.add_argument("--verbose", action="store_true", help="print a line per datagram answered")

    p = sub.add_parser("query", help="ask servers what they observe")
    p.add_argument("--to", action="append", required=True, type=_step, metavar="IP:PORT[/IP:PORT]",
                   help="server, optionally with the server address that should answer; repeatable")
    p.add_argument("--local-port", type=int, default=0)
    p.add_argument("--bind", help="local address (default: any, of the first target's family)")
    p.add_argument("--new-socket", action="store_true", help="a new socket (local port) for each step")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds to wait per step")
    p.add_argument("--tries", type=int, default=2, help="requests per step")

    p = sub.add_parser("listen", help="receive datagrams, optionally punching first")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bind", help="local address (default: any, of the first punch target's"
                   " family; IPv4 without one)")
    p.add_argument("--punch", action="append", default=[], type=parse_addr, metavar="IP:PORT")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--max", type=int, default=1, dest="max_count")
    p.add_argument("--interval", type=float, default=0.1)

    p = sub.add_parser("send", help="send datagrams and exit")
    p.add_argument("--to", required=True, type=parse_addr, metavar="IP:PORT")
    p.add_argument("--local-port", type=int, default=0)
    p.add_argument("--bind", help="local address (default: any, of the target's family)")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--data", default="hello")

    p = sub.add_parser("flows", help="open new UDP flows at a fixed rate (background traffic)")
    p.add_argument("--to", required=True, type=parse_addr, metavar="IP:PORT")
    p.add_argument("--rate", type=float, default=10.0, help="flows per second (0.1-1000)")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--max-flows", type=int, default=1_000_000)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            listen_on = [a for group in args.listen for a in group]
            emit({"answered": serve(listen_on, args.duration, args.verbose)})
        elif args.command == "query":
            if not 0 < args.tries <= 100:
                parser.error("--tries must be 1-100")
            emit({"results": query(args.to, args.local_port, args.bind, args.new_socket,
                                   args.timeout, args.tries)})
        elif args.command == "listen":
            emit({"received": listen(args.port, args.bind, args.punch, args.timeout,
                                     args.max_count, args.interval)})
        elif args.command == "send":
            local = send(args.to, args.local_port, args.bind, args.count, args.data.encode())
            emit({"sent": args.count, "local": local})
        elif args.command == "flows":
            if not 0.1 <= args.rate <= 1000:
                parser.error("--rate must be 0.1-1000")
            emit({"flows": flows(args.to, args.rate, args.duration, args.max_flows)})
    except OSError as e:
        emit({"error": str(e)})
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
