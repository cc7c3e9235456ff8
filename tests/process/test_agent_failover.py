"""
A device agent with two relays, all real processes on loopback: two
``twistd relay`` sharing one state directory (one on IPv4, one on IPv6)
and a ``twistd device-agent`` given both.  The relay the agent reports to
is killed with SIGKILL; the device is reachable through the other one
within the agent's detection bound, its tunnel going to the IPv6 relay.
"""

import http.client
import http.server
import os
import re
import threading
import time

from twisted.trial.unittest import SkipTest

from tests.process.test_daemons import ETC, DaemonTestCase
from tests.process.test_stun_interop import _ipv6_loopback

#: Short, to keep the test quick; the default (30 s) is checked on a clock
#: in tests.unit.test_agent_failover.
DEAD_AFTER = 6.0
#: After the detection: a period request and its answer, a notify A, then
#: the terminal's request, the connect request and the device's TLS tunnel.
MARGIN = 5.0
PAGE = b"hello from dev-1\n"


class Page(http.server.BaseHTTPRequestHandler):
    """The device's web server: one page."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


class AgentFailoverTests(DaemonTestCase):
    def web_server(self):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
            thread.join(10)
        self.addCleanup(stop)
        return server.server_address[1]

    def start_relay(self, state, udp, tunnel):
        relay = self.start("relay", "--config", os.path.join(ETC, "relay.toml"),
                           "--relay-state-dir", state, "--udp-listen", udp,
                           "--terminal-https", "", "--terminal-http",
                           "tcp:0:interface=127.0.0.1", "--tunnel-listen", tunnel)
        m = relay.wait_for(r"notifies on \[?([^\s\]]+)\]?:(\d+); terminals on http port (\d+)")
        return relay, (m.group(1), int(m.group(2))), int(m.group(3))

    def get(self, http_port):
        """GET / of dev-1 through the relay's terminal port: (status, body), or None."""
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        try:
            c.request("GET", "/", headers={"Host": "dev-1.relay.localhost"})
            r = c.getresponse()
            return r.status, r.read()
        except OSError:
            return None
        finally:
            c.close()

    def test_sigkilled_relay_device_reachable_through_the_other(self):
        if not _ipv6_loopback():
            raise SkipTest("no IPv6 loopback (::1) here")
        state, bundle = self.provision_device()
        web = self.web_server()
        relay4, udp4, http4 = self.start_relay(state, "127.0.0.1:0",
                                               "tcp:0:interface=127.0.0.1")
        relay6, udp6, http6 = self.start_relay(state, "[::1]:0", r"tcp6:0:interface=\:\:1")
        self.assertEqual(udp6[0], "::1")
        agent = self.start(
            "device-agent", "--config", os.path.join(bundle, "agent.toml"),
            "--agent-relay", f"127.0.0.1:{udp4[1]},[::1]:{udp6[1]}",
            "--udp-listen", "127.0.0.1:0,[::1]:0", "--agent-service", f"127.0.0.1:{web}",
            "--agent-dead-after", str(DEAD_AFTER))
        relay4.wait_for(r"device dev-1 online at 127\.0\.0\.1:\d+")
        self.assertEqual(self.get(http4), (200, PAGE))
        status = self.get(http6)
        self.assertNotEqual(status and status[0], 200, "dev-1 online at the second relay early")

        relay4.proc.kill()
        killed = time.monotonic()
        relay4.proc.wait(10)
        while True:
            answer = self.get(http6)
            took = time.monotonic() - killed
            if answer == (200, PAGE):
                break
            if took > DEAD_AFTER + MARGIN:
                self.fail(f"dev-1 not reachable through the second relay {took:.1f}s after"
                          f" SIGKILL (last answer {answer})")
            time.sleep(0.1)
        print(f"\ndev-1 reachable through the second relay {took:.2f}s after the first got"
              f" SIGKILL (agent.dead_after = {DEAD_AFTER:.0f}s)")
        agent.wait_for(re.escape(
            f"relay 127.0.0.1:{udp4[1]} did not answer for {DEAD_AFTER:.0f}s; device dev-1 now"
            f" reporting to relay [::1]:{udp6[1]}"))
        relay6.wait_for(r"device dev-1 online at \[::1\]:\d+")
        self.assertNotIn("Traceback", agent.output())
        self.assert_clean_stop(agent)
        self.assert_clean_stop(relay6)
