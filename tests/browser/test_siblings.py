"""
Issue #9 in a real browser: every device's pages share one site
(``*.relay.localhost``), so a page of one device could use another
device's relay login.  Headless Chromium, driven by Selenium, against a
relay with two devices (L{tests.browser.siblings}, run as a process):
``attacker`` (its own web UI) and ``victim`` (the relay keeps its login).

- The victim's user signs in with the relay's login form; the attacker's
  page then auto-posts a form to the victim's device: the request carries
  the victim's cookie and ``Sec-Fetch-Site: same-site``, and the relay
  refuses it (403) without forwarding it.
- The attacker's page tosses cookies named like the relay's login for the
  whole relay domain: the victim's user still gets in.

Needs what L{tests.browser.test_browser} needs (skipped without it, except
under CI).
"""

import os
import re
import subprocess
import sys
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

# The module, not its test class: trial would run BrowserTests here too.
from tests.browser import test_browser
from tests.browser.test_browser import WAIT
from tests.support import procs

CREDENTIAL = "correct horse battery staple"
#: Seconds for the relay and both devices to come up.
START_TIMEOUT = 30.0


class SiblingsProcess:
    """L{tests.browser.siblings} as a child process; C{port} once ready."""

    def __init__(self, testcase, state_dir):
        self.state_dir = state_dir
        os.makedirs(state_dir)
        self.log = os.path.join(state_dir, "victim.log")
        self.stderr = open(os.path.join(state_dir, "stderr"), "w+")
        testcase.addCleanup(self.stderr.close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.browser.siblings", state_dir, CREDENTIAL],
            cwd=procs.REPO, env=procs.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True)
        testcase.addCleanup(self.kill)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not any(line.startswith("ready ") for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                testcase.fail("the relay and its two devices did not start" + self.output())
            time.sleep(0.05)
        self.port = int(re.search(r"ready (\d+)", "".join(self.lines)).group(1))

    def output(self):
        self.stderr.flush()
        self.stderr.seek(0)
        return f"\n--- siblings stderr ---\n{self.stderr.read()[-6000:]}"

    def victim_posts(self):
        """The POSTs the victim's device got (its log, the browser's favicon fetches left out)."""
        try:
            with open(self.log) as f:
                return [line for line in f.read().splitlines() if line.startswith("POST ")]
        except FileNotFoundError:
            return []

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(5)
        self.proc.stdout.close()


class SiblingDeviceTests(SynchronousTestCase):

    def setUp(self):
        test_browser.require_browser()
        self.tmp = os.path.abspath(self.mktemp())
        # BrowserTests.browser reads the relay's certificate from
        # demo.state_dir/relay and the demo's output() for failures.
        self.demo = SiblingsProcess(self, os.path.join(self.tmp, "state"))
        self.driver = test_browser.BrowserTests.browser(self)
        self.victim = f"https://victim.relay.localhost:{self.demo.port}"
        self.attacker = f"https://attacker.relay.localhost:{self.demo.port}"

    failure = test_browser.BrowserTests.failure

    def wait_title(self, title):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.driver, WAIT).until(lambda d: d.title == title)
        except TimeoutException:
            self.fail(self.failure(f"the page title never read {title!r}"))

    def sign_in(self, path):
        """Open the victim's C{path}: the relay's login form; sign in; the device's page."""
        self.driver.get(self.victim + path)
        self.wait_title("victim")  # the relay names the login page after the device
        self.driver.find_element("name", "credential").send_keys(CREDENTIAL)
        self.driver.find_element("tag name", "button").click()
        self.wait_title("victim device")
        self.assertEqual(self.driver.find_element("id", "seen").text, f"GET {path}",
                         self.failure("not signed in"))

    def test_cross_site_post_refused(self):
        """The attacker's page posts to the victim's device: refused, not forwarded."""
        self.sign_in("/")
        # The victim's own page may post (same origin).
        self.driver.find_element("id", "save").click()
        self.wait_title("victim device")
        self.assertEqual(self.driver.find_element("id", "seen").text, "POST /settings")
        self.assertEqual(self.demo.victim_posts(), ["POST /settings"])

        self.driver.get(self.attacker + "/post")
        self.wait_title("Cross-site request refused")
        self.assertEqual(self.driver.current_url, self.victim + "/settings")
        self.assertEqual(self.demo.victim_posts(), ["POST /settings"],
                         self.failure("the cross-site POST reached the device"))
        # The login cookie the refused request carried: host-only, Secure, HttpOnly.
        self.driver.get(self.victim + "/")
        cookie = self.driver.get_cookie("__Host-p2pnat_auth")
        self.assertIsNotNone(cookie, self.failure("no login cookie"))
        self.assertEqual((cookie["domain"], cookie["secure"], cookie["httpOnly"]),
                         ("victim.relay.localhost", True, True))

    def test_tossed_cookies_do_not_lock_out(self):
        """Cookies tossed for the relay domain do not keep the victim's user out."""
        self.sign_in("/")
        self.driver.get(self.attacker + "/toss")
        self.wait_title("tossed")
        self.driver.get(self.victim + "/home")
        self.wait_title("victim device")
        self.assertEqual(self.driver.find_element("id", "seen").text, "GET /home",
                         self.failure("locked out by tossed cookies"))
        # The browser did keep what the attacker could set (so this tested something).
        tossed = [c for c in self.driver.get_cookies() if c["domain"] == ".relay.localhost"]
        self.assertTrue(tossed, self.failure("no cookie was tossed"))
