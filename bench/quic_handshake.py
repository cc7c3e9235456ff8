"""
CPU of one p2pnat QUIC handshake on each side, in memory.

    .venv/bin/python bench/quic_handshake.py [--rounds 200]

Two L{p2pnat.quic.connection.PeerConnection}s, configured as
L{p2pnat.quic.QuicSocket} configures them (a client connecting, a device
accepting, both checking the other's certificate against the deployment's
CA and the expected identity), hand their datagrams to each other in
memory until both have completed the handshake; no socket and no reactor.
The CPU seconds (C{time.process_time}) spent in each side's calls
(building, receiving, sending datagrams) are added up per side.  It
prints, over C{--rounds} handshakes after a few warm-up ones, the median
and the 90th percentile of milliseconds for the connecting side, the
accepting side and both together: until both sides have completed the
handshake (each checked the other's certificate), and until the last
packet the start exchanges (the handshake's confirmation, connection IDs,
path MTU probes and their acknowledgements).
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WARM_UP = 5


class _Clock:
    """A clock standing still at the certificates' issue time plus a minute."""

    def __init__(self, now):
        self.now = now

    def seconds(self):
        return self.now


def handshake(connection, alice_creds, bob_creds, clock):
    """
    One handshake between a new connecting side (alice, a client) and a
    new accepting side (bob, a device); returns the CPU seconds each spent
    until both had completed the handshake, and until the start's last
    packet (the handshake's confirmation, new connection IDs, path MTU
    probes, their acknowledgements).
    """
    from aioquic.buffer import Buffer
    from aioquic.quic import events
    from aioquic.quic.packet import pull_quic_header

    from p2pnat.quic.endpoint import CID_LENGTH
    from p2pnat.quic.identity import PeerIdentity

    def make(creds, is_client, expected, **kw):
        config = connection.make_configuration(creds, is_client=is_client)
        config.connection_id_length = CID_LENGTH
        return connection.PeerConnection(configuration=config, credentials=creds,
                                         expected=expected, clock=clock, **kw)

    cpu = [0.0, 0.0]
    t = time.process_time()
    alice = make(alice_creds, True, PeerIdentity("device", "bob"))
    alice.connect(("192.0.2.2", 4433), now=clock.now)
    first = alice.datagrams_to_send(now=clock.now)
    cpu[0] += time.process_time() - t
    t = time.process_time()
    # as QuicSocket does for a new connection: its ID from the first packet
    head = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=CID_LENGTH)
    bob = make(bob_creds, False, {PeerIdentity("client", "alice")},
               original_destination_connection_id=head.destination_cid)
    for data, _to in first:
        bob.receive_datagram(data, ("192.0.2.1", 4433), now=clock.now)
    cpu[1] += time.process_time() - t
    done = [False, False]
    completed = None
    sides = ((alice, ("192.0.2.1", 4433)), (bob, ("192.0.2.2", 4433)))
    for _ in range(20):
        moved = False
        for i, (conn, _addr) in enumerate(sides):
            peer, addr = sides[1 - i][0], sides[i][1]
            t = time.process_time()
            out = conn.datagrams_to_send(now=clock.now)
            cpu[i] += time.process_time() - t
            t = time.process_time()
            for data, _to in out:
                peer.receive_datagram(data, addr, now=clock.now)
                moved = True
            while (event := peer.next_event()) is not None:
                if isinstance(event, events.HandshakeCompleted):
                    done[1 - i] = True
                elif isinstance(event, events.ConnectionTerminated):
                    raise RuntimeError(f"handshake refused: {event.reason_phrase}")
            cpu[1 - i] += time.process_time() - t
            if completed is None and all(done):
                completed = list(cpu)
        if all(done) and not moved:
            if alice.peer_identity is None or bob.peer_identity is None:
                raise RuntimeError("a side completed without checking its peer")
            return completed + cpu
    raise RuntimeError("handshake did not complete")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    from p2pnat.quic import connection
    from tests.support.quic import T0, Deployment

    connection.check_internals()
    deployment = Deployment(now=T0)
    alice_creds, bob_creds = deployment.client("alice"), deployment.device("bob")
    clock = _Clock(T0 + 60)
    results = [handshake(connection, alice_creds, bob_creds, clock)
               for _ in range(WARM_UP + args.rounds)][WARM_UP:]

    def row(name, values):
        ms = sorted(v * 1000 for v in values)
        p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
        print(f"{name:<12} {statistics.median(ms):8.2f} {p90:8.2f}")

    for title, a, b in (("until both completed the handshake", 0, 1),
                        ("until the last packet of the start", 2, 3)):
        print(f"CPU ms per connection over {args.rounds}, {title}")
        print(f"{'side':<12} {'median':>8} {'p90':>8}")
        row("connecting", [r[a] for r in results])
        row("accepting", [r[b] for r in results])
        row("both", [r[a] + r[b] for r in results])


if __name__ == "__main__":
    main()
