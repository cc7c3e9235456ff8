"""
Load generator for bench/lobby_capacity.py: many lobby clients in one
process, every frame sealed with p2pnat.protocol.wire.seal under the client's key
and the message classes of p2pnat.protocol.p2p.

Client ``i`` (of ``--clients N``) is ``lc%06d`` with MAC key
HMAC-SHA256(seed, str(i)) (lobby_capacity.py registers the same).  Sockets
are a pool bound to 127.0.0.1 (loopback only); client i always uses socket
``i % --sockets``, so the lobby sees one stable address per client.

Commands, one JSON object per line on standard input; each answers with
one JSON line on standard output:

- ``{"step": "login", "rate": R, "seconds": D}``: Login frames at R/s for D
  s, cycling over the clients; answered = Welcome frames received.
- ``{"step": "keepalive", ...}``: the same with Keepalive frames (these
  pass the lobby's replay check: timestamps increase per client).
- ``{"step": "introduce", ...}``: ConnectRequest frames from client 2j to
  client 2j+1 at R/s; when the lobby's Invite reaches 2j+1, it answers at
  once (Answer, accepted) from its socket; answered = Introduce frames
  that reach 2j.  Also the latency request -> Introduce.
- ``{"step": "login-all", "rate": R}``: every client logs in once (again
  for those not answered, up to 5 passes).

Frames of a login or keepalive step are sealed before the step's clock
starts (Login is exempt from freshness; Keepalive timestamps are set to
the send schedule), so sending costs little: what is measured is the
lobby.  Answers (to Invites) are sealed on the fly.  Replies are counted
until none came for 0.5 s after the last send (at most 15 s).  CPU
(lobby, this process, the machine) is read from /proc at the step's
start and at its last send: the figures are over the sending window.  Ends on EOF, SIGTERM or after
``--max-seconds``.
"""

import argparse
import hashlib
import hmac
import json
import os
import select
import signal
import socket
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from p2pnat.protocol import wire  # noqa: E402
from p2pnat.protocol import p2p as M  # noqa: E402

#: After a step's last send, replies are still counted until none came for
#: DRAIN_QUIET seconds (at most DRAIN_MAX): a lobby that lags is not
#: credited with the previous step's answers.
DRAIN_QUIET = 0.5
DRAIN_MAX = 15.0
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid):
    """utime + stime of C{pid} in seconds (0 if unknown)."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine():
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def _busy(before, after):
    """Cores busy between two L{_machine} readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return os.cpu_count() * busy / total if total else 0.0


def client_id(i):
    return f"lc{i:06d}"


def client_key(seed, i):
    return hmac.new(seed, str(i).encode(), hashlib.sha256).digest()


class Load:
    def __init__(self, args):
        self.args = args
        seed = bytes.fromhex(args.seed)
        self.n = args.clients
        self.ids = [client_id(i) for i in range(self.n)]
        self.keys = [client_key(seed, i) for i in range(self.n)]
        self.index = {cid: i for i, cid in enumerate(self.ids)}
        self.lobby = (args.host, args.port)
        self.socks, self.local, self.by_fd = [], [], {}
        self.poller = select.epoll()
        for _ in range(args.sockets):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.socks.append(s)
            self.local.append(s.getsockname())
            self.by_fd[s.fileno()] = s
            self.poller.register(s.fileno(), select.EPOLLIN)
        self.last_stamp = 0
        self.next_request = 1
        self.nat = M.NatInfo("endpoint-independent", "address-and-port-dependent",
                             "preserving", 1, 0.0)
        self.logins = None  # pre-sealed Login frames

    def cpu_now(self):
        """(lobby CPU s, own CPU s, machine jiffies)."""
        return _proc_cpu(self.args.lobby_pid), _proc_cpu(os.getpid()), _machine()

    def stamp(self):
        """Strictly increasing microsecond timestamps (one clock: the lobby's, on loopback)."""
        self.last_stamp = max(int(time.time() * 1e6), self.last_stamp + 1)
        return self.last_stamp

    def sock_of(self, i):
        return self.socks[i % len(self.socks)]

    # -- frames

    def login_frames(self):
        if self.logins is None:
            self.logins = [wire.seal(M.Login(self.local[i % len(self.socks)], self.nat),
                                     self.ids[i], self.keys[i], self.stamp())
                           for i in range(self.n)]
        return self.logins

    def keepalive_frames(self, count, start, rate):
        """C{count} Keepalives for clients start, start+1 ... stamped on the send schedule."""
        base = max(int(time.time() * 1e6), self.last_stamp + 1)
        out = []
        for j in range(count):
            i = (start + j) % self.n
            ts = base + int(j * 1e6 / rate) + 1 + j % 1000  # increasing, near send time
            ts = max(ts, self.last_stamp + 1)
            self.last_stamp = ts
            out.append((i, wire.seal(M.Keepalive(), self.ids[i], self.keys[i], ts)))
        return out

    def request_frames(self, count, start):
        out = []
        pairs = self.n // 2
        for j in range(count):
            k = (start + j) % pairs
            a, b = 2 * k, 2 * k + 1
            rid = self.next_request
            self.next_request += 1
            msg = M.ConnectRequest(rid, self.ids[b], self.local[a % len(self.socks)], self.nat)
            out.append((a, rid, wire.seal(msg, self.ids[a], self.keys[a], self.stamp())))
        return out

    # -- the loop

    def run_step(self, kind, frames, rate, seconds):
        """Send C{frames} [(client, payload, rid)] at C{rate}/s; count what comes back."""
        counts = {"sent": 0, "send_errors": 0, "answered": 0, "refused": 0, "invites": 0,
                  "answers_sent": 0, "acks": 0, "other": 0}
        latencies = []
        sent_at = {}
        want = M.Introduce.TYPE if kind == "introduce" else M.Welcome.TYPE
        cpu0 = self.cpu_now()
        self.last_reply = time.monotonic()
        t0 = time.monotonic()
        done_at = None  # when the last frame went
        n = len(frames)
        k = 0
        while True:
            now = time.monotonic()
            if k < n:
                due = min(n, int((now - t0) * rate) + 1)
                while k < due:
                    i, rid, data = frames[k]
                    try:
                        self.sock_of(i).sendto(data, self.lobby)
                        counts["sent"] += 1
                        if rid is not None:
                            sent_at[rid] = time.monotonic()
                    except OSError:
                        counts["send_errors"] += 1
                    k += 1
                    if k % 64 == 0:
                        self._receive(0, counts, want, sent_at, latencies)
                if k >= n:
                    done_at = time.monotonic()
                    cpu_send = self.cpu_now()
            elif now > done_at + DRAIN_MAX or now > self.last_reply + DRAIN_QUIET:
                break
            self._receive(0.0005 if k < n else 0.05, counts, want, sent_at, latencies)
        end = time.monotonic()
        cpu_end = self.cpu_now()
        # If the sender fell behind its schedule, the step lasted longer.
        took = max(seconds, end - t0 - DRAIN_QUIET)
        send_wall = max(1e-9, done_at - t0)
        counts.update(
            lobby_cpu_send=round((cpu_send[0] - cpu0[0]) / send_wall, 4),
            gen_cpu_send=round((cpu_send[1] - cpu0[1]) / send_wall, 4),
            machine_busy_send=round(_busy(cpu0[2], cpu_send[2]), 4),
            lobby_cpu_all=round((cpu_end[0] - cpu0[0]) / (end - t0), 4),
            drain=round(end - done_at, 3))
        out = dict(counts, step=kind, rate=rate, seconds=round(took, 3),
                   answered_per_s=round(counts["answered"] / took, 1))
        if latencies:
            latencies.sort()
            out["latency_ms_median"] = round(1000 * statistics.median(latencies), 3)
            out["latency_ms_p99"] = round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 3)
        return out

    def _receive(self, timeout, counts, want, sent_at, latencies):
        for fd, _ in self.poller.poll(timeout):
            s = self.by_fd[fd]
            for _ in range(256):
                try:
                    data, addr = s.recvfrom(2048)
                except BlockingIOError:
                    break
                self.last_reply = time.monotonic()
                try:
                    frame = wire.parse(data)
                except wire.WireError:
                    counts["other"] += 1
                    continue
                t = frame.type
                if t == want:
                    counts["answered"] += 1
                    if t == M.Introduce.TYPE:
                        rid = struct.unpack_from("!Q", frame.body)[0]
                        sent = sent_at.pop(rid, None)
                        if sent is not None:
                            latencies.append(time.monotonic() - sent)
                elif t == M.Invite.TYPE:
                    counts["invites"] += 1
                    self._answer(frame, s, counts)
                elif t == M.AnswerAck.TYPE:
                    counts["acks"] += 1
                elif t == M.Refusal.TYPE:
                    counts["refused"] += 1
                else:
                    counts["other"] += 1

    def _answer(self, frame, sock, counts):
        """B accepts at once, from its own socket (the one the Invite reached)."""
        b = self.index.get(frame.key_id)
        if b is None:
            return
        invite = M.Invite.decode_body(frame.body)
        msg = M.Answer(invite.request_id, True, sock.getsockname(), self.nat)
        try:
            sock.sendto(wire.seal(msg, self.ids[b], self.keys[b], self.stamp()), self.lobby)
            counts["answers_sent"] += 1
        except OSError:
            counts["send_errors"] += 1

    # -- commands

    def command(self, cmd):
        kind = cmd["step"]
        rate = float(cmd.get("rate", 1000))
        seconds = float(cmd.get("seconds", 5))
        count = max(1, int(rate * seconds))
        start = int(cmd.get("start", 0))
        if kind == "login":
            logins = self.login_frames()
            frames = [((start + j) % self.n, None, logins[(start + j) % self.n])
                      for j in range(count)]
            return self.run_step(kind, frames, rate, seconds)
        if kind == "keepalive":
            frames = [(i, None, data) for i, data in self.keepalive_frames(count, start, rate)]
            return self.run_step(kind, frames, rate, seconds)
        if kind == "introduce":
            frames = [(a, rid, data) for a, rid, data in self.request_frames(count, start)]
            return self.run_step(kind, frames, rate, seconds)
        if kind == "login-all":
            logins = self.login_frames()
            total = {"sent": 0, "answered": 0}
            t0 = time.monotonic()
            passes = 0
            for passes in range(1, 6):  # bounded: one pass, then resends
                frames = [(i, None, logins[i]) for i in range(self.n)]
                r = self.run_step("login", frames, rate, self.n / rate)
                total["sent"] += r["sent"]
                total["answered"] += r["answered"]
                if total["answered"] >= self.n:
                    break
            return dict(total, step=kind, passes=passes,
                        seconds=round(time.monotonic() - t0, 3))
        raise ValueError(f"unknown step {kind!r}")


def main():
    ap = argparse.ArgumentParser(description="lobby load generator (bench/lobby_capacity.py)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--seed", required=True, help="hex seed of the clients' MAC keys")
    ap.add_argument("--sockets", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--lobby-pid", type=int, default=0, help="the lobby's pid, for its CPU")
    args = ap.parse_args()
    if not 2 <= args.clients <= 1_000_000 or not 1 <= args.sockets <= 4096:
        sys.exit("lobby_load: --clients 2-1000000, --sockets 1-4096")
    if not args.host.startswith("127."):
        sys.exit("lobby_load: loopback only")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    signal.alarm(int(args.max_seconds))
    load = Load(args)
    print(json.dumps({"ready": True, "clients": load.n, "sockets": len(load.socks)}),
          flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            out = load.command(json.loads(line))
        except (ValueError, KeyError) as e:
            out = {"error": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
