"""
Bulk throughput of one p2pnat QUIC stream (p2pnat.quic) against plain TCP,
on loopback, in one run.

    .venv/bin/python bench/quic_bulk.py [--size-mb 20] [--rounds 3]

A receiver runs as a child process (``--serve``), one for QUIC and one for
TCP; this process sends ``--size-mb`` MB on one stream to each, round by
round, interleaved, and the receiver answers with the byte count, the
SHA-256 and the CPU seconds it spent.  For each transport it prints the
medians over the rounds of:

- MB/s: bytes over the wall time from the stream's opening to the
  receiver's answer (the QUIC handshake, done before, is not counted);
- CPU s/MB: sender's plus receiver's CPU seconds per MB;

and QUIC's ratio to TCP.  Both ends on one machine share its cores, so the
CPU figure is the one to compare across machines.  Traffic stays on
127.0.0.1; the receivers are ended when the script ends or fails.
"""

import argparse
import hashlib
import os
import random
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import _support as S  # noqa: E402

SERVICE = "bulk"


# -- receiver (child process) --------------------------------------------------------


def _receiver_protocol():
    from twisted.internet import interfaces, protocol
    from zope.interface import implementer

    @implementer(interfaces.IHalfCloseableProtocol)
    class Receive(protocol.Protocol):
        """Hash everything; at the sender's end, answer and close."""

        def connectionMade(self):
            self.hash = hashlib.sha256()
            self.count = 0
            self.cpu = time.process_time()

        def dataReceived(self, data):
            self.hash.update(data)
            self.count += len(data)

        def readConnectionLost(self):
            cpu = time.process_time() - self.cpu
            self.transport.write(f"{self.count} {self.hash.hexdigest()} {cpu:.4f}\n".encode())
            self.transport.loseConnection()

        def writeConnectionLost(self):
            pass

    return protocol.Factory.forProtocol(Receive)


def serve(kind, certs):
    from twisted.internet import reactor

    factory = _receiver_protocol()
    if kind == "tcp":
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    else:
        from p2pnat.quic import Credentials, QuicSocket

        creds = Credentials.from_files(*(os.path.join(certs, n)
                                         for n in ("bob.crt", "bob.key", "ca.crt")))
        sock = QuicSocket(reactor, creds)
        sock.listen(["client:alice"], None, services={SERVICE: factory})
        port = reactor.listenUDP(0, sock, interface="127.0.0.1")
    print(f"PORT {port.getHost().port}", flush=True)
    reactor.run()


# -- sender (this process) -------------------------------------------------------------


def write_certs(work):
    from p2pnat.deployment import pki
    from p2pnat.quic.identity import issue_client_cert

    ca, ca_key = pki.create_ca("bench CA")
    pki.write_public(os.path.join(work, "ca.crt"), pki.cert_pem(ca))
    for name in ("alice", "bob"):
        cert, key = issue_client_cert(ca, ca_key, name)
        pki.write_public(os.path.join(work, f"{name}.crt"), pki.cert_pem(cert))
        pki.write_secret(os.path.join(work, f"{name}.key"), pki.key_pem(key))


def start_receiver(processes, kind, work):
    proc = processes.start(f"receiver-{kind}", [sys.executable, os.path.abspath(__file__),
                                                "--serve", kind, "--certs", work], cwd=REPO)
    port = []

    def ready():
        for line in proc.output().splitlines():
            if line.startswith("PORT "):
                port.append(int(line.split()[1]))
                return True
        return False

    S.wait_until(ready, 30, f"the {kind} receiver", proc)
    return port[0]


def run(args):
    from twisted.internet import defer, protocol, reactor, task

    from p2pnat.quic import Credentials, QuicSocket

    data = random.Random(1).randbytes(int(args.size_mb * 1_000_000))
    digest = hashlib.sha256(data).hexdigest()
    work = S.workdir("quic-bulk")
    results = {"tcp": [], "quic": []}

    class Send(protocol.Protocol):
        CHUNK = 256 * 1024

        def __init__(self):
            self.offset = 0
            self.paused = False
            self.answer = b""
            self.done = defer.Deferred()

        def connectionMade(self):
            self.start = time.perf_counter()
            self.cpu = time.process_time()
            self.transport.registerProducer(self, True)
            self.resumeProducing()

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False
            while not self.paused and self.offset < len(data):
                self.transport.write(data[self.offset:self.offset + self.CHUNK])
                self.offset += self.CHUNK
            if self.offset >= len(data) and self.transport.connected:
                self.transport.unregisterProducer()
                self.transport.loseWriteConnection()

        def stopProducing(self):
            pass

        def dataReceived(self, chunk):
            self.answer += chunk
            if self.answer.endswith(b"\n") and not self.done.called:
                self.done.callback((time.perf_counter() - self.start,
                                    time.process_time() - self.cpu, self.answer.decode()))

        def connectionLost(self, reason):
            if not self.done.called:
                self.done.errback(S.BenchError(f"stream lost: {reason.getErrorMessage()}"))

    def record(kind, result):
        wall, cpu, answer = result
        count, their_digest, their_cpu = answer.split()
        if int(count) != len(data) or their_digest != digest:
            raise S.BenchError(f"{kind}: the receiver got {count} bytes, sha256 {their_digest}")
        mb = len(data) / 1e6
        results[kind].append((mb / wall, (cpu + float(their_cpu)) / mb))
        S.say(f"  {kind:4}  {mb / wall:7.1f} MB/s  {(cpu + float(their_cpu)) / mb:.4f} CPU s/MB"
              f"  (sender {cpu / mb:.4f}, receiver {float(their_cpu) / mb:.4f})")

    @defer.inlineCallbacks
    def rounds(tcp_port, quic_port):
        creds = Credentials.from_files(*(os.path.join(work, n)
                                         for n in ("alice.crt", "alice.key", "ca.crt")))
        sock = QuicSocket(reactor, creds)
        udp = reactor.listenUDP(0, sock, interface="127.0.0.1")
        try:
            for i in range(args.rounds):
                S.say(f"round {i + 1}/{args.rounds}")
                sender = Send()
                yield protocol.ClientCreator(reactor, lambda s=sender: s).connectTCP(
                    "127.0.0.1", tcp_port)
                record("tcp", (yield sender.done))
                endpoint = yield sock.connect(("127.0.0.1", quic_port), "client:bob")
                sender = Send()
                endpoint.open_stream(SERVICE, sender)
                record("quic", (yield sender.done))
                endpoint.close()
                yield endpoint.closed
        finally:
            yield udp.stopListening()

    load_before = S.load_average()
    try:
        write_certs(work)
        with S.Processes(work) as processes:
            tcp_port = start_receiver(processes, "tcp", work)
            quic_port = start_receiver(processes, "quic", work)
            S.say(f"{args.size_mb:g} MB per stream, {args.rounds} rounds, loopback")
            task.react(lambda _: rounds(tcp_port, quic_port))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    medians = {}
    for kind in ("tcp", "quic"):
        speed = S.median([r[0] for r in results[kind]])
        cpu = S.median([r[1] for r in results[kind]])
        medians[kind] = (speed, cpu)
        rows.append([kind, f"{speed:.1f} MB/s", f"{cpu:.4f}"])
    S.say("")
    S.table(["transport", "MB/s (median)", "CPU s/MB (median, both ends)"], rows)
    (ts, tc), (qs, qc) = medians["tcp"], medians["quic"]
    S.say(f"QUIC: {qs / ts * 100:.1f} % of TCP's MB/s, {qc / tc:.1f}x its CPU per MB "
          f"(load average {load_before} before)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=("tcp", "quic"), help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.certs)
    S.main(lambda: run(args))


if __name__ == "__main__":
    main()
