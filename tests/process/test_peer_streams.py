"""
TCP forwarded over end-to-end encrypted QUIC streams, as users run it: a
``twistd lobby`` process, ``p2pnat peer wait --service echo=HOST:PORT`` and
``p2pnat peer connect bob --forward-tcp HOST:PORT=echo``, all on loopback,
with a TCP echo server in this process; 2 MB through the forward and back,
sha256-checked at both ends.  And what a bundle without a certificate
says when streams are asked for.

Port mapping and IPv6 are off (``--no-portmap --no-ipv6``: nothing leaves
the machine) and the NAT is given (``--nat``), so no discovery runs.
"""

import hashlib
import os
import socket
import socketserver
import subprocess
import threading
import time

from tests.process.test_daemons import LOOPBACK, Daemon, DaemonTestCase
from tests.support import procs
from tests.support.lab.running import events
from tests.support.procs import provision

NAT = "endpoint-independent/preserving"
QUIET = ("--nat", NAT, "--no-portmap", "--no-ipv6", "--json")


def read_to_end(sock):
    """Read C{sock} to its end of stream: C{(bytes read, their sha256 in hex)}."""
    digest, count = hashlib.sha256(), 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return count, digest.hexdigest()
        digest.update(chunk)
        count += len(chunk)


class EchoHandler(socketserver.BaseRequestHandler):
    """Echoes until the client's end of stream, then closes; records a sha256 of the input."""

    def handle(self):
        digest, count = hashlib.sha256(), 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            digest.update(data)
            count += len(data)
            self.request.sendall(data)
        self.server.received.append((count, digest.hexdigest()))
        self.request.shutdown(socket.SHUT_WR)


class Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__((LOOPBACK, 0), EchoHandler)
        self.received = []


class DownloadHandler(socketserver.BaseRequestHandler):
    """Reads a request line, then sends the server's C{data} and closes at once (HTTP/1.0)."""

    def handle(self):
        request = b""
        while not request.endswith(b"\n"):
            chunk = self.request.recv(1024)
            if not chunk:
                return
            request += chunk
        self.request.sendall(self.server.data)
        self.request.close()


class Download(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, data):
        super().__init__((LOOPBACK, 0), DownloadHandler)
        self.data = data


class PeerStreamsProcessTests(DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.state = os.path.join(self.tmpdir(), "lobby")
        self.lobby, port = self.start_lobby_on_loopback(self.state)
        self.bundles = {}
        for name in ("alice", "bob"):
            self.bundles[name] = os.path.join(self.tmpdir(), name)
            provision("client", "add", name, "--state-dir", self.state, "--lobby",
                      f"{LOOPBACK}:{port}", "--out", self.bundles[name])

    def peer(self, name, *args):
        return Daemon(self, f"peer-{name}", (), argv=procs.p2pnat(
            "peer", *args, "--config", os.path.join(self.bundles[name], "client.toml"), *QUIET))

    def wait_event(self, daemon, kind, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in events(daemon.output()) if e["event"] == kind]
            if found:
                return found[0]
            if daemon.proc.poll() is not None:
                self.fail(f"{daemon.name} exited before a {kind} event")
            time.sleep(0.05)
        self.fail(f"no {kind} event from {daemon.name} in {timeout}s")

    def test_tcp_forward_through_quic(self):
        echo = Echo()
        threading.Thread(target=echo.serve_forever, daemon=True).start()
        self.addCleanup(echo.server_close)
        self.addCleanup(echo.shutdown)
        bob = self.peer("bob", "wait", "--service", f"echo={LOOPBACK}:{echo.server_address[1]}",
                        "--service", "other=127.0.0.1:9")
        self.wait_event(bob, "login")
        alice = self.peer("alice", "connect", "bob", "--forward-tcp", f"{LOOPBACK}:0=echo")
        quic = self.wait_event(alice, "quic")
        self.assertEqual(quic["peer"], "client:bob")
        forward = self.wait_event(alice, "forward-tcp")
        self.assertEqual((forward["service"], forward["peer"]), ("echo", "bob"))

        data = os.urandom(2_000_000)
        with socket.create_connection((LOOPBACK, forward["port"]), timeout=30) as sock:
            def send():
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            back = read_to_end(sock)
            sender.join(30)
        expected = hashlib.sha256(data).hexdigest()
        self.assertEqual(echo.received, [(len(data), expected)])
        self.assertEqual(back, (len(data), expected))

        closed_a = self.wait_event(alice, "stream-closed")
        closed_b = self.wait_event(bob, "stream-closed")
        self.assertEqual((closed_a["sent"], closed_a["received"], closed_a["direction"]),
                         (len(data), len(data), "out"))
        self.assertEqual((closed_b["sent"], closed_b["received"], closed_b["direction"],
                          closed_b["peer"]), (len(data), len(data), "in", "client:alice"))
        self.assertEqual(self.wait_event(bob, "quic")["peer"], "client:alice")
        for daemon in (alice, bob):
            daemon.stop()
            self.assertNotIn("Traceback", daemon.output())

    def test_service_closes_first(self):
        """
        A service that sends 2 MB and closes at once, read slowly through
        the forward: all of it arrives, then the end of stream.
        """
        data = os.urandom(2_000_000)
        download = Download(data)
        threading.Thread(target=download.serve_forever, daemon=True).start()
        self.addCleanup(download.server_close)
        self.addCleanup(download.shutdown)
        bob = self.peer("bob", "wait", "--service",
                        f"file={LOOPBACK}:{download.server_address[1]}")
        self.wait_event(bob, "login")
        alice = self.peer("alice", "connect", "bob", "--forward-tcp", f"{LOOPBACK}:0=file")
        forward = self.wait_event(alice, "forward-tcp")
        with socket.create_connection((LOOPBACK, forward["port"]), timeout=30) as sock:
            sock.sendall(b"GET /file HTTP/1.0\r\n")
            time.sleep(0.5)  # a slow reader: the service has long closed when it starts
            got = read_to_end(sock)
        self.assertEqual(got, (len(data), hashlib.sha256(data).hexdigest()))
        for daemon in (alice, bob):
            closed = self.wait_event(daemon, "stream-closed")
            self.assertNotIn("error", closed)
            daemon.stop()
            self.assertNotIn("Traceback", daemon.output())

    def test_bundle_without_certificate(self):
        """A bundle from before client certificates: a clear message for --forward-tcp."""
        config = os.path.join(self.bundles["alice"], "client.toml")
        procs.without_certificate(config)
        done = subprocess.run(procs.p2pnat("peer", "connect", "bob", "--config", config,
                                           "--forward-tcp", f"{LOOPBACK}:0=echo", *QUIET),
                              cwd=procs.REPO, env=procs.env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(done.returncode, 2)
        self.assertIn("this bundle has no certificate for QUIC streams", done.stderr)
        self.assertIn("p2pnat client add ID --replace", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
