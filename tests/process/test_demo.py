"""
Tests for ``p2pnat demo`` (L{p2pnat.cli.demo}): the sample device site on its
own, and the command as a process, reached with curl through the URL it
prints, stopped with Ctrl-C.
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.cli import demo_site as site
from tests.support import procs

#: Seconds a demo gets to print its URLs (it makes keys on its first start).
START_TIMEOUT = 30.0


def needed(what, reason):
    """Skip for a missing tool, except under CI (CI=...), which must run everything."""
    from twisted.trial.unittest import SkipTest

    message = f"{what} is missing: {reason}"
    if os.environ.get("CI"):
        raise AssertionError(f"{message} (CI is set: this test must run here)")
    raise SkipTest(message)


def with_demo_output(test):
    """
    Decorate a test method so that any failure message ends with the
    output of the demo processes it started.
    """
    import functools

    @functools.wraps(test)
    def wrapper(self, *args, **kw):
        try:
            return test(self, *args, **kw)
        except self.failureException as e:
            text = str(e)
            if "--- p2pnat demo stdout ---" in text:
                raise
            outputs = "".join(demo.output() for demo in getattr(self, "demos", ()))
            raise self.failureException(text + outputs) from e

    return wrapper



def _default_sigint():
    """In the child before exec: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

class DemoProcess:
    """
    ``p2pnat demo`` as a child process of a test, run from the source
    tree, its output collected for failure messages.

    @ivar urls: after L{wait_online}: ``{"https": …, "http": …}``.
    """

    def __init__(self, testcase, state_dir, *args):
        self.testcase = testcase
        self.state_dir = state_dir
        argv = procs.p2pnat("demo", "--dir", state_dir, "--https-port", "0", "--http-port",
                            "0", "--udp-port", "0", "--tunnel-port", "0", *args)
        self.out, self.err = [], []
        self._changed = threading.Condition()
        self.started = time.monotonic()
        # SIGINT at its default action, whatever ours is: a suite started in
        # the background by a shell without job control (``scripts/test &``)
        # runs with SIGINT ignored, the demo would inherit that, and the
        # Ctrl-C tests would wait for an exit that never comes.
        self.proc = subprocess.Popen(argv, cwd=procs.REPO, env=procs.env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_default_sigint)
        self._readers = [threading.Thread(target=self._read, args=(f, lines), daemon=True)
                         for f, lines in ((self.proc.stdout, self.out),
                                          (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()
        testcase.addCleanup(self.kill)
        testcase.__dict__.setdefault("demos", []).append(self)
        self.urls = {}

    def _read(self, f, lines):
        for line in f:
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self):
        """Everything the demo printed so far, for a failure message."""
        with self._changed:
            out, err = "".join(self.out), "".join(self.err)
        return (f"\n--- p2pnat demo stdout ---\n{out}--- p2pnat demo stderr ---\n{err}"
                f"--- (exit status {self.proc.poll()}) ---")

    def wait_for(self, pattern, timeout=START_TIMEOUT):
        """The first match of C{pattern} in standard output, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                m = re.search(pattern, "".join(self.out), re.M)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None
                                 and not any(t.is_alive() for t in self._readers)):
                    break
                self._changed.wait(min(left, 0.5))
        self.testcase.fail(f"p2pnat demo printed no {pattern!r}" + self.output())

    def wait_online(self):
        """Wait for the URLs, which the demo prints once the device is online."""
        self.urls["https"] = self.wait_for(r"^\s*Open (https://\S+)$").group(1)
        self.urls["http"] = self.wait_for(r"^\s*or (http://\S+)$").group(1)
        self.online_after = time.monotonic() - self.started
        return self.urls

    def port(self, scheme):
        return int(re.match(r"\w+://[^/]+:(\d+)/", self.urls[scheme]).group(1))

    def interrupt(self, timeout=15):
        """Ctrl-C: SIGINT, and the exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Every thread's stack (the demo registers SIGUSR1 with
            # faulthandler), so that the failure says where it hangs.
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.testcase.fail(f"p2pnat demo did not stop within {timeout}s of SIGINT"
                               + self.output())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for t in self._readers:
            t.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


def curl(testcase, url, *args):
    """
    C{curl} on C{url} with its .localhost name pinned to 127.0.0.1 (newer
    curls do that themselves); returns (status line + headers, body).
    """
    if shutil.which("curl") is None:
        needed("curl", "apt-get install curl")
    m = re.match(r"\w+://([^/:]+):(\d+)/", url)
    argv = ["curl", "-sS", "--max-time", "15", "-D", "-",
            "--resolve", f"{m.group(1)}:{m.group(2)}:127.0.0.1", *args, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    testcase.assertEqual(done.returncode, 0, f"{argv}: {done.stderr}")
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    return head, body


class SiteTests(SynchronousTestCase):
    """The sample device UI, through treq's in-memory client."""

    def setUp(self):
        self.device = site.DeviceUI()
        self.treq = StubTreq(self.device.resource())

    def request(self, method, path, **kw):
        d = self.treq.request(method, "http://demo.relay.localhost:8080" + path,
                              allow_redirects=False, **kw)
        response = self.successResultOf(d)
        body = self.successResultOf(self.treq.content(response))
        return response, body.decode("utf-8")

    def test_page_links_are_absolute(self):
        """The page names its resources by absolute path, as device UIs do."""
        response, body = self.request("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"),
                         ["text/html; charset=utf-8"])
        for link in ("href='/style.css'", "src='/app.js'", "src='/logo.png'",
                     "action='/settings'"):
            self.assertIn(link, body)
        self.assertIn("<code id='host'>demo.relay.localhost:8080</code>", body)

    def test_assets(self):
        for path, kind, text in (("/style.css", "text/css", ".banner"),
                                 ("/app.js", "text/javascript", "script ran")):
            response, body = self.request("GET", path)
            self.assertEqual(response.code, 200)
            self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith(kind))
            self.assertIn(text, body)

    def test_caching(self):
        """Pages show the current setting: never stored; assets are revalidated."""
        for path, cache in (("/", "no-store"), ("/saved", "no-store"), ("/style.css", "no-cache"),
                            ("/app.js", "no-cache"), ("/logo.png", "no-cache")):
            response = self.successResultOf(self.treq.get("http://x" + path))
            self.assertEqual(response.headers.getRawHeaders("cache-control"), [cache], path)

    def test_logo_is_a_valid_png(self):
        """The logo decodes: signature, IHDR 64x64 RGBA, CRCs, pixel data size."""
        data = site.LOGO
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        pos, chunks = 8, []
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
            (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
            self.assertEqual(crc, zlib.crc32(kind + body), kind)
            chunks.append((kind, body))
            pos += 12 + length
        self.assertEqual([k for k, _ in chunks], [b"IHDR", b"IDAT", b"IEND"])
        self.assertEqual(struct.unpack(">IIBBBBB", chunks[0][1]), (64, 64, 8, 6, 0, 0, 0))
        self.assertEqual(len(zlib.decompress(chunks[1][1])), 64 * (1 + 64 * 4))
        response = self.successResultOf(self.treq.get("http://x/logo.png"))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["image/png"])
        self.assertEqual(self.successResultOf(self.treq.content(response)), data)

    def test_settings_post_redirect_cookie(self):
        """POST /settings: 303 to /saved and a cookie; /saved shows both, escaped."""
        name = "Küche & <lamp>"
        response, _ = self.request("POST", "/settings", data={"name": name})
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/saved"])
        (cookie,) = response.headers.getRawHeaders("set-cookie")
        self.assertTrue(cookie.startswith("demo_name=K%C3%BCche%20%26%20%3Clamp%3E;"), cookie)
        self.assertIn("Path=/", cookie)
        value = cookie.split(";")[0].split("=", 1)[1]
        _, body = self.request("GET", "/saved", headers={"Cookie": f"demo_name={value}"})
        self.assertIn("<strong id='saved-name'>Küche &amp; &lt;lamp&gt;</strong>", body)
        self.assertIn("<code id='cookie'>Küche &amp; &lt;lamp&gt;</code>", body)
        _, body = self.request("GET", "/")
        self.assertIn("<strong id='current-name'>Küche &amp; &lt;lamp&gt;</strong>", body)

    def test_settings_rejects_bad_names(self):
        for name in ("", "   ", "x" * (site.MAX_NAME + 1)):
            response, _ = self.request("POST", "/settings", data={"name": name})
            self.assertEqual(response.code, 400)
        self.assertEqual(self.device.name, "demo device")
        response, _ = self.request("GET", "/settings")
        self.assertEqual(response.code, 405)


class DemoCommandTests(SynchronousTestCase):
    """``p2pnat demo`` as a process, through the relay on loopback."""

    def setUp(self):
        self.state = os.path.abspath(self.mktemp())

    @with_demo_output
    def test_runs_serves_and_stops_on_ctrl_c(self):
        demo = DemoProcess(self, self.state)
        urls = demo.wait_online()
        self.assertRegex(urls["https"], r"^https://demo\.relay\.localhost:\d+/$")
        self.assertRegex(urls["http"], r"^http://demo\.relay\.localhost:\d+/$")
        out = "".join(demo.out)
        ca = os.path.join(self.state, "relay", "ca.crt")
        self.assertIn(ca, out)
        self.assertIn("Ctrl-C", out)

        head, body = curl(self, urls["http"])
        self.assertTrue(head.startswith("HTTP/1.1 200"), head + demo.output())
        self.assertIn("<h1>Demo device</h1>", body)
        self.assertIn(f"<code id='host'>{urls['http'][7:-1]}</code>", body)
        # The same page over HTTPS, the relay's certificate checked against the demo's CA.
        head, body = curl(self, urls["https"], "--cacert", ca)
        self.assertTrue(head.startswith("HTTP/1.1 200"), head + demo.output())
        self.assertIn("<h1>Demo device</h1>", body)

        # Keys and state: private files 0600, the device registered.
        for name in ("relay/ca.key", "relay/relay.key", "device/device.key", "device/mac.key"):
            mode = os.stat(os.path.join(self.state, name)).st_mode & 0o777
            self.assertEqual(mode, 0o600, name)
        self.assertEqual(demo.interrupt(), 0, demo.output())
        self.assertIn("Main loop terminated", "".join(demo.err), demo.output())

    @with_demo_output
    def test_reuses_its_state_directory(self):
        """A second run keeps the CA and the device's certificate."""
        first = DemoProcess(self, self.state)
        first.wait_online()
        self.assertEqual(first.interrupt(), 0, first.output())
        files = {name: open(os.path.join(self.state, name), "rb").read()
                 for name in ("relay/ca.crt", "relay/relay.crt", "device/device.crt",
                              "device/mac.key")}
        second = DemoProcess(self, self.state)
        urls = second.wait_online()
        self.assertNotIn("provisioning device", "".join(second.err), second.output())
        for name, data in files.items():
            self.assertEqual(open(os.path.join(self.state, name), "rb").read(), data, name)
        head, body = curl(self, urls["http"])
        self.assertTrue(head.startswith("HTTP/1.1 200"), head + second.output())
        self.assertEqual(second.interrupt(), 0, second.output())

    @with_demo_output
    def test_port_in_use_is_one_line(self):
        """A port taken by another program: one line, status 2, nothing left running."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        demo = DemoProcess(self, self.state, "--https-port", str(port))
        try:
            status = demo.proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("p2pnat demo kept running with its port taken" + demo.output())
        for t in demo._readers:
            t.join(5)
        self.assertEqual(status, 2, demo.output())
        self.assertEqual("".join(demo.out), "")
        last = demo.err[-1]
        self.assertIn(f"p2pnat demo: cannot listen on 127.0.0.1:{port}", last)
        self.assertNotIn("Traceback", "".join(demo.err))
