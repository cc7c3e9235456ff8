"""
The relay's admin page and ``p2pnat cluster status`` with real processes on
loopback: a single ``twistd relay`` (no [cluster]), and two nodes sharing a
redis-server of the test's own.  A device agent reports to the first
node; the admin page (HTTPS, the relay's certificate, checked against the
deployment's CA) signs in, shows the nodes and the device, revokes it, and
the device is refused afterwards.
"""

import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import time
from urllib.parse import urlencode

from tests.process.test_cluster import HOSTNAME, NOTIFY_B, PERIOD, http_get, start_device
from tests.process.test_daemons import ETC, LOOPBACK, DaemonTestCase
from tests.support.procs import REPO, env, p2pnat, provision
from tests.support.redis import RedisServer, require_redis

PASSWORD = "admin password for tests"
TIMEOUT = 20.0


class AdminClient:
    """The admin page over HTTPS, the relay's certificate checked against the CA."""

    def __init__(self, port, ca):
        self.port = port
        self.context = ssl.create_default_context(cafile=ca)
        self.cookie = None
        self.origin = f"https://{HOSTNAME}:{port}"

    def request(self, method, path, form=None, origin=True):
        context, port = self.context, self.port

        class Connection(http.client.HTTPSConnection):
            def connect(self):
                sock = socket.create_connection((LOOPBACK, port), timeout=10)
                self.sock = context.wrap_socket(sock, server_hostname=HOSTNAME)

        conn = Connection(HOSTNAME, port, timeout=10)
        headers = {"Host": f"{HOSTNAME}:{port}"}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if origin and method == "POST":
            headers["Origin"] = self.origin
        if self.cookie:
            headers["Cookie"] = self.cookie
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        cookie = response.getheader("set-cookie")
        if cookie:
            self.cookie = cookie.split(";")[0]
        return response, data

    def sign_in(self, testcase):
        response, _ = self.request("POST", "/login", {"password": PASSWORD})
        testcase.assertEqual(response.status, 303)
        testcase.assertEqual(response.getheader("location"), "/")
        testcase.assertIn("__Host-p2pnat_admin=", self.cookie)

    def revoke(self, testcase, device_id):
        response, page = self.request("GET", f"/revoke?device={device_id}")
        testcase.assertEqual(response.status, 200)
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        response, _ = self.request("POST", "/revoke", {"device": device_id, "csrf": csrf})
        testcase.assertEqual(response.status, 303)


class AdminTestCase(DaemonTestCase):
    def setUp(self):
        super().setUp()
        self.state = os.path.join(self.tmpdir(), "node1")
        provision("relay", "init", "--state-dir", self.state, "--hostname", HOSTNAME)
        tmp = self.tmpdir()
        given = os.path.join(tmp, "password")
        with open(given, "w") as f:
            f.write(PASSWORD)
        self.credential = os.path.join(tmp, "admin.credential")
        provision("cluster", "admin-password", "--out", self.credential,
                  "--password-file", given)
        self.nodes = {}

    def node(self, name, redis=None, admin=False):
        state = self.state if not self.nodes else os.path.join(self.tmpdir(), name)
        if state != self.state:
            import shutil

            shutil.copytree(self.state, state, dirs_exist_ok=True)
        args = ["--config", os.path.join(ETC, "relay.toml"), "--relay-state-dir", state,
                "--relay-hostname", HOSTNAME, "--udp-listen", f"{LOOPBACK}:0",
                "--terminal-https", "", "--terminal-http", f"tcp:0:interface={LOOPBACK}",
                "--tunnel-listen", f"tcp:0:interface={LOOPBACK}",
                "--relay-access-check-period", str(PERIOD),
                "--relay-notify-b-interval", str(NOTIFY_B), "--relay-sync-interval", "0.2",
                "--cluster-node", name]
        if redis is not None:
            args += ["--cluster-redis", redis.url]
        if admin:
            args += ["--admin-listen", f"tcp:0:interface={LOOPBACK}",
                     "--admin-credential-file", self.credential]
        relay = self.start("relay", *args)
        m = relay.wait_for(r"notifies on 127\.0\.0\.1:(\d+); terminals on http port (\d+);")
        info = {"daemon": relay, "state": state, "udp": int(m.group(1)),
                "http": int(m.group(2))}
        if admin:
            info["admin"] = int(relay.wait_for(r"admin page on 127\.0\.0\.1:(\d+)").group(1))
        if redis is not None:
            relay.wait_for(r"connected to redis")
        self.nodes[name] = info
        return info

    def device(self, device_id, node):
        start_device(self, device_id, node, TIMEOUT)

    def admin(self, node):
        return AdminClient(node["admin"], os.path.join(self.state, "ca.crt"))

    def status(self, *args):
        """``p2pnat cluster status ARGS`` as a process: (exit status, stdout, stderr)."""
        proc = subprocess.run(p2pnat("cluster", "status", *args), cwd=REPO, env=env(),
                              capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr

    def until(self, check, what, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.fail(f"never: {what}")
            time.sleep(0.1)

    def assert_refused(self, node, device_id):
        """Terminals through C{node} get 403 for the device within a few seconds."""
        self.until(lambda: http_get(node["http"], device_id)[0] == 403,
                   f"{device_id} refused through port {node['http']}", timeout=5)

    def assert_no_password_in_logs(self):
        for d in self.daemons:
            self.assertNotIn(PASSWORD, d.output())


class SingleNodeTests(AdminTestCase):
    def test_page_status_and_revoke(self):
        n1 = self.node("solo", admin=True)
        self.device("cam", n1)
        self.assertEqual(http_get(n1["http"], "cam")[0], 200)
        admin = self.admin(n1)
        response, _ = admin.request("GET", "/")
        self.assertEqual((response.status, response.getheader("location")), (303, "/login"))
        self.assertIn("default-src 'none'", response.getheader("content-security-policy"))
        response, _ = admin.request("POST", "/login", {"password": "not the password"})
        self.assertEqual(response.status, 401)
        admin.sign_in(self)
        response, page = admin.request("GET", "/")
        self.assertEqual(response.status, 200)
        self.assertIn("single node", page)
        row = re.search(r'<tr data-device="cam">(.*?)</tr>', page).group(1)
        self.assertIn('class="online"', row)
        self.assertRegex(row, r"127\.0\.0\.1:\d+")
        self.assertIn('data-node="solo"', page)

        # The status command reads the state directory (its stats file is
        # written every few seconds).
        config = os.path.join(self.tmpdir(), "relay.toml")
        with open(config, "w") as f:
            f.write(f'[relay]\nstate_dir = "{n1["state"]}"\naccess_check_period = {PERIOD}\n')
        self.until(lambda: "node solo: alive" in self.status("--config", config)[1],
                   "status sees the node alive")
        code, out, err = self.status("--config", config, "--devices")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("single node (no [cluster])", out)
        self.assertRegex(out, r"\n  cam +127\.0\.0\.1:\d+ +last access")

        # A forged revoke (no CSRF token) does nothing; the page's own does.
        response, _ = admin.request("POST", "/revoke", {"device": "cam"})
        self.assertEqual(response.status, 403)
        self.assertEqual(http_get(n1["http"], "cam")[0], 200)
        admin.revoke(self, "cam")
        self.assert_refused(n1, "cam")
        response, page = admin.request("GET", "/?revoked=cam")
        self.assertIn('<td class="revoked">revoked</td>', page)
        self.assert_no_password_in_logs()


class ClusterAdminTests(AdminTestCase):
    def setUp(self):
        require_redis()
        super().setUp()
        self.redis = RedisServer(self)

    def test_two_nodes(self):
        n1 = self.node("n1", self.redis)
        n2 = self.node("n2", self.redis, admin=True)
        self.device("cam", n1)
        self.until(lambda: http_get(n2["http"], "cam")[0] == 200, "cam reachable through n2")

        # The status command: both nodes alive, cam owned by n1, the nodes' records.
        def both_reporting():
            code, out, _ = self.status("--redis", self.redis.url, "--json")
            s = json.loads(out) if code == 0 else {}
            return s.get("nodes_alive") == 2 and all(n["stats"] for n in s["nodes"])

        self.until(both_reporting, "status shows two nodes with stats")
        code, out, err = self.status("--redis", self.redis.url, "--json", "--devices")
        self.assertEqual((code, err), (0, ""))
        s = json.loads(out)
        by_name = {n["name"]: n for n in s["nodes"]}
        self.assertEqual([d["id"] for d in by_name["n1"]["device_list"]], ["cam"])
        self.assertEqual(by_name["n2"]["devices"], 0)
        self.assertGreater(by_name["n2"]["stats"]["bytes_from_devices"], 0,
                           "n2 carried cam's page through a tunnel")
        self.assertGreaterEqual(int(s["redis"]["version"].split(".")[0]), 7)
        self.assertEqual(s["lobby_nodes"], [])
        code, out, _ = self.status("--redis", self.redis.url)
        self.assertIn("lobby: no lobby nodes", out)

        # n2's admin page shows both nodes and the device n1 owns.
        admin = self.admin(n2)
        admin.sign_in(self)
        response, page = admin.request("GET", "/")
        self.assertEqual(response.status, 200)
        self.assertIn('data-node="n1"', page)
        self.assertIn('data-node="n2"', page)
        row = re.search(r'<tr data-device="cam">(.*?)</tr>', page).group(1)
        self.assertIn("<td>n1</td>", row)
        self.assertIn('class="online"', row)

        # Revoked on n2's page (cam is in n1's SQLite only): refused on both nodes.
        admin.revoke(self, "cam")
        self.assert_refused(n2, "cam")
        self.assert_refused(n1, "cam")
        self.assert_no_password_in_logs()

        # Redis gone: the page says so and still shows this node; the status
        # command fails with one line.
        self.redis.kill()
        n2["daemon"].wait_for(r"lost redis")
        response, page = admin.request("GET", "/")
        self.assertEqual(response.status, 200)
        self.assertIn('id="problem"', page)
        code, out, err = self.status("--redis", self.redis.url)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn(f"cannot read redis redis://127.0.0.1:{self.redis.port}/0", err)
