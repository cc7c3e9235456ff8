"""
Relay nodes sharing a Redis, as real processes on loopback: a redis-server
of the test's own (L{tests.support.redis}), two or three ``twistd relay``
nodes with the same state files (CA, certificate, terminal secret), device
agents, and terminals speaking plain HTTP to the nodes.

- a terminal on node 2 reaches a device whose notifies go to node 1 (and
  node 1 still serves it too);
- revoking the device on node 1 (``p2pnat device remove``) cuts its
  download through node 3 within a second (measured);
- Redis killed: a clear 503 for devices live on other nodes, this node's
  own devices still served; Redis restarted empty: every device reachable
  again within a notify-B interval or so, with nothing done by hand;
- forged pub/sub messages and garbage in Redis do nothing harmful.
"""

import http.server
import os
import re
import shutil
import socket
import threading
import time

from tests.process.test_daemons import ETC, LOOPBACK, DaemonTestCase
from tests.support.procs import provision
from tests.support.redis import RedisServer, require_redis

HOSTNAME = "relay.test"
PERIOD = 6  # seconds: access-check period (notify A every 3 s)
NOTIFY_B = 1  # seconds: notify-B interval advised to agents
REACH_TIMEOUT = 20.0


class Service(http.server.ThreadingHTTPServer):
    """A device's web server: ``/`` names the device, ``/stream`` never ends."""

    daemon_threads = True

    def __init__(self, name):
        self.name = name
        self.stop = threading.Event()
        super().__init__((LOOPBACK, 0), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            deadline = time.monotonic() + 30
            try:
                while not self.server.stop.is_set() and time.monotonic() < deadline:
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                pass
            return
        body = f"hello from {self.server.name}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def http_get(port, device_id, path="/", timeout=5.0):
    """``(status, body)`` of a GET for C{device_id} through the node at C{port}."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {device_id}.{HOSTNAME}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 else None), head + b"\r\n\r\n" + body


def start_device(case, device_id, node, timeout):
    """
    Provision C{device_id} on C{node}'s registry (C{node}: a dict with the
    relay's C{"state"}, C{"udp"} port and C{"daemon"}) and start its agent
    reporting there, in front of a L{Service} of its own; the service.
    """
    service = Service(device_id)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    case.addCleanup(service.server_close)
    case.addCleanup(service.shutdown)
    case.addCleanup(service.stop.set)
    bundle = os.path.join(case.tmpdir(), device_id)
    provision("device", "add", device_id, "--state-dir", node["state"],
              "--relay", f"{LOOPBACK}:{node['udp']}",
              "--service", f"{LOOPBACK}:{service.server_address[1]}", "--out", bundle)
    case.start("device-agent", "--config", os.path.join(bundle, "agent.toml"),
               "--udp-listen", f"{LOOPBACK}:0")
    node["daemon"].wait_for(re.escape(f"device {device_id} online at"), timeout=timeout)
    return service


class ClusterTests(DaemonTestCase):
    def setUp(self):
        require_redis()
        super().setUp()
        self.redis = RedisServer(self)
        self.state = os.path.join(self.tmpdir(), "node1")
        provision("relay", "init", "--state-dir", self.state, "--hostname", HOSTNAME)
        self.nodes = {}

    def node(self, name, sync_interval=0.2):
        """Start relay node C{name} sharing the first node's state files; its ports."""
        state = self.state if not self.nodes else os.path.join(self.tmpdir(), name)
        if state != self.state:
            shutil.copytree(self.state, state, dirs_exist_ok=True)
        relay = self.start(
            "relay", "--config", os.path.join(ETC, "relay.toml"), "--relay-state-dir", state,
            "--relay-hostname", HOSTNAME, "--udp-listen", f"{LOOPBACK}:0",
            "--terminal-https", "", "--terminal-http", f"tcp:0:interface={LOOPBACK}",
            "--tunnel-listen", f"tcp:0:interface={LOOPBACK}",
            "--relay-access-check-period", str(PERIOD),
            "--relay-notify-b-interval", str(NOTIFY_B),
            "--relay-sync-interval", str(sync_interval), "--session-timeout", "3",
            "--cluster-redis", self.redis.url, "--cluster-node", name)
        m = relay.wait_for(r"notifies on 127\.0\.0\.1:(\d+); terminals on http port (\d+);")
        relay.wait_for(r"connected to redis")
        info = {"daemon": relay, "state": state, "udp": int(m.group(1)),
                "http": int(m.group(2))}
        self.nodes[name] = info
        return info

    def device(self, device_id, node):
        return start_device(self, device_id, node, REACH_TIMEOUT)

    def reach(self, node, device_id, timeout=REACH_TIMEOUT):
        """Wait until a terminal on C{node} gets the device's page; the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            status, data = http_get(node["http"], device_id)
            if status == 200:
                self.assertIn(f"hello from {device_id}".encode(), data)
                return time.monotonic() - start
            if time.monotonic() > deadline:
                self.fail(f"{device_id} not reachable through node port {node['http']}:"
                          f" last answer {data[:300]!r}")
            time.sleep(0.1)

    def test_terminal_on_another_node(self):
        n1, n2 = self.node("n1"), self.node("n2")
        self.device("cam", n1)
        self.reach(n2, "cam")
        self.reach(n1, "cam")
        # Unknown devices are refused on every node without asking anyone.
        status, _ = http_get(n2["http"], "nobody")
        self.assertEqual(status, 401)

    def test_revocation_cuts_a_download_on_another_node_within_a_second(self):
        n1, _, n3 = self.node("n1"), self.node("n2"), self.node("n3")
        self.device("cam", n1)
        self.reach(n3, "cam")
        s = socket.create_connection((LOOPBACK, n3["http"]), timeout=5)
        self.addCleanup(s.close)
        s.sendall(f"GET /stream HTTP/1.1\r\nHost: cam.{HOSTNAME}\r\n\r\n".encode())
        got = 0
        while got < 50_000:
            chunk = s.recv(65536)
            self.assertTrue(chunk, "download ended early")
            got += len(chunk)
        provision("device", "remove", "cam", "--state-dir", n1["state"])
        revoked = time.monotonic()
        s.settimeout(0.05)
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                chunk = None
            except OSError:
                chunk = b""
            if chunk == b"":
                break
            self.assertLess(time.monotonic() - revoked, 5.0, "download never cut")
        took = time.monotonic() - revoked
        print(f"\nrevocation on n1 cut the download on n3 after {took * 1000:.0f} ms"
              " (node sync interval 200 ms included)")
        self.assertLess(took, 1.0)
        status, _ = http_get(n3["http"], "cam")
        self.assertEqual(status, 403)

    def test_redis_away_and_back(self):
        n1, n2 = self.node("n1"), self.node("n2")
        self.device("cam", n1)
        self.device("cam3", n1)
        self.device("cam2", n2)
        self.reach(n2, "cam")  # n2 now keeps an idle tunnel of cam's
        self.redis.kill()
        n2["daemon"].wait_for("lost redis")
        status, data = http_get(n2["http"], "cam3")
        self.assertEqual(status, 503, data)
        self.assertIn(b"shared state", data)
        self.assertIn(b"Retry-After:", data)
        self.reach(n2, "cam", timeout=2)  # a tunnel already open keeps serving
        self.reach(n2, "cam2", timeout=2)  # and so does the node's own device
        self.reach(n1, "cam3", timeout=2)
        self.redis.start()  # empty: it kept nothing
        took = self.reach(n2, "cam3")
        print(f"\nredis restarted empty: cam3 reachable through n2 again after {took:.1f} s")
        self.reach(n1, "cam2")
        self.assertEqual(self.redis.command("HEXISTS", "p2pnat:registry", "cam3"), b":1")

    def test_forgeries_do_nothing_harmful(self):
        n1, n2 = self.node("n1"), self.node("n2")
        self.device("cam", n1)
        self.reach(n2, "cam")
        forged = ('0' * 64 + '{"t":"connect","from":"evil","device":"cam","sid":"' + "aa" * 16
                  + '","nonce":"' + "bb" * 16 + '","host":"192.0.2.66","port":1,"ts":0}')
        for channel in ("p2pnat:ch:node:n1", "p2pnat:ch:registry", "p2pnat:ch:node:ghost"):
            for message in ("garbage", forged, "x" * 10000):
                self.assertIsNotNone(self.redis.command("PUBLISH", channel, repr(message)))
        # Garbage where cam's record is, and a version bump that makes every
        # node read the registry again.
        self.redis.command("HSET", "p2pnat:registry", "cam", "garbage")
        self.redis.command("HSET", "p2pnat:registry", "ghost", "{}")
        self.redis.command("INCR", "p2pnat:registry:version")
        n2["daemon"].wait_for("registry record of (cam|ghost) in redis ignored")
        n1["daemon"].wait_for("message on p2pnat:ch:node:n1 refused")
        self.reach(n2, "cam", timeout=3)
        self.reach(n1, "cam", timeout=3)
        for node in (n1, n2):
            self.assertNotIn("192.0.2.66", node["daemon"].output())
            self.assertNotIn("Traceback", node["daemon"].output())

    def test_owner_killed_is_a_quick_503(self):
        """The device's node dies: other nodes say so at once (503), not after 10 s (504)."""
        n1, n2 = self.node("n1"), self.node("n2")
        self.device("cam", n1)
        self.reach(n1, "cam")
        n1["daemon"].proc.kill()
        n1["daemon"].proc.wait(10)
        deadline = time.monotonic() + REACH_TIMEOUT
        while True:
            start = time.monotonic()
            status, data = http_get(n2["http"], "cam")
            took = time.monotonic() - start
            if status == 503:
                break
            self.assertLess(time.monotonic(), deadline, data)
            time.sleep(0.1)
        self.assertIn(b"not answering", data)
        self.assertLess(took, 1.0)
