"""
Tools the lab tests run inside namespaces, as
``python -m tests.support.lab TOOL ...`` (a reactor cannot change
namespace, and raw sockets belong to the namespace they are opened in).
Each prints JSON lines; the last one is its result.

- ``sniff``: capture p2pnat frames of a type on an interface (under a key
  ID, or a session key ID of a role: ``SESSION.a``), or QUIC packets
  (``--quic``), from a source and to a destination if given, and print
  each packet in hex (and, capturing until a deadline, how many it saw
  and their UDP payload bytes);
- ``forge``: send connect requests, probes or data sealed with a random
  key (a forger who does not know the key) from a spoofed source address;
- ``inject``: send captured (or forged) packets, as they are (a replay);
- ``tls-probe``: present a client certificate to the relay's tunnel port,
  send a hello and report what the relay answered;
- ``echo``: a UDP echo server; ``ping``: send numbered datagrams to a UDP
  port and count the ones that come back unchanged.
"""

import argparse
import json
import os
import select
import socket
import time

from tests.support.lab import packets
from tests.support.lab.packets import hostport


def _emit(obj):
    print(json.dumps(obj), flush=True)


def _addr_is(want, addr):
    """Whether ``"ip:port"`` ``addr`` is ``want`` (``ip:port``, ``ip``, or None: any)."""
    return not want or addr == want or (":" not in want and addr.rsplit(":", 1)[0] == want)


class _Stopped(Exception):
    """SIGTERM came: stop capturing."""


def _raise_stopped(signum, frame):
    raise _Stopped()


def _tool_sniff(args):
    """
    Print the first ``--count`` IPv4/UDP packets on ``--iface`` (every one
    until ``--timeout`` or SIGTERM if 0) that carry a p2pnat frame of type
    ``--type`` under the key ID ``--key-id`` (or one ending in ``.ROLE``,
    ``--role``), or with ``--quic`` a QUIC packet (:func:`packets.is_quic`),
    from ``--src`` and to ``--dst`` if given (``IP:PORT``, or ``IP`` for
    any port), and whose UDP payload's sha256 is one of
    ``--payload-sha256`` if any are: each as JSON with the packet in hex.
    With ``--count 0`` a last line follows, ``{"captured": N, "bytes": B,
    "kernel_dropped": D}``: UDP payload bytes, and packets the kernel
    dropped unread (the lines above may miss that many).  Exit 1 after
    ``--timeout`` if fewer than ``--count`` were seen.
    """
    import hashlib
    import signal

    digests = set(args.payload_sha256 or ())
    capture = packets.Capture(args.iface)
    seen = size = 0
    try:
        # SIGTERM ends the capture (and the wait in recv) with the summary.
        signal.signal(signal.SIGTERM, _raise_stopped)
        _emit({"listening": args.iface})
        for packet, src, dst, payload in capture.udp(args.timeout):
            if not (_addr_is(args.src, src) and _addr_is(args.dst, dst)):
                continue
            if args.quic:
                if not packets.is_quic(payload):
                    continue
                record = {}
            else:
                info = packets.frame_info(payload)
                if info is None or info[0] != args.type:
                    continue
                if args.key_id is not None and info[1] != args.key_id:
                    continue
                if args.role is not None and not info[1].endswith("." + args.role):
                    continue
                record = {"key_id": info[1]}
            if digests and hashlib.sha256(payload).hexdigest() not in digests:
                continue
            seen += 1
            size += len(payload)
            _emit({"packet": packet.hex(), **record, "src": src, "dst": dst})
            if seen >= args.count > 0:
                break
    except _Stopped:
        pass
    finally:
        dropped = capture.kernel_dropped()
        capture.close()
    if not args.count:
        _emit({"captured": seen, "bytes": size, "kernel_dropped": dropped})
    return 0 if seen >= args.count else 1


def _forged(args, i):
    """The ``i``-th message ``forge`` sends."""
    from p2pnat.protocol import p2p, wire

    if args.kind == "connect":
        return wire.ConnectRequest(os.urandom(16), os.urandom(16), args.tunnel_port, "")
    if args.kind == "probe":
        return p2p.Probe(1, i)
    return p2p.Data(args.payload.encode())


def _tool_forge(args):
    """
    Send ``--count`` frames (``--kind`` connect, probe or data) sealed with
    a random key under ``--key-id``, from the spoofed ``--src`` to
    ``--dst``: what an off-path attacker who knows both addresses and the
    key ID (it travels in clear) can send.  Their timestamps are
    ``--ahead`` seconds in the future: were one recorded before the MAC
    check, the receiver would then refuse the genuine sender's frames.
    """
    from p2pnat.protocol import wire

    key = os.urandom(wire.KEY_LEN)
    stamp = int((time.time() + args.ahead) * 1e6)
    size = 0
    for i in range(args.count):
        data = wire.seal(_forged(args, i), args.key_id, key, stamp + i)
        packets.send_raw(packets.ip_udp_packet(hostport(args.src), hostport(args.dst), data))
        size = len(data)
    _emit({"sent": args.count, "kind": args.kind, "key_id": args.key_id, "bytes": size})
    return 0


def _tool_inject(args):
    """Send each ``--hex`` packet (IPv4, checksums mended) ``--count`` times, in turn."""
    for text in args.hex:
        packets.send_raw(packets.fix_checksums(bytes.fromhex(text)), args.count)
    _emit({"sent": args.count * len(args.hex)})
    return 0


def _tool_tls_probe(args):
    """
    Open a TLS connection to the tunnel port with a client certificate, send
    a hello with a random session, and print what happened as JSON:
    ``handshake`` (whether the client finished it), ``status`` (the hello
    status byte, or null), ``closed`` (the relay closed the connection),
    ``error``.
    """
    import ssl

    from p2pnat.protocol import tunnel

    host, port = hostport(args.connect)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    result = {"handshake": False, "status": None, "closed": False, "error": None}
    try:
        with socket.create_connection((host, port), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=args.servername) as s:
                result["handshake"] = True
                s.sendall(tunnel.hello(os.urandom(16), os.urandom(16)))
                first = s.recv(1)
                if first:
                    result["status"] = first[0]
                    result["closed"] = s.recv(1) == b""
                else:
                    result["closed"] = True
    except (ssl.SSLError, OSError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["closed"] = True
    _emit(result)
    return 0


def _tool_echo(args):
    """A UDP echo server on ``--listen`` for at most ``--duration`` seconds."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(hostport(args.listen))
    _emit({"listening": "%s:%d" % s.getsockname()})
    deadline = time.monotonic() + args.duration
    answered = 0
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
        if not r:
            continue
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
        answered += 1
    _emit({"answered": answered})
    return 0


def _tool_ping(args):
    """
    Send ``--count`` numbered datagrams to ``--to`` (one every
    ``--interval`` seconds) and count those that come back unchanged
    within ``--timeout`` seconds of the last.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = hostport(args.to)
    sent = {}
    back = {}

    def receive_until(end):
        while len(back) < len(sent) and time.monotonic() < end:
            r, _, _ = select.select([s], [], [], max(0.0, end - time.monotonic()))
            if r:
                data, _ = s.recvfrom(65535)
                if data in sent and data not in back:
                    back[data] = time.monotonic() - sent[data]

    t0 = time.monotonic()
    for i in range(args.count):
        payload = f"datagram {i} {os.urandom(8).hex()}".encode()
        sent[payload] = time.monotonic()
        s.sendto(payload, target)
        end = time.monotonic() + args.interval
        receive_until(end)
        # The interval is kept even when every echo is in already.
        time.sleep(max(0.0, end - time.monotonic()))
    receive_until(time.monotonic() + args.timeout)
    rtts = sorted(back.values())
    _emit({"sent": len(sent), "echoed": len(back),
           "median_rtt_ms": round(1000 * rtts[len(rtts) // 2], 3) if rtts else None,
           "seconds": round(time.monotonic() - t0, 3)})
    return 0


def parser():
    p = argparse.ArgumentParser(prog="python -m tests.support.lab")
    tools = p.add_subparsers(dest="tool", required=True)
    t = tools.add_parser("sniff")
    t.add_argument("--iface", required=True)
    what = t.add_mutually_exclusive_group(required=True)
    what.add_argument("--type", type=lambda text: int(text, 0))
    what.add_argument("--quic", action="store_true")
    who = t.add_mutually_exclusive_group()
    who.add_argument("--key-id")
    who.add_argument("--role", choices=("a", "b"))
    t.add_argument("--src")
    t.add_argument("--dst")
    t.add_argument("--payload-sha256", action="append")
    t.add_argument("--count", type=int, default=1)
    t.add_argument("--timeout", type=float, default=20.0)
    t.set_defaults(func=_tool_sniff)
    t = tools.add_parser("forge")
    t.add_argument("--src", required=True)
    t.add_argument("--dst", required=True)
    t.add_argument("--key-id", required=True)
    t.add_argument("--kind", choices=("connect", "probe", "data"), required=True)
    t.add_argument("--payload", default="forged")
    t.add_argument("--tunnel-port", type=int, default=7443)
    t.add_argument("--count", type=int, default=3)
    t.add_argument("--ahead", type=float, default=0.0)
    t.set_defaults(func=_tool_forge)
    t = tools.add_parser("inject")
    t.add_argument("--hex", action="append", required=True)
    t.add_argument("--count", type=int, default=1)
    t.set_defaults(func=_tool_inject)
    t = tools.add_parser("tls-probe")
    t.add_argument("--connect", required=True)
    t.add_argument("--servername", required=True)
    t.add_argument("--ca", required=True)
    t.add_argument("--cert", required=True)
    t.add_argument("--key", required=True)
    t.add_argument("--timeout", type=float, default=10.0)
    t.set_defaults(func=_tool_tls_probe)
    t = tools.add_parser("echo")
    t.add_argument("--listen", required=True)
    t.add_argument("--duration", type=float, default=120.0)
    t.set_defaults(func=_tool_echo)
    t = tools.add_parser("ping")
    t.add_argument("--to", required=True)
    t.add_argument("--count", type=int, default=20)
    t.add_argument("--interval", type=float, default=0.05)
    t.add_argument("--timeout", type=float, default=2.0)
    t.set_defaults(func=_tool_ping)
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.tool == "sniff" and args.type is not None and not (args.key_id or args.role):
        p.error("sniff --type needs --key-id or --role")
    return args.func(args) or 0

