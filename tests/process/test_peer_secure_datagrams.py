"""
The path's datagrams on the encrypted channel, as users run it: a ``twistd
lobby`` process and two ``p2pnat peer`` processes on loopback, chat
(``--send``, echoed back) and a UDP forward (``--forward-udp-listen`` to
``--forward-udp``, a UDP echo server in this process), on a direct path
and on a relayed one; and a bundle without a certificate, which falls back
to the clear and says so.

Every datagram the peers send, to the lobby or to each other, passes a NAT
that this process plays (L{Nat}: one mapping per socket, as a cone NAT
makes, in front of both peers and of the lobby's address as they know it;
each peer on its own loopback address, behind its own public one, so that
the lobby does not take them for one LAN), which keeps what it carried: a marker sent in chat and through the forward
must never show in it.  In the clear, as the path's own frames carried
datagrams before, it shows: on the direct path in what the peers send each
other, on the relayed one in what the lobby receives.

Port mapping and IPv6 are off and the NAT is given (``--nat``), so no
discovery runs and the peers have no candidates but what the lobby saw.
"""

import os
import selectors
import socket
import threading
import time

from tests.process.test_daemons import LOOPBACK, Daemon, DaemonTestCase
from tests.support import procs
from tests.support.lab.running import events
from tests.support.procs import provision

CONE = "endpoint-independent/preserving"
#: Both sides with unpredictable ports: the lobby plans no port prediction.
RANDOM = "address-and-port-dependent/random"
MARKER = b"SECRET-MARKER-3b9e51"


class Nat:
    """
    A cone NAT on loopback in front of the peers (see the module): they
    send to C{front} as to the lobby; each of their sockets gets its own
    outside socket (on the public address of the socket's inside address,
    from C{public}), which talks to the lobby and to the other peers'
    outside sockets (unless C{direct} is false: then the peers' punches
    fail, and the lobby relays).  C{carried} keeps every payload, as
    C{(kind, data)}: ``to-lobby``, ``from-lobby`` or ``between-peers``.
    """

    def __init__(self, lobby, public):
        self.lobby = lobby
        self.public = public
        self.direct = True
        self.carried = []
        self.selector = selectors.DefaultSelector()
        self.front = self._socket()
        self.outside = {}  # inside address -> its outside socket
        self.owner = {}  # outside address -> inside address
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return self.front.getsockname()

    def _socket(self, host=LOOPBACK):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        return sock

    def _outside(self, inside):
        sock = self.outside.get(inside)
        if sock is None:
            sock = self.outside[inside] = self._socket(self.public[inside[0]])
            self.owner[sock.getsockname()] = inside
        return sock

    def _run(self):
        while self.running:
            for key, _ in self.selector.select(0.1):
                try:
                    data, src = key.fileobj.recvfrom(65535)
                except OSError:
                    continue
                with self.lock:
                    self._pass(key.fileobj, data, src)

    def _pass(self, sock, data, src):
        if sock is self.front:
            self.carried.append(("to-lobby", data))
            self._outside(src).sendto(data, self.lobby)
            return
        inside = self.owner[sock.getsockname()]
        if src == self.lobby:
            self.carried.append(("from-lobby", data))
            self.front.sendto(data, inside)
        elif self.direct:
            # A peer's socket sent to this outside address: it leaves by its
            # own outside socket, so the receiver sees the address the
            # lobby told it.
            self.carried.append(("between-peers", data))
            self._outside(src).sendto(data, inside)

    def seen(self, marker):
        """The kinds of traffic that carried C{marker}."""
        with self.lock:
            return sorted({kind for kind, data in self.carried if marker in data})

    def count(self, kind):
        with self.lock:
            return sum(1 for k, _ in self.carried if k == kind)

    def close(self):
        self.running = False
        self.thread.join(5)
        for sock in [self.front, *self.outside.values()]:
            sock.close()


class UdpEcho:
    """A UDP echo server on loopback; C{received} keeps what came."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.received = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data, src = self.sock.recvfrom(65535)
            except OSError:
                continue
            self.received.append(data)
            self.sock.sendto(data, src)

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


class SecureDatagramTests(DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.state = os.path.join(self.tmpdir(), "lobby")
        self.lobby, port = self.start_lobby_on_loopback(self.state)
        #: Each peer's address, and its public address (L{Nat}).
        hosts = {"alice": ("127.0.0.11", "127.0.0.21"), "bob": ("127.0.0.12", "127.0.0.22")}
        self.nat = Nat((LOOPBACK, port), dict(hosts.values()))
        self.addCleanup(self.nat.close)
        self.echo = UdpEcho()
        self.addCleanup(self.echo.close)
        self.bundles = {}
        for name in ("alice", "bob"):
            self.bundles[name] = os.path.join(self.tmpdir(), name)
            provision("client", "add", name, "--state-dir", self.state, "--lobby",
                      "%s:%d" % self.nat.address, "--out", self.bundles[name])
            with open(os.path.join(self.bundles[name], "client.toml"), "a") as f:
                f.write(f'interface = "{hosts[name][0]}"\n')

    def peer(self, name, nat, *args):
        return Daemon(self, f"peer-{name}-{len(self.daemons)}", (), argv=procs.p2pnat(
            "peer", *args, "--config", os.path.join(self.bundles[name], "client.toml"),
            "--nat", nat, "--no-portmap", "--no-ipv6", "--upgrade-interval", "600",
            "--json"))

    def wait_events(self, daemon, kind, n=1, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in events(daemon.output()) if e["event"] == kind]
            if len(found) >= n:
                return found
            if daemon.proc.poll() is not None:
                self.fail(f"{daemon.name} exited before {n} {kind} event(s)")
            time.sleep(0.05)
        self.fail(f"fewer than {n} {kind} event(s) from {daemon.name} in {timeout}s")

    def without_certificate(self, name):
        procs.without_certificate(os.path.join(self.bundles[name], "client.toml"))

    def chat_and_forward(self, nat, mode, direct=True):
        """
        bob forwards to the UDP echo; alice chats (her lines go through
        the forward and come back), then forwards a local UDP port to bob's.
        The marker passes both ways each time; the NAT never carries it
        in the clear.
        """
        self.nat.direct = direct
        bob = self.peer("bob", nat, "wait", "--forward-udp",
                        "%s:%d" % self.echo.sock.getsockname())
        self.wait_events(bob, "login")
        lines = [MARKER + b" line %d" % i for i in range(3)]
        chat = self.peer("alice", nat, "connect", "bob", "--wait", "15",
                         *[a for line in lines for a in ("--send", line.decode())])
        [path] = self.wait_events(chat, "path")
        self.assertEqual((path["mode"], path["encrypted"]), (mode, True))
        data = self.wait_events(chat, "data", n=len(lines))
        self.assertEqual(sorted(e["text"].encode() for e in data), lines)
        self.assertEqual(chat.proc.wait(30), 0)
        self.assertEqual(self.wait_events(bob, "path")[0]["encrypted"], True)

        forward = self.peer("alice", nat, "connect", "bob", "--forward-udp-listen",
                            f"{LOOPBACK}:0")
        [path] = self.wait_events(forward, "path")
        self.assertEqual((path["mode"], path["encrypted"]), (mode, True))
        [listen] = self.wait_events(forward, "forward")
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(app.close)
        app.settimeout(0.5)
        wanted = [MARKER + b" datagram %d " % i + os.urandom(8).hex().encode()
                  for i in range(5)]
        back = []
        for datagram in wanted:
            for _ in range(20):  # UDP: send again until its echo is back
                app.sendto(datagram, (LOOPBACK, listen["port"]))
                try:
                    got, _ = app.recvfrom(65535)
                except socket.timeout:
                    continue
                back.append(got)
                if got == datagram:
                    break
            self.assertIn(datagram, back)
        self.assertEqual(self.wait_events(bob, "path", n=2)[1]["encrypted"], True)
        self.assertTrue(any(MARKER in d for d in self.echo.received))
        self.assertEqual(self.nat.seen(MARKER), [])
        for daemon in (forward, bob):
            daemon.stop()
            self.assertNotIn("Traceback", daemon.output())
            self.assertNotIn("NOT end-to-end encrypted", daemon.output())

    def test_direct(self):
        self.chat_and_forward(CONE, "direct")
        self.assertGreater(self.nat.count("between-peers"), 10)

    def test_relayed(self):
        """Forced through the lobby's relay: it carries the datagrams and cannot read them."""
        self.chat_and_forward(RANDOM, "relayed", direct=False)
        self.assertEqual(self.nat.count("between-peers"), 0)
        self.assertGreater(self.nat.count("to-lobby"), 20)

    def test_bundle_without_certificate(self):
        """
        alice's bundle has no certificate: her lines go in the clear (the
        NAT sees them, as the lobby could), both sides say so, once each
        (on stderr; ``encrypted`` false in the path event), and chat works.
        """
        self.without_certificate("alice")
        bob = self.peer("bob", RANDOM, "wait", "--echo")
        self.wait_events(bob, "login")
        chat = self.peer("alice", RANDOM, "connect", "bob", "--send", MARKER.decode(),
                         "--wait", "15")
        [path] = self.wait_events(chat, "path")
        self.assertEqual((path["encrypted"], path["clear_reason"]),
                         (False, "this client's bundle has no certificate"))
        [data] = self.wait_events(chat, "data")
        self.assertEqual(data["text"], MARKER.decode())
        self.assertEqual(chat.proc.wait(30), 0)
        [path] = self.wait_events(bob, "path")
        self.assertEqual((path["encrypted"], path["clear_reason"]),
                         (False, "the peer has no certificate for QUIC"))
        self.assertEqual(chat.output().count("NOT end-to-end encrypted"), 1)
        self.assertIn("the lobby could read and alter them", chat.output())
        bob.stop()
        self.assertEqual(bob.output().count("NOT end-to-end encrypted"), 1)
        self.assertIn("to-lobby", self.nat.seen(MARKER))
        for daemon in (chat, bob):
            self.assertNotIn("Traceback", daemon.output())
