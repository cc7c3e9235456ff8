"""
A real browser reaches an IPv6-only device behind a stateful firewall
through the relay, in the NAT lab: headless Chromium on an IPv6-only
public host opens ``https://cam.relay.test:8443/`` at the relay's public
IPv6 address, and the seed's flow ``https://relay.test:8443/connect?ID=cam``.
The device (behind a home router with an IPv6 /64 and a stateful firewall,
no IPv4 address at all) reaches the relay over IPv6 only: notifies, the
connect request, its TLS tunnel; its web server listens on [::1].

Chromium runs inside the browser host's namespace, driven by this module
run there as a program (``python -m tests.browser.test_ipv6_browser
drive ...``, which prints what the page showed as JSON), since chromedriver
and Chromium must share the namespace.  The browser trusts the relay's
certificate by the SHA-256 of its public key, and resolves only the relay's
names (to its IPv6 address).

Needs what :func:`tests.browser.test_browser.require_browser` and the NAT
lab need (root, ``ip``, ``nft``, ``conntrack``); skipped without them,
except under CI (``CI`` set), where it fails instead.
"""

import json
import os
import sys

from tests.support.lab import relay as F
from tests.support.lab.cases import LabTestCase
from tests.support.lab.ipv6 import DualStackRelayLab
from tests.support.lab.running import run_python

#: Seconds the page has to load in the browser.
WAIT = 20


class IPv6BrowserTests(LabTestCase):
    """
    One dual-stack relay lab: the relay (198.18.1.1, 2001:2::1:1), an
    IPv6-only device behind a firewalled home router, an IPv6-only browser
    host on the internet segment.
    """

    @classmethod
    def make_env(cls, workdir):
        return DualStackRelayLab.with_docroot(workdir)

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        router = lab.add_router("home", kind="cone", ipv6=True)
        cls.device_host = lab.add_host("cam", behind=router, ipv4=False)
        cls.browser = lab.add_host("browser", ipv4=False)
        rl.start_relay()
        rl.start_web6(cls.device_host)
        rl.add_ipv6_device("cam", cls.device_host)

    def setUp(self):
        from tests.browser.test_browser import require_browser

        require_browser()
        super().setUp()
        self.rl = self.env

    def drive(self, url):
        """Open ``url`` in Chromium on the browser host; what the page showed."""
        from tests.browser.test_browser import spki_sha256

        profile = os.path.join(self.rl.workdir, f"chromium-{self._testMethodName}")
        return run_python(self.browser, "tests.browser.test_ipv6_browser", "drive", url,
                          self.rl.relay_ip6, spki_sha256(os.path.join(self.rl.state, "relay.crt")),
                          profile, timeout=WAIT + 40)

    def test_device_page_over_ipv6(self):
        """The device's page, whole and decoded as UTF-8, at the relay's IPv6 address."""
        url = f"https://cam.{F.RELAY_HOSTNAME}:{F.HTTPS_PORT}/"
        page = self.drive(url)
        self.assertEqual(page["url"], url, page)
        self.assertEqual(page["title"], "p2pnat lab device", page)
        self.assertEqual(page["h1"], "Device page", page)
        self.assertIn("caf\u00e9 \u2603 \u00fc\u00df", page["text"], page)
        self.assertIn(f"device cam online at [{self.device_host.ip6}]:", self.rl.relay.stdout())

    def test_connect_flow_of_the_seed(self):
        """https://relay.test:8443/connect?ID=cam leads to the device's page."""
        page = self.drive(f"https://{F.RELAY_HOSTNAME}:{F.HTTPS_PORT}/connect?ID=cam")
        self.assertEqual(page["url"], f"https://cam.{F.RELAY_HOSTNAME}:{F.HTTPS_PORT}/", page)
        self.assertEqual(page["h1"], "Device page", page)


def drive(url, relay_ip6, spki, profile):
    """
    Open ``url`` in headless Chromium, the relay's names resolved to
    ``relay_ip6`` and its certificate pinned by ``spki``; return what the
    page showed: its URL, title, first heading and text.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.browser.test_browser import CHROMEDRIVER, CHROMIUM

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                "--disable-extensions", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                # The relay's names only, to its IPv6 address; every other name
                # fails without a DNS query.
                f"--host-resolver-rules=MAP *.{F.RELAY_HOSTNAME} [{relay_ip6}],"
                f" MAP {F.RELAY_HOSTNAME} [{relay_ip6}], MAP * ~NOTFOUND",
                "--disable-features=AutofillServerCommunication,OptimizationHints,"
                "MediaRouter,Translate,NetworkTimeServiceQuerying",
                "--no-default-browser-check", "--no-pings",
                f"--ignore-certificate-errors-spki-list={spki}"):
        options.add_argument(arg)
    service = Service(CHROMEDRIVER, log_output=os.path.join(profile + "-chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(url)
        WebDriverWait(driver, WAIT).until(lambda d: d.find_elements("tag name", "h1"))
        return {"url": driver.current_url, "title": driver.title,
                "h1": driver.find_element("tag name", "h1").text,
                "text": driver.find_element("tag name", "body").text}
    finally:
        driver.quit()


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "drive":
        sys.exit("usage: python -m tests.browser.test_ipv6_browser drive URL RELAY_IP6 SPKI"
                 " PROFILE_DIR")
    print(json.dumps(drive(*sys.argv[2:])), flush=True)
