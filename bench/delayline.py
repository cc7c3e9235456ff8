"""
A delay line for a NAT-lab host, without ``tc netem`` (this kernel has no
sch_netem): every packet the host sends to another machine waits C{delay}
ms first.  Run it inside the host's namespace (``ip netns exec NS python
bench/delayline.py --delay-ms 20``), as root; it changes nothing outside
that namespace and lives at most C{--duration} seconds.

How: a TUN device ``dly0`` takes the default route for locally generated
packets (policy rule ``iif lo`` -> table 100), so the kernel hands each
outgoing IP packet to this program; after the delay it sends the packet
again, as it is, from a raw socket whose mark (0x64) makes the routing
rules use the main table, i.e. the host's real interface.  Traffic to the
host's own addresses (loopback) never leaves the local table and is not
delayed; incoming packets are not delayed either, so a round trip between
this host and another gets exactly C{delay} more.

Prints ``delayline ready`` once the route is in place.
"""

import argparse
import collections
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SO_MARK = 36
MARK = 0x64
TABLE = "100"
DEV = "dly0"
MAX_QUEUE = 20000


IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"


def ip(*args):
    subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=10)


def main():
    ap = argparse.ArgumentParser(description="delay this namespace's outgoing packets")
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--duration", type=float, default=3600, help="exit after this many seconds")
    args = ap.parse_args()
    if not 0 < args.delay_ms <= 1000 or not 0 < args.duration <= 86400:
        sys.exit("delayline: --delay-ms 0-1000 and --duration up to a day")
    delay = args.delay_ms / 1000

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEV.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    out.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)

    # The source address locally generated packets get: the one of the
    # current default route (else the kernel might pick none for dly0).
    route = subprocess.run([IP, "-4", "route", "get", "198.18.0.1"], capture_output=True,
                           text=True, timeout=10).stdout.split()
    src = route[route.index("src") + 1] if "src" in route else None
    ip("link", "set", DEV, "up")
    ip("route", "add", "default", "dev", DEV, *(["src", src] if src else []), "table", TABLE)
    ip("rule", "add", "fwmark", hex(MARK), "lookup", "main", "pref", "100")
    ip("rule", "add", "iif", "lo", "lookup", TABLE, "pref", "200")
    print(f"delayline ready: {args.delay_ms:g} ms on packets from {src or '?'}", flush=True)

    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    queue = collections.deque()
    end = time.monotonic() + args.duration
    sent = dropped = 0
    try:
        while not stop and time.monotonic() < end:
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, pkt = queue.popleft()
                try:
                    out.sendto(pkt, (socket.inet_ntoa(pkt[16:20]), 0))
                    sent += 1
                except OSError:
                    dropped += 1
            timeout = max(0.0, queue[0][0] - now) if queue else 0.5
            try:
                ready, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                now = time.monotonic()
                for _ in range(256):
                    try:
                        pkt = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if len(pkt) < 20 or pkt[0] >> 4 != 4:
                        continue  # IPv4 only
                    if pkt[16] >= 224:
                        # Multicast and broadcast (an SSDP search): sent
                        # again from the raw socket, the kernel hands them
                        # back to dly0, and they would circle for as long
                        # as the line runs.  No lab service behind a delay
                        # line listens to them: dropped, counted.
                        dropped += 1
                        continue
                    if len(queue) >= MAX_QUEUE:
                        dropped += 1
                        continue
                    queue.append((now + delay, pkt))
    finally:
        for argv in (("rule", "del", "pref", "200"), ("rule", "del", "pref", "100"),
                     ("route", "flush", "table", TABLE)):
            subprocess.run([IP, *argv], capture_output=True, timeout=10)
        print(f"delayline: {sent} packets delayed, {dropped} dropped", flush=True)


if __name__ == "__main__":
    main()
