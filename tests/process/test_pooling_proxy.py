"""
A real pooling proxy in front of the relay's plain terminal port (issue #9,
finding 1): Debian's nginx with ``upstream { keepalive; }`` hands several
users' requests to one kept-alive relay connection.  Each must be routed
and authorized by its own head: user 1's requests reach device A with its
credential, user 2's unauthenticated ones get the relay's login form, and a
request naming B never reaches A.

The relay and the agents run in this process (as in
tests/unit/test_relay_loopback.py); nginx is started here, on 127.0.0.1,
with its own configuration in a temporary directory.
"""

import base64
import http.client
import os
import shutil
import socket
import subprocess

from twisted.internet import defer, endpoints, protocol, reactor, task, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.relay import start_agent, start_relay

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
{user}
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream relay {{
        server 127.0.0.1:{relay};
        keepalive 1;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://relay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""


class Device(protocol.Protocol):
    """A kept-alive HTTP/1.1 web server that records every request head it got."""

    def __init__(self, name, seen):
        self.name = name
        self.seen = seen
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            length = int(fields.get(b"Content-Length", b"0"))
            if len(rest) < length:
                return
            self.buf = rest[length:]
            self.seen.append(head)
            body = b"device " + self.name
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                                 + body)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PoolingProxyTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx")
                                               and "/usr/sbin/nginx")
        if not self.nginx:
            raise SkipTest("nginx is not installed (scripts/system-packages.txt)")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.relay = start_relay(self, self.dir, **{
            "terminal.https": "tcp:0:interface=127.0.0.1",
            "terminal.http": "tcp:0:interface=127.0.0.1"})
        self.seen = {}
        for name in ("a", "b"):
            yield self.start_device(name)
        self.port = free_port()
        yield self.start_nginx()

    @defer.inlineCallbacks
    def start_device(self, name):
        self.seen[name] = []
        web = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(lambda: Device(name.encode(), self.seen[name])))
        self.addCleanup(web.stopListening)
        out = os.path.join(self.dir, name)
        cred = os.path.join(self.dir, name + ".cred")
        with open(cred, "w") as f:
            f.write(f"secret-of-{name}-0123456789\n")
        yield defer.Deferred.fromCoroutine(start_agent(
            self, self.relay, name, out, web.getHost().port,
            ("--access", "relay", "--credential-file", cred)))

    @defer.inlineCallbacks
    def start_nginx(self):
        d = os.path.join(self.dir, "nginx")
        os.makedirs(d)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=d, port=self.port,
                                      relay=self.relay.terminal_http.address[1],
                                      user="user root;" if os.geteuid() == 0 else ""))
        proc = subprocess.Popen([self.nginx, "-e", os.path.join(d, "error.log"), "-p", d,
                                 "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def stop():
            proc.terminate()
            proc.wait(10)
            proc.stderr.close()
        self.addCleanup(stop)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if proc.poll() is not None:
                    self.fail("nginx exited: " + proc.stderr.read().decode(errors="replace"))
                yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail("nginx never listened")

    def get(self, host, method="GET", auth=None, body=None):
        """One request through nginx, on a new client connection: (status, body)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        headers = {"Host": host}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(
                b"user:" + auth.encode()).decode()
        c.request(method, "/", body=body, headers=headers)
        r = c.getresponse()
        out = (r.status, r.read())
        c.close()
        return out

    @defer.inlineCallbacks
    def test_users_interleaved_through_nginx(self):
        opened = []
        terminal_opened = self.relay.relay.terminal_opened
        self.relay.relay.terminal_opened = lambda t: (opened.append(t), terminal_opened(t))
        a_cred = "secret-of-a-0123456789"
        steps = [("a.relay.test", "GET", a_cred, None, 200),
                 ("a.relay.test", "GET", None, None, 401),  # user 2 on user 1's connection
                 ("a.relay.test", "POST", a_cred, b"x=1", 200),
                 ("b.relay.test", "GET", None, None, 401),  # user 2 names B
                 ("a.relay.test", "GET", a_cred, None, 200),
                 ("a.relay.test", "POST", "wrong", b"y=2", 401),
                 ("b.relay.test", "GET", "secret-of-b-0123456789", None, 200),
                 ("a.relay.test", "GET", a_cred, None, 200)] * 2
        for host, method, cred, body, want in steps:
            status, page = yield threads.deferToThread(self.get, host, method, cred, body)
            self.assertEqual(status, want, (host, method, cred, page[:200]))
            if want == 200:
                self.assertEqual(page, b"device " + host[0].encode())
        # nginx kept relay connections alive: fewer than one per request.
        self.assertLess(len(opened), len(steps))
        a_auth = b"Authorization: Basic " + base64.b64encode(b"user:" + a_cred.encode())
        self.assertEqual(len(self.seen["a"]), 8)
        for head in self.seen["a"]:
            self.assertIn(b"\r\nHost: a.relay.test", head)
            self.assertIn(a_auth, head)
        self.assertEqual(len(self.seen["b"]), 2)
        for head in self.seen["b"]:
            self.assertIn(b"\r\nHost: b.relay.test", head)
