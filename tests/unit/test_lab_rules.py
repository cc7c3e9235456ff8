"""
Tests for the pure parts of the NAT lab (:mod:`p2pnat.lab`): nftables
recipes, names, reaping decisions, the probe over loopback and the command
line.  They run anywhere, without root; the lab itself is tested in
L{tests.lab.test_lab}.
"""

import io
import json
import os
import subprocess
import tempfile
import threading
import time
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.lab import nft, probe, state
from p2pnat.lab.errors import LabConfigError
from p2pnat.lab.topology import Lab, hostport


class RulesetTests(SynchronousTestCase):
    """
    The nftables text of each router kind.
    """

    def firewall(self, text):
        # The home-router firewall, on input and on forward.
        for chain in ("input", "forward"):
            body = text.split(f"chain {chain} {{")[1].split("}")[0]
            self.assertIn('iifname "wan" ct state established,related accept', body)
            self.assertIn('iifname "wan" drop', body)

    def test_cone(self):
        text = nft.router_ruleset("cone", "198.18.2.1")
        self.firewall(text)
        self.assertIn('oifname "wan" masquerade\n', text)
        self.assertNotIn("random", text)
        self.assertNotIn("numgen", text)

    def test_symmetric_random(self):
        text = nft.router_ruleset("symmetric-random", "198.18.2.1")
        self.firewall(text)
        self.assertIn('oifname "wan" masquerade fully-random', text)

    def test_symmetric_sequential(self):
        """
        UDP goes through a numgen map from counter to port (never a plain
        numgen offset, which would give byte-swapped ports); TCP masquerades.
        """
        text = nft.router_ruleset("symmetric-sequential", "198.18.2.7", port_base=20000,
                                  port_count=2000)
        self.firewall(text)
        rule = [line for line in text.splitlines() if "numgen" in line]
        self.assertEqual(len(rule), 1)
        rule = rule[0]
        self.assertIn('oifname "wan" meta l4proto udp snat to 198.18.2.7 : numgen inc mod 2000 map {',
                      rule)
        self.assertNotIn("offset", rule)
        self.assertIn("{ 0 : 20000, 1 : 20001,", rule)
        self.assertIn(", 1999 : 21999 }", rule)
        self.assertEqual(rule.count(" : "), 2000 + 1)  # the elements and "WAN_IP : numgen"
        self.assertIn('oifname "wan" masquerade\n', text)

    def test_sequential_step(self):
        text = nft.router_ruleset("symmetric-sequential", "198.18.2.7", port_base=30000,
                                  port_count=10, port_step=3)
        self.assertIn("numgen inc mod 10 map { 0 : 30000, 1 : 30003, 2 : 30006,", text)
        self.assertIn("9 : 30027 }", text)

    def test_bad_port_plans(self):
        for base, count, step in [(1000, 10, 1), (65000, 1000, 1), (20000, 1, 1), (20000, 10, 0)]:
            self.assertRaises(LabConfigError, nft.check_port_plan, base, count, step)
        self.assertEqual(list(nft.check_port_plan(65530, 6, 1)), list(range(65530, 65536)))

    def test_unknown_kind(self):
        self.assertRaises(LabConfigError, nft.router_ruleset, "full-cone", "198.18.2.1")
        self.assertRaises(LabConfigError, nft.router_ruleset, "public", "198.18.2.1")

    def test_ipv6_firewall(self):
        """
        Forwarded IPv6: replies and LAN-to-WAN pass, the rest is dropped (the
        chain's policy); no NAT66; to the router itself from the WAN, only
        replies and neighbour discovery.
        """
        text = nft.ipv6_firewall_ruleset("wan", "lan")
        self.assertTrue(text.startswith("table ip6 p2pnat6 {\n"), text)
        forward = text.split("chain forward {")[1].split("}")[0].strip().splitlines()
        self.assertEqual([line.strip() for line in forward], [
            "type filter hook forward priority filter; policy drop;",
            "ct state established,related accept",
            'iifname "lan" oifname "wan" accept',
        ])
        inbound = text.split("chain input {")[1].split("}\n")[0]
        self.assertIn('iifname "wan" ct state established,related accept', inbound)
        self.assertIn('iifname "wan" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }'
                      ' accept', inbound)
        self.assertTrue(inbound.rstrip().endswith('iifname "wan" drop'), inbound)
        for nat in ("type nat", "masquerade", "snat", "dnat"):
            self.assertNotIn(nat, text)
        # Its own table: the IPv4 ruleset of every kind is left as it was.
        self.assertNotIn("ip6", nft.router_ruleset("cone", "198.18.2.1"))

    def test_loss(self):
        text = nft.loss_ruleset("p3", 2.5)
        self.assertIn("table bridge p2pnat_loss_p3 {", text)
        self.assertIn('iifname "p3" numgen random mod 10000 < 250 drop', text)
        self.assertIn('oifname "p3" numgen random mod 10000 < 250 drop', text)
        self.assertRaises(LabConfigError, nft.loss_ruleset, "p3", 0)
        self.assertRaises(LabConfigError, nft.loss_ruleset, "p3", 100)


class NamingTests(SynchronousTestCase):
    """
    Namespace names: short, unique per lab, recognisable as ours.
    """

    def test_names(self):
        self.assertEqual(state.ns_name(state.ephemeral_lab_id(1234, 2), "relay"), "p2l1234x2-relay")
        self.assertEqual(state.ns_name(state.named_lab_id("demo"), "a"), "p2l-demo-a")

    def test_owner_pid(self):
        self.assertEqual(state.ns_owner_pid("p2l1234x2-relay"), 1234)
        self.assertEqual(state.ns_owner_pid("p2l1234x2-r1-cgn"), 1234)
        for foreign in ("p2l-demo-a", "p2l1234-a", "blue", "xp2l12x1-a", "p2l12x-a"):
            self.assertIsNone(state.ns_owner_pid(foreign), foreign)

    def test_node_names(self):
        for good in ("a", "relay", "r1", "abcdefghijkl"):
            self.assertEqual(state.check_node_name(good), good)
        for bad in ("", "A", "1a", "a-b", "a b", "abcdefghijklm", None):
            self.assertRaises(LabConfigError, state.check_node_name, bad)

    def test_process_start_time(self):
        self.assertIsInstance(state.process_start_time(os.getpid()), int)
        self.assertTrue(state.owner_alive(os.getpid()))
        self.assertFalse(state.owner_alive(os.getpid(), state.process_start_time(os.getpid()) + 1))


class ReapTests(SynchronousTestCase):
    """
    What a new lab reaps: only namespaces of our family whose owner is dead.
    """

    def alive(self, pid, start=None):
        return pid in (100, 300)

    def test_stale_namespaces(self):
        namespaces = [
            "p2l100x1-a",  # owner alive
            "p2l200x1-a",  # owner dead, no state file
            "p2l200x1-inet",
            "p2l300x4-b",  # alive (claimed by a live state file too)
            "p2l400x1-a",  # listed by a dead state file
            "p2l-demo-a",  # named lab: never reaped
            "p2l500x1-a",  # dead owner, but its state says persistent
            "blue",  # not ours
            "p2l9999-a",  # not our pattern
        ]
        states = [
            {"lab_id": "300x4", "pid": 300, "namespaces": ["p2l300x4-b"]},
            # A dead lab whose state lists a foreign name: never touched.
            {"lab_id": "400x1", "pid": 400, "namespaces": ["p2l400x1-a", "p2l400x1-gone", "blue"]},
            {"lab_id": "500x1", "pid": 500, "persistent": True, "namespaces": ["p2l500x1-a"]},
        ]
        doomed, dead = state.stale_namespaces(namespaces, states, self.alive)
        self.assertEqual(sorted(doomed), ["p2l200x1-a", "p2l200x1-inet", "p2l400x1-a"])
        self.assertEqual(dead, ["400x1"])

    def test_state_files(self):
        d = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", d]))
        self.assertEqual(state.load_states(os.path.join(d, "missing")), [])
        s = {"lab_id": "12x1", "pid": 12, "namespaces": ["p2l12x1-a"]}
        state.write_state(d, s)
        self.assertEqual(state.read_state(d, "12x1"), s)
        with open(os.path.join(d, "junk.json"), "w") as f:
            f.write("{not json")
        self.assertEqual(state.load_states(d), [s])
        state.remove_state(d, "12x1")
        state.remove_state(d, "12x1")
        self.assertIsNone(state.read_state(d, "12x1"))


class ProbeTests(SynchronousTestCase):
    """
    The probe tool, over loopback.
    """

    def server(self, count=2, host="127.0.0.1"):
        stop = threading.Event()
        bound = []
        ready = threading.Event()

        def on_ready(addrs):
            bound.extend(addrs)
            ready.set()

        listen = [(host, 0)] * count
        t = threading.Thread(target=probe.serve, args=(listen, 30),
                             kwargs={"stop": stop, "ready": on_ready}, daemon=True)
        t.start()
        self.assertTrue(ready.wait(5))
        self.addCleanup(t.join, 5)
        self.addCleanup(stop.set)
        return [probe.parse_addr(a) for a in bound]

    def test_parse_ipv6(self):
        self.assertEqual(probe.parse_addr("[2001:2::1:1]:3478"), ("2001:2::1:1", 3478))
        self.assertRaises(ValueError, probe.parse_addr, "2001:2::1:1:3478")
        self.assertEqual(probe.parse_listen("[::1]:5-6"), [("::1", 5), ("::1", 6)])
        self.assertRaises(ValueError, probe.parse_listen, "[::1]5")
        self.assertEqual(probe.fmt(("2001:2::1", 9, 0, 0)), "[2001:2::1]:9")
        self.assertEqual(probe.fmt(("198.18.1.1", 9)), "198.18.1.1:9")
        self.assertEqual(hostport("2001:2::1", 9), "[2001:2::1]:9")
        self.assertEqual(hostport("198.18.1.1", 9), "198.18.1.1:9")

    def test_public_ip6(self):
        """A public IPv6 address mirrors the IPv4 one: 198.18.B.N is 2001:2::B:N."""
        self.assertEqual(str(Lab._public_ip6("198.18.1.1")), "2001:2::1:1")
        self.assertEqual(str(Lab._public_ip6("198.18.3.254")), "2001:2::3:fe")

    def test_query_ipv6(self):
        """Over the IPv6 loopback, the socket's family following the target's."""
        (a,) = self.server(1, "::1")
        (result,) = probe.query([(a, None)], timeout=2)
        self.assertTrue(result["local"].startswith("[::]:"), result)
        self.assertEqual(result["observed"], "[::1]:" + result["local"].rpartition(":")[2])
        self.assertEqual(result["answered_by"], probe.fmt(a))

    def test_parse(self):
        self.assertEqual(probe.parse_addr("198.18.1.1:3478"), ("198.18.1.1", 3478))
        self.assertEqual(probe.parse_addr(":9", "0.0.0.0"), ("0.0.0.0", 9))
        self.assertRaises(ValueError, probe.parse_addr, "3478")
        self.assertRaises(ValueError, probe.parse_addr, "1.2.3.4:70000")
        self.assertEqual(probe.parse_listen("10.0.0.1:5-7"),
                         [("10.0.0.1", 5), ("10.0.0.1", 6), ("10.0.0.1", 7)])
        self.assertEqual(probe.parse_listen("5"), [("0.0.0.0", 5)])
        self.assertRaises(ValueError, probe.parse_listen, "1:1-1000")

    def test_query_observes_source(self):
        a, b = self.server()
        results = probe.query([(a, None), (b, None)], bind="127.0.0.1", timeout=2)
        local = results[0]["local"]
        self.assertEqual([r["observed"] for r in results], [local, local])
        self.assertEqual(results[1]["answered_by"], probe.fmt(b))

    def test_reply_from(self):
        """
        A reply can come from another of the server's sockets, never from an
        address the server does not hold.
        """
        a, b = self.server()
        ok, foreign = probe.query([(a, probe.fmt(b)), (a, "127.0.0.2:1")], bind="127.0.0.1",
                                  timeout=0.3)
        self.assertEqual(ok["answered_by"], probe.fmt(b))
        self.assertIsNone(foreign["observed"])

    def test_no_amplification(self):
        """A request smaller than the reply gets no reply."""
        (a,) = self.server(1)
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.3)
        s.sendto(b'{"id": 1}', a)
        self.assertRaises(socket.timeout, s.recvfrom, 2048)
        s.sendto(probe._request(1), a)
        self.assertEqual(json.loads(s.recvfrom(2048)[0])["observed"], probe.fmt(s.getsockname()))

    def test_listen_times_out(self):
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            received = probe.listen(0, "127.0.0.1", timeout=0.01)
        self.assertEqual(received, [])
        self.assertIn('"ready": "127.0.0.1:', out.getvalue())

    def test_flows_bounded(self):
        start = time.monotonic()
        n = probe.flows(("127.0.0.1", 9), rate=100, duration=0.2, max_flows=1000)
        self.assertTrue(10 <= n <= 25, n)
        self.assertLess(time.monotonic() - start, 1)
        self.assertEqual(probe.flows(("127.0.0.1", 9), rate=1000, duration=5, max_flows=3), 3)


class CommandLineTests(SynchronousTestCase):
    """
    ``p2pnat lab``: options and one-line errors.
    """

    def main(self, *argv):
        from p2pnat.cli import main

        out, err = io.StringIO(), io.StringIO()
        with mock.patch("sys.stdout", out), mock.patch("sys.stderr", err):
            try:
                status = main(list(argv))
            except SystemExit as e:
                status = e.code
        return status, out.getvalue(), err.getvalue()

    def test_unknown_kind(self):
        status, _, err = self.main("lab", "up", "--name", "x", "--nat", "a=full-cone")
        self.assertEqual(status, 2)
        self.assertIn("unknown kind 'full-cone'", err)

    def test_not_root(self):
        with mock.patch("p2pnat.lab.topology.os.geteuid", return_value=1000):
            status, _, err = self.main("lab", "up", "--name", "x", "--nat", "a=cone")
        self.assertEqual(status, 2)
        self.assertEqual(err.strip().splitlines(), ["p2pnat lab: needs root (network namespaces and nftables)"])

    def test_nft_missing(self):
        with mock.patch("p2pnat.lab.topology.os.geteuid", return_value=0), \
                mock.patch("p2pnat.lab.topology._which", lambda tool: None if tool == "nft" else "/bin/" + tool):
            status, _, err = self.main("lab", "up", "--name", "x", "--nat", "a=cone")
        self.assertEqual(status, 2)
        self.assertIn("needs nft", err)
        self.assertEqual(len(err.strip().splitlines()), 1)

    def test_lab_without_command(self):
        status, out, _ = self.main("lab")
        self.assertEqual(status, 2)
        self.assertIn("up", out)


# -- the lab itself -----------------------------------------------------
