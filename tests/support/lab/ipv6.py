"""
The relay path's dual-stack NAT lab (``tests/lab/test_ipv6_lab.py``,
``tests/browser/test_ipv6_browser.py``).

:class:`DualStackRelayLab` is a :class:`~tests.support.lab.relay.RelayLab`
in a dual-stack lab: the relay's host has 198.18.1.1 and 2001:2::1:1, and
the relay listens on both (UDP notifies, device tunnels, HTTPS terminals).
Devices can be IPv6-only hosts behind a home router's stateful IPv6
firewall (:meth:`DualStackRelayLab.add_ipv6_device`); their agent then
reaches the relay at its IPv6 address only.
"""

import os
import sys

from p2pnat.lab.topology import hostport
from tests.support import procs
from tests.support.lab import relay as F


class DualStackRelayLab(F.RelayLab):
    """
    A :class:`~tests.support.lab.relay.RelayLab` whose relay listens on its
    host's IPv4 and IPv6 addresses; :attr:`relay_ip6` is the IPv6 one.
    """

    lab_options = {"ipv6": True}

    def setup(self):
        super().setup()
        self.relay_ip6 = self.relay_node.ip6

    def relay_argv(self):
        ip4, ip6 = self.relay_ip, self.relay_ip6

        def both(port):
            return f"{hostport(ip4, port)} {hostport(ip6, port)}"

        return procs.twistd(
            "relay", "--relay-state-dir", self.state, "--relay-hostname", F.RELAY_HOSTNAME,
            "--udp-listen", f"{hostport(ip4, F.UDP_PORT)},{hostport(ip6, F.UDP_PORT)}",
            "--tunnel-listen", both(F.TUNNEL_PORT), "--terminal-https", both(F.HTTPS_PORT),
            *self.relay_args)

    def start_web6(self, host, port=F.WEB_PORT, timeout=20):
        """Serve the docroot from ``host`` on [::1]:``port`` (IPv6 loopback only)."""
        proc = host.popen([sys.executable, "-m", "http.server", str(port), "--bind", "::1",
                           "--directory", self.docroot], env=procs.env())
        F.wait_for_log(proc, "Serving HTTP", timeout=timeout)
        return proc

    def add_ipv6_device(self, device_id, host, *, web_port=F.WEB_PORT, start=True):
        """
        Provision ``device_id`` for an IPv6-only ``host``: its agent knows the
        relay by its IPv6 address, sends notifies from an IPv6 socket, and
        forwards to a web server on [::1]:``web_port``.  With ``start``, run
        the agent and wait until the relay has its notify A.
        """
        bundle = os.path.join(self.workdir, f"dev-{device_id}")
        self.cli("device", "add", device_id, "--state-dir", self.state,
                 "--relay", hostport(self.relay_ip6, F.UDP_PORT),
                 "--service", hostport("::1", web_port), "--out", bundle)
        device = F.Device(device_id, host, bundle, web_port, 2.0, ["--udp-listen", "[::]:0"])
        self.devices[device_id] = device
        if start:
            self.start_agent(device)
        return device

    def curl_argv(self, device_id, path="/", out=None, max_time=30, extra=(), ip=None):
        """As :meth:`RelayLab.curl_argv`, to the relay's address ``ip`` (default: IPv6)."""
        out, argv = super().curl_argv(device_id, path, out, max_time, extra)
        name = f"{device_id}.{F.RELAY_HOSTNAME}:{F.HTTPS_PORT}"
        ip = ip or self.relay_ip6
        argv[argv.index(f"{name}:{self.relay_ip}")] = f"{name}:[{ip}]" if ":" in ip else f"{name}:{ip}"
        return out, argv

    def fetch(self, terminal, device_id, path="/", *, ip=None, max_time=30, extra=()):
        """As :meth:`RelayLab.fetch`, to the relay's address ``ip`` (default: IPv6)."""
        out, argv = self.curl_argv(device_id, path, max_time=max_time, extra=extra, ip=ip)
        done = terminal.run(argv, timeout=max_time + 15)
        return F.parse_curl(done.returncode, done.stdout, done.stderr, out, argv)
