"""
The relay's admin page in headless Chromium: a single ``twistd relay`` with
its admin page on loopback and a device agent reporting to it.  The
browser signs in, sees the node and the device (online, its NAT address),
revokes it through the confirmation page, and the device is refused
afterwards.  A screenshot of the page before the revoke is saved in the
test's temporary directory (``admin-page.png``).

The browser trusts the relay's certificate by the SHA-256 of its public
key, as tests.browser.test_browser does.  The page's Content-Security-Policy
forbids scripts, so the test clicks and types as a person would.
"""

import os

from tests.browser.test_browser import (
    CHROMEDRIVER,
    CHROMIUM,
    WAIT,
    require_browser,
    spki_sha256,
)
from tests.process.test_admin import PASSWORD, AdminTestCase
from tests.process.test_cluster import HOSTNAME, http_get


class AdminPageTests(AdminTestCase):
    def setUp(self):
        require_browser()
        super().setUp()
        self.tmp = self.tmpdir()
        self.relay = self.node("solo", admin=True)
        self.device("cam", self.relay)
        self.device("printer", self.relay)
        self.driver = self.browser()
        self.base = f"https://{HOSTNAME}:{self.relay['admin']}"

    def browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        spki = spki_sha256(os.path.join(self.state, "relay.crt"))
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
                    "--window-size=1200,760",
                    f"--user-data-dir={os.path.join(self.tmp, 'chromium-profile')}",
                    # Loopback only: the relay's name goes to 127.0.0.1, every other name
                    # fails without a DNS query.
                    f"--host-resolver-rules=MAP {HOSTNAME} 127.0.0.1, MAP * ~NOTFOUND",
                    f"--ignore-certificate-errors-spki-list={spki}"):
            options.add_argument(arg)
        service = Service(CHROMEDRIVER, log_output=os.path.join(self.tmp, "chromedriver.log"))
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except Exception as e:
            self.fail(f"cannot start Chromium through chromedriver: {e}")
        self.addCleanup(driver.quit)
        driver.set_page_load_timeout(WAIT)
        return driver

    def find(self, css):
        return self.driver.find_element("css selector", css)

    def wait_for(self, css):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, WAIT).until(lambda d: self.find(css))
        except TimeoutException:
            self.fail(f"{css} never appeared; browser at {self.driver.current_url}:"
                      f" {self.driver.find_element('tag name', 'body').text[:1000]}")

    def test_sign_in_see_and_revoke(self):
        self.driver.get(self.base + "/")
        self.assertEqual(self.driver.current_url, self.base + "/login")
        self.wait_for("#password").send_keys(PASSWORD)
        self.find("#sign-in").click()
        self.wait_for("#devices")
        self.assertEqual(self.driver.current_url, self.base + "/")
        # The stylesheet applied (CSP allows the page's own file, nothing else).
        header = self.driver.execute_script(
            "return getComputedStyle(document.querySelector('th')).backgroundColor")
        self.assertEqual(header, "rgb(238, 241, 246)")
        cookies = {c["name"]: c for c in self.driver.get_cookies()}
        cookie = cookies["__Host-p2pnat_admin"]
        self.assertEqual((cookie["secure"], cookie["httpOnly"], cookie["sameSite"]),
                         (True, True, "Strict"))
        self.assertEqual(self.find("#this-node").text, "solo")
        self.assertIn("solo (this node)", self.find('tr[data-node="solo"]').text)
        for device_id in ("cam", "printer"):
            row = self.find(f'tr[data-device="{device_id}"]')
            self.assertIn("online", row.text)
            self.assertRegex(row.text, r"127\.0\.0\.1:\d+")
        self.driver.save_screenshot(os.path.join(self.tmp, "admin-page.png"))

        self.find('tr[data-device="cam"] a').click()
        self.wait_for("#confirm").click()
        self.wait_for("#notice")
        self.assertEqual(self.find("#notice").text, "Device cam revoked.")
        cells = [td.text for td in self.find('tr[data-device="cam"]').find_elements(
            "tag name", "td")]
        self.assertEqual((cells[1], cells[2], cells[3]), ("revoked", "\u2014", "\u2014"),
                         "a revoked device is live on no node")
        self.assertIn("online", self.find('tr[data-device="printer"]').text)
        self.driver.save_screenshot(os.path.join(self.tmp, "admin-page-revoked.png"))
        self.assert_refused(self.relay, "cam")
        self.assertEqual(http_get(self.relay["http"], "printer")[0], 200)

        # Signed out: the page asks for the password again.
        self.find("#sign-out").click()
        self.wait_for("#password")
        self.driver.get(self.base + "/")
        self.assertEqual(self.driver.current_url, self.base + "/login")
