"""
IPv6 in the NAT lab: the dual-stack lab itself (:class:`DualStackTests`)
and the relay path over IPv6 (:class:`RelayOverIPv6Tests`).

- :class:`DualStackTests`: hosts behind home routers with ``ipv6=True``
  have global addresses of their router's /64 and reach a public server
  with them as they are (no NAT66), an IPv6-only host included, and through
  a carrier-grade NAT, which only routes IPv6; the home router's stateful
  firewall drops an unsolicited datagram from the internet and lets a reply
  to an outbound one in; two hosts behind two such firewalls punch through
  to each other; IPv4 is NATed as in every lab; no node has a default
  route.
- :class:`RelayOverIPv6Tests`: a relay listening on both families; an
  IPv6-only device behind a stateful firewall, whose agent knows the relay
  by its IPv6 address only, sends its notifies over IPv6, gets the connect
  request over IPv6, opens its TLS tunnel over IPv6, and serves a web
  server on [::1]; terminals fetch its page with ``curl`` over IPv6, and
  over IPv4 from an IPv4-only terminal.

The tests need root, ``ip``, ``nft``, ``conntrack``, ``curl`` and ``ss``;
they skip otherwise, and fail instead when the environment variable ``CI``
is set.
"""

import ipaddress
import re

from p2pnat.lab.topology import LAB6, hostport
from tests.support.lab import relay as F
from tests.support.lab.cases import LabSetup, LabTestCase
from tests.support.lab.ipv6 import DualStackRelayLab
from tests.support.lab.running import finish_python


class DualStackSetup(LabSetup):
    lab_options = {"ipv6": True}


class DualStackTests(LabTestCase):
    """
    One dual-stack lab: a server, two home routers with IPv6 (a dual-stack
    host and an IPv6-only host behind the first, one host behind the
    second), a double NAT with IPv6 and an IPv4-only router.
    """

    @classmethod
    def make_env(cls, workdir):
        return DualStackSetup(workdir)

    @classmethod
    def build(cls, env):
        lab = env.lab
        cls.srv = lab.add_server("srv")
        cls.srv.start_probe_server((3478, 3479))
        cls.home = lab.add_router("home", kind="symmetric-random", ipv6=True)
        cls.a = lab.add_host("a", behind=cls.home)
        cls.six = lab.add_host("six", behind=cls.home, ipv4=False)
        cls.other = lab.add_router("other", kind="cone", ipv6=True)
        cls.b = lab.add_host("b", behind=cls.other)
        cls.double = lab.add_router("double", kind="double", ipv6=True)
        cls.d = lab.add_host("d", behind=cls.double)
        cls.old = lab.add_router("old", kind="cone")
        cls.v4 = lab.add_host("vfour", behind=cls.old)

    def query(self, host, *targets, **options):
        args = [f"--to={t}" for t in targets]
        args += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        return host.probe("query", *args)["results"]

    def test_addresses(self):
        """
        Hosts get global addresses on their router's own /64 (a CGN's home
        router too), inside 2001:2::/48; an IPv6-only host has no IPv4
        address; a router without IPv6 gives its hosts none.
        """
        for host, router in ((self.a, self.home), (self.six, self.home), (self.b, self.other),
                             (self.d, self.double)):
            self.assertIn(ipaddress.ip_address(host.ip6), router.lan6)
            self.assertTrue(router.lan6.subnet_of(LAB6))
        self.assertEqual(len({self.home.lan6, self.other.lan6, self.double.lan6,
                              self.double.outer.lan6}), 4)
        self.assertEqual(self.six.ips, [])
        self.assertIsNone(self.six.public_ip)
        done = self.six.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], check=True)
        self.assertEqual(done.stdout.strip(), "")
        self.assertIsNone(self.v4.ip6)
        self.assertIsNone(self.old.lan6)

    def test_no_default_route(self):
        """
        Nothing can leave the lab: no node has an IPv6 default route, and
        none on the internet segment has an IPv4 one (hosts' default routes
        end at their NAT).
        """
        for node in (self.srv, self.home, self.a, self.six, self.double, self.double.outer,
                     self.d):
            done = node.run(["ip", "-6", "route", "show", "default"], check=True)
            self.assertEqual(done.stdout.strip(), "", node.name)
        for node in (self.srv, self.home, self.double.outer):
            done = node.run(["ip", "-4", "route", "show", "default"], check=True)
            self.assertEqual(done.stdout.strip(), "", node.name)

    def test_reach_server_without_nat66(self):
        """
        Over IPv6 the server sees each host's own global address and source
        port: no NAT66, behind a random-port NAT, a cone NAT, and a
        carrier-grade NAT alike; over IPv4 the home router still NATs.
        """
        target = hostport(self.srv.ip6, 3478)
        for host in (self.a, self.six, self.b, self.d):
            (res,) = self.query(host, target, local_port=40000)
            self.assertEqual(res["observed"], hostport(host.ip6, 40000), host.name)
        (res,) = self.query(self.a, f"{self.srv.ip}:3478", local_port=40000)
        self.assertEqual(res["observed"].rpartition(":")[0], self.home.wan_ip)
        (res,) = self.query(self.v4, target, timeout=0.3)
        self.assertIsNone(res["observed"])  # no IPv6 behind an IPv4-only router

    def test_firewall(self):
        """
        An unsolicited datagram from the internet to a host's global address
        is dropped, and so is one to the router's own address; once the host
        has sent to the server, the server's datagrams from that address and
        port get in; the same host's other port stays closed.
        """
        listener = self.a.start_probe("listen", "--port=41000", "--bind=::", "--timeout=1.2",
                                      "--max=5")
        listener.wait_for_output('"ready"')
        for target in (self.a.ip6, self.home.wan_ip6):
            self.srv.probe("send", f"--to={hostport(target, 41000)}", "--local-port=5000",
                           "--count=3")
        self.assertEqual(finish_python(listener)["received"], [])
        # The server keeps sending; once the host has sent to it, its datagrams
        # are replies and pass.
        server = self.srv.start_probe("listen", "--port=5000",
                                      f"--punch={hostport(self.a.ip6, 41000)}", "--timeout=3",
                                      "--max=1")
        server.wait_for_output('"ready"')
        local = self.a.start_probe("listen", "--port=41000",
                                   f"--punch={hostport(self.srv.ip6, 5000)}", "--timeout=3",
                                   "--max=1")
        got_server, got_local = finish_python(server)["received"], finish_python(local)["received"]
        self.assertEqual([x["from"] for x in got_server], [hostport(self.a.ip6, 41000)])
        self.assertEqual([x["from"] for x in got_local], [hostport(self.srv.ip6, 5000)])
        # Another port of the same host is still closed to the server.
        (res,) = self.query(self.a, f"{hostport(self.srv.ip6, 3478)}/"
                                    f"{hostport(self.srv.ip6, 3479)}", timeout=0.3)
        self.assertIsNone(res["observed"])

    def test_punch_through_two_firewalls(self):
        """
        Two hosts behind two stateful IPv6 firewalls (one of them behind a
        random-port IPv4 NAT) reach each other directly once both have sent.
        """
        pa = self.a.start_probe("listen", "--port=42000", f"--punch={hostport(self.b.ip6, 42000)}",
                                "--timeout=3")
        pb = self.b.start_probe("listen", "--port=42000", f"--punch={hostport(self.a.ip6, 42000)}",
                                "--timeout=3")
        self.assertEqual([x["from"] for x in finish_python(pa)["received"]],
                         [hostport(self.b.ip6, 42000)])
        self.assertEqual([x["from"] for x in finish_python(pb)["received"]],
                         [hostport(self.a.ip6, 42000)])


class RelayOverIPv6Tests(LabTestCase):
    """
    A relay on both families; an IPv6-only device behind a home router's
    stateful IPv6 firewall (and an IPv4 random-port NAT it does not use);
    an IPv6-only terminal and an IPv4-only one, both public.
    """

    tools = ("curl", "ss")

    @classmethod
    def make_env(cls, workdir):
        return DualStackRelayLab.with_docroot(workdir, ("--log-level", "debug"))

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.router = lab.add_router("home", kind="symmetric-random", ipv6=True)
        cls.device_host = lab.add_host("cam", behind=cls.router, ipv4=False)
        cls.term6 = lab.add_host("tsix", ipv4=False)
        cls.term4 = lab.add_host("tfour")
        rl.start_relay()
        rl.start_web6(cls.device_host)
        cls.device = rl.add_ipv6_device("cam", cls.device_host)

    def setUp(self):
        super().setUp()
        self.rl = self.env

    def fetch_ok(self, terminal, ip=None):
        f = self.rl.fetch(terminal, "cam", ip=ip)
        self.assertEqual((f.exit, f.status), (0, 200), f.describe())
        self.assertEqual(f.body, F.INDEX)
        return f

    def test_notify_over_ipv6(self):
        """
        The relay knows the device by its global IPv6 address and port, as
        the device's notifies arrive (no NAT66), and said so in brackets.
        """
        addr = self.rl.wait_online("cam")
        m = re.fullmatch(r"\[([0-9a-f:]+)\]:(\d+)", addr)
        self.assertIsNotNone(m, addr)
        self.assertEqual(m.group(1), self.device_host.ip6)

    def test_get_over_ipv6(self):
        """
        An IPv6 terminal fetches the device's page: the relay's connect
        request crossed the firewall to the device over IPv6 (the mapping
        its notifies keep open), and the device's TLS tunnel came back to
        the relay's IPv6 address.
        """
        self.fetch_ok(self.term6)
        done = self.device_host.run(
            ["ss", "-Htn", "state", "established", f"( dport = :{F.TUNNEL_PORT} )"], check=True)
        self.assertIn(hostport(self.rl.relay_ip6, F.TUNNEL_PORT), done.stdout)
        log = self.rl.relay.stdout()
        self.assertIn("connect request for cam", log)

    def test_get_over_ipv4_terminal(self):
        """The same IPv6-only device, from an IPv4-only terminal: the relay bridges the families."""
        self.fetch_ok(self.term4, ip=self.rl.relay_ip)

    def test_device_not_reachable_directly(self):
        """
        The device is reachable only through its own outbound flows: a
        terminal's TCP connection straight to the device's global address
        times out (the firewall drops it; with no firewall the device would
        refuse it at once, as nothing listens there).
        """
        done = self.term6.run(["curl", "-sS", "--max-time", "2", "-o", "/dev/null",
                               f"http://[{self.device_host.ip6}]:{F.WEB_PORT}/"])
        self.assertEqual(done.returncode, 28, done.stderr)  # curl: operation timed out
