"""
Simulated devices for bench/notify_scale.py: many devices' notifies from
one process, properly sealed (p2pnat.protocol.wire.seal with each device's key, a
fresh increasing timestamp per packet).

Device ``i`` (of ``--devices N``) is ``sim%06d`` with MAC key
HMAC-SHA256(seed, str(i)); ``--part j/P`` makes this process simulate the
devices with ``i % P == j`` (run P processes to spread the work).  Sockets
are a pool bound to 127.0.0.2... (loopback only); device i always sends
from the same socket, so the relay sees a stable mapping.

Phase A: one notify A per device at ``--a-rate`` per second, again for the
devices whose acknowledgement did not come, until all are acknowledged.
Phase B: each device sends notify B every ``--interval`` seconds, spread
evenly (N / interval packets per second in all), and with ``--a-interval``
a notify A every so many seconds too; an acknowledgement that asks for a
notify A (flag NEED_NOTIFY_A) gets one, as a real agent would.  A JSON
status line with the counters goes to standard output every 0.25 s; the
process ends after ``--duration`` seconds of phase B at most (and on
SIGTERM).
"""

import argparse
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from p2pnat.protocol import wire  # noqa: E402

#: Seconds between status lines (the benchmark reads the counters from them).
STATUS_EVERY = 0.25


def device_id(i):
    return f"sim{i:06d}"


def device_key(seed, i):
    return hmac.new(seed, str(i).encode(), hashlib.sha256).digest()


class Sim:
    def __init__(self, args):
        self.args = args
        self.seed = bytes.fromhex(args.seed)
        j, p = (int(x) for x in args.part.split("/"))
        self.mine = list(range(j, args.devices, p))
        self.ids = [device_id(i) for i in self.mine]
        self.keys = [device_key(self.seed, i) for i in self.mine]
        self.index = {d: k for k, d in enumerate(self.ids)}
        self.relay = (args.relay_host, args.relay_port)
        self.socks = []
        self.local = []
        self.poller = select.epoll()
        self.by_fd = {}
        for k in range(args.sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.0.0.{2 + (k + 64 * j) % 250}", 0))
            s.setblocking(False)
            self.socks.append(s)
            self.local.append(s.getsockname())
            self.poller.register(s.fileno(), select.EPOLLIN)
            self.by_fd[s.fileno()] = s
        self.last_ts = 0
        self.counts = {"sent_a": 0, "sent_b": 0, "send_errors": 0, "acks": 0, "need_a": 0,
                       "lag_max_ms": 0.0}
        self.phase = "A"
        self.acked = [False] * len(self.ids)
        self.stop = False

    def stamp(self):
        self.last_ts = max(int(time.time() * 1e6), self.last_ts + 1)
        return self.last_ts

    def send(self, k, message_cls):
        sock_i = k % len(self.socks)
        data = wire.seal(message_cls(local=self.local[sock_i]), self.ids[k], self.keys[k],
                         self.stamp())
        try:
            self.socks[sock_i].sendto(data, self.relay)
        except OSError:  # e.g. ENOBUFS: counted, not retried
            self.counts["send_errors"] += 1
            return
        self.counts["sent_a" if message_cls is wire.NotifyA else "sent_b"] += 1

    def drain(self, timeout):
        for fd, _ in self.poller.poll(timeout):
            s = self.by_fd[fd]
            for _ in range(64):
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                self.counts["acks"] += 1
                try:
                    frame = wire.parse(data)
                    ack = wire.NotifyAck.decode_body(frame.body)
                except (wire.WireError, KeyError):
                    continue
                k = self.index.get(frame.key_id)
                if k is None:
                    continue
                if self.phase == "A":
                    self.acked[k] = True
                elif ack.flags & wire.NEED_NOTIFY_A:
                    self.counts["need_a"] += 1
                    self.send(k, wire.NotifyA)

    def status(self, **extra):
        print(json.dumps({"t": time.time(), "phase": self.phase, **self.counts, **extra}),
              flush=True)

    def paced(self, streams, limit_s):
        """
        Send paced streams until each has sent its total or C{limit_s}
        passes: C{streams} is a list of C{(message class, rate per second,
        total, devices)}; a stream cycles over its C{devices}.
        """
        start = time.monotonic()
        next_status = start + STATUS_EVERY
        done = [0] * len(streams)
        while not self.stop and any(d < s[2] for d, s in zip(done, streams)):
            now = time.monotonic()
            if now - start > limit_s:
                break
            for i, (cls, rate, total, devices) in enumerate(streams):
                due = min(total, int((now - start) * rate) + 1)
                if due - done[i] > 1:
                    lag = (due - done[i]) / rate * 1000
                    self.counts["lag_max_ms"] = max(self.counts["lag_max_ms"], round(lag, 1))
                n = len(devices)
                while done[i] < due:
                    self.send(devices[done[i] % n], cls)
                    done[i] += 1
            self.drain(0.002)
            if now >= next_status:
                self.status()
                next_status += STATUS_EVERY
        return done

    def run(self):
        a = self.args
        n = len(self.ids)
        everyone = range(n)
        signal.signal(signal.SIGTERM, lambda *x: setattr(self, "stop", True))
        self.status(devices=n)
        # Notify A until every device has its acknowledgement: a datagram
        # the relay could not take in time is lost, as on a network.
        rate = a.a_rate / a.parts
        todo = list(everyone)
        deadline = time.monotonic() + a.a_limit
        while todo and not self.stop and time.monotonic() < deadline:
            self.paced([(wire.NotifyA, rate, len(todo), todo)], deadline - time.monotonic())
            end = time.monotonic() + 1  # the last acknowledgements
            while time.monotonic() < end:
                self.drain(0.05)
            todo = [k for k in everyone if not self.acked[k]]
            self.status(a_unacked=len(todo))
        self.phase = "B"
        self.status(phase_b_start=time.time())
        b_rate = n / a.interval
        streams = [(wire.NotifyB, b_rate, int(b_rate * a.duration), everyone)]
        if a.a_interval:
            # Devices also refresh their notify A (the agent: every period/3);
            # start half-way through the list so that A and B do not coincide.
            a_rate = n / a.a_interval
            half = list(range(n // 2, n)) + list(range(n // 2))
            streams.append((wire.NotifyA, a_rate, int(a_rate * a.duration), half))
        self.paced(streams, a.duration + 5)
        self.phase = "end"
        self.status()


def main():
    ap = argparse.ArgumentParser(description="simulated devices sending notifies")
    ap.add_argument("--relay-host", default="127.0.0.1")
    ap.add_argument("--relay-port", type=int, required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--seed", required=True, help="hex seed the MAC keys derive from")
    ap.add_argument("--part", default="0/1", help="j/P: simulate devices i with i %% P == j")
    ap.add_argument("--interval", type=float, default=25.0, help="notify-B interval, seconds")
    ap.add_argument("--a-rate", type=float, default=2000.0,
                    help="notify A per second in phase A (all parts together)")
    ap.add_argument("--a-limit", type=float, default=300.0,
                    help="seconds phase A may take at most (passes until all acknowledged)")
    ap.add_argument("--a-interval", type=float, default=0.0,
                    help="in phase B, also a notify A per device every so many seconds"
                         " (0: none)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of phase B (max 900)")
    ap.add_argument("--sockets", type=int, default=256, help="UDP sockets in the pool")
    args = ap.parse_args()
    args.parts = int(args.part.split("/")[1])
    if not args.relay_host.startswith("127."):
        sys.exit("notify_sim: the relay must be on loopback (127.0.0.0/8)")
    if not 0 < args.duration <= 900 or not 1 <= args.devices <= 1_000_000:
        sys.exit("notify_sim: --duration up to 900 s, --devices up to 1 000 000")
    Sim(args).run()


if __name__ == "__main__":
    main()
