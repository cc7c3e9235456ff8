"""
A real browser through the relay: headless Chromium, driven by Selenium,
opens the demo device's web UI at ``https://demo.relay.localhost:PORT/``
(``p2pnat demo`` as a process: relay, agent and site, the whole UDP notify,
connect-request and TLS tunnel path) and checks what it rendered: the
stylesheet applied, the script ran, the image loaded, a form POST and its
303 redirect, a cookie set by the device and sent back; and the seed's flow
``https://relay.localhost:PORT/connect?ID=demo``.

The browser trusts the relay's certificate precisely, by the SHA-256 of
its public key (``--ignore-certificate-errors-spki-list``), not by ignoring
certificate errors.  Needs Debian's ``chromium`` and ``chromium-driver``
and the ``selenium`` package (the ``test`` extra); skipped without them,
except under CI (``CI`` set), where it fails instead.
"""

import base64
import hashlib
import importlib.util
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.process.test_demo import DemoProcess, needed, with_demo_output

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Seconds to wait for something to appear in the page.
WAIT = 20


def spki_sha256(cert_path):
    """Base64 SHA-256 of a PEM certificate's SubjectPublicKeyInfo, as Chromium wants it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def require_browser():
    """Skip (or fail, under CI) unless selenium, Chromium and chromedriver are here."""
    if importlib.util.find_spec("selenium") is None:
        needed("selenium", "pip install selenium (the project's test extra)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            needed(path, f"apt-get install {package}")


class BrowserTests(SynchronousTestCase):

    def setUp(self):
        require_browser()
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.demo = DemoProcess(self, os.path.join(self.tmp, "state"))
        self.urls = self.demo.wait_online()
        self.https_port = self.demo.port("https")
        self.driver = self.browser()

    def browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        spki = spki_sha256(os.path.join(self.demo.state_dir, "relay", "relay.crt"))
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-default-apps", "--disable-extensions",
                    "--disable-dev-shm-usage", "--window-size=1024,820",
                    f"--user-data-dir={os.path.join(self.tmp, 'chromium-profile')}",
                    # Loopback only: the relay's names go to 127.0.0.1, and every other
                    # name fails without a DNS query (even with the flags above, Chromium
                    # still calls Google's account, update, time and autofill services).
                    "--host-resolver-rules=MAP *.relay.localhost 127.0.0.1,"
                    " MAP relay.localhost 127.0.0.1, MAP * ~NOTFOUND",
                    "--disable-features=AutofillServerCommunication,OptimizationHints,"
                    "MediaRouter,Translate,NetworkTimeServiceQuerying",
                    "--disable-client-side-phishing-detection", "--disable-domain-reliability",
                    "--no-default-browser-check", "--no-pings",
                    f"--ignore-certificate-errors-spki-list={spki}"):
            options.add_argument(arg)
        # An explicit driver path: Selenium Manager (which downloads) is not used.
        service = Service(CHROMEDRIVER, log_output=os.path.join(self.tmp, "chromedriver.log"))
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except Exception as e:
            self.fail(f"cannot start Chromium through chromedriver: {e}" + self.demo.output())
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(WAIT)
        return driver

    def failure(self, what):
        """A failure message: what, where the browser is, and the demo's output."""
        try:
            where = f"{self.driver.current_url}: {self.driver.title!r}\n" \
                    + self.driver.find_element("tag name", "body").text[:2000]
        except Exception as e:
            where = f"(page unreadable: {e})"
        return f"{what}\nbrowser at {where}" + self.demo.output()

    def wait_text(self, element_id, text):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.driver, WAIT).until(
                lambda d: d.find_element("id", element_id).text == text)
        except TimeoutException:
            self.fail(self.failure(f"#{element_id} never read {text!r}"))

    def js(self, script):
        return self.driver.execute_script(script)

    @with_demo_output
    def test_device_ui_through_the_relay(self):
        """The device's page renders whole over HTTPS; form, redirect and cookie work."""
        url = self.urls["https"]
        host = url[len("https://"):-1]
        self.driver.get(url)
        self.wait_text("script-status", "script ran")
        self.assertEqual(self.driver.current_url, url)
        self.assertEqual(self.driver.find_element("id", "host").text, host)
        self.assertEqual(self.driver.find_element("id", "location").text, url[:-1])
        # The stylesheet applied: the banner's colour comes from /style.css only.
        self.assertEqual(
            self.js("return getComputedStyle(document.querySelector('.banner'))"
                    ".backgroundColor"), "rgb(20, 90, 160)", self.failure("no stylesheet"))
        # The image loaded and decoded.
        self.assertEqual(
            self.js("var i = document.getElementById('logo');"
                    " return i.complete ? i.naturalWidth : -1"), 64,
            self.failure("logo not loaded"))
        screenshot = os.path.join(self.tmp, "device-page.png")
        self.assertTrue(self.driver.save_screenshot(screenshot))

        # The form: POST /settings, 303 to /saved, the value and the cookie shown.
        name = "Küche & <lamp>"
        field = self.driver.find_element("id", "name-input")
        field.send_keys(name)
        self.driver.find_element("id", "save").click()
        self.wait_text("saved-name", name)
        self.assertEqual(self.driver.current_url, url + "saved")
        self.assertEqual(self.driver.find_element("id", "cookie").text, name,
                         self.failure("cookie not sent back"))
        cookie = self.driver.get_cookie("demo_name")
        self.assertIsNotNone(cookie, self.failure("no cookie stored"))
        self.assertEqual(cookie["domain"], "demo.relay.localhost")
        self.assertTrue(cookie["httpOnly"])
        self.driver.save_screenshot(os.path.join(self.tmp, "saved-page.png"))

        # Back to the device page by its absolute link: the cookie goes along.
        self.driver.find_element("id", "back").click()
        self.wait_text("current-name", name)
        self.assertEqual(self.driver.current_url, url)
        self.assertEqual(self.driver.find_element("id", "cookie").text, name)
        self.wait_text("script-status", "script ran")

    @with_demo_output
    def test_connect_flow_of_the_seed(self):
        """https://relay.localhost:PORT/connect?ID=demo redirects to the device's page."""
        self.driver.get(f"https://relay.localhost:{self.https_port}/connect?ID=demo")
        self.wait_text("script-status", "script ran")
        self.assertEqual(self.driver.current_url, self.urls["https"])
        self.assertEqual(self.driver.find_element("tag name", "h1").text, "Demo device")

    @with_demo_output
    def test_plain_http_terminal(self):
        """The http:// URL works too, cookie included."""
        url = self.urls["http"]
        self.driver.get(url)
        self.wait_text("script-status", "script ran")
        self.driver.find_element("id", "name-input").send_keys("over http")
        self.driver.find_element("id", "save").click()
        self.wait_text("saved-name", "over http")
        self.assertEqual(self.driver.find_element("id", "cookie").text, "over http")
        self.assertEqual(self.driver.current_url, url + "saved")
