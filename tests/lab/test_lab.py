"""
Tests for the NAT lab (:mod:`p2pnat.lab`).

The pure parts (nftables recipes, names, reaping decisions, the probe over
loopback, the command line) run anywhere.  The lab tests build real
namespaces with the kernel's NAT and need root, ``ip``, ``nft`` and
``conntrack``; they skip with the reason otherwise (and fail when the
environment variable ``CI`` is set).  Each lab test checks a
behaviour that a wrong recipe would break.
"""

import io
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.lab import nft, probe, state
from p2pnat.lab.errors import LabConfigError, LabError, LabUnavailable
from p2pnat.lab.topology import netns_list
from tests.support.lab import cases
from tests.support.lab.running import finish_python

# -- pure parts ---------------------------------------------------------


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

    def server(self, count=2):
        stop = threading.Event()
        bound = []
        ready = threading.Event()

        def on_ready(addrs):
            bound.extend(addrs)
            ready.set()

        listen = [("127.0.0.1", 0)] * count
        t = threading.Thread(target=probe.serve, args=(listen, 30),
                             kwargs={"stop": stop, "ready": on_ready}, daemon=True)
        t.start()
        self.assertTrue(ready.wait(5))
        self.addCleanup(t.join, 5)
        self.addCleanup(stop.set)
        return [probe.parse_addr(a) for a in bound]

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

SERVER_PORTS = range(3478, 3486)


def port(addr):
    return int(addr.rpartition(":")[2])


def ip(addr):
    return addr.rpartition(":")[0]


class LabTestCase(cases.LabTestCase):
    """
    Base for tests that build a lab: one per test (tests reuse node names,
    and one closes its lab), torn down in cleanup, and its report
    (topology, processes' output) added to a failure's message.
    """

    lab_per_test = True

    def server(self, addresses=1, ports=SERVER_PORTS):
        srv = self.lab.add_server("srv", addresses=addresses)
        srv.start_probe_server(ports)
        return srv

    def query(self, host, *targets, **options):
        """Run probe query in ``host``; return the results."""
        args = [f"--to={t}" for t in targets]
        args += [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if v is not True]
        args += [f"--{k.replace('_', '-')}" for k, v in options.items() if v is True]
        return host.probe("query", *args)["results"]


class ConeTests(LabTestCase):
    def test_port_preserved_and_filtered(self):
        """
        A cone router keeps the source port, maps it the same way for every
        destination, and lets in only what comes from an address and port the
        host has sent to.
        """
        srv = self.server(addresses=2, ports=(3478, 3479))
        r = self.lab.add_router("r", kind="cone")
        h = self.lab.add_host("h", behind=r)
        a1, a2 = srv.ips
        res = self.query(
            h,
            f"{a1}:3478",
            f"{a1}:3478/{a1}:3479",  # other port: filtered
            f"{a1}:3478/{a2}:3478",  # other address: filtered
            f"{a1}:3479",  # now the host has sent to a1:3479...
            f"{a1}:3478/{a1}:3479",  # ...so it gets in
            f"{a2}:3478",
            f"{a1}:3478/{a2}:3478",
            local_port=40000,
            timeout=0.5,
        )
        observed = [x["observed"] for x in res]
        mapped = f"{r.wan_ip}:40000"
        self.assertEqual(observed, [mapped, None, None, mapped, mapped, mapped, mapped])
        self.assertEqual(res[4]["answered_by"], f"{a1}:3479")
        self.assertEqual(res[6]["answered_by"], f"{a2}:3478")


class SequentialTests(LabTestCase):
    def test_step_per_new_flow(self):
        """
        Each new UDP flow takes the next port of the plan: from one socket to
        different destinations, and from new sockets.
        """
        srv = self.server()
        r1 = self.lab.add_router("r1", kind="symmetric-sequential")
        r2 = self.lab.add_router("r2", kind="symmetric-sequential", port_base=30000,
                                 port_count=100, port_step=3)
        h1 = self.lab.add_host("h1", behind=r1)
        h2 = self.lab.add_host("h2", behind=r2)
        targets = [f"{srv.ip}:{p}" for p in SERVER_PORTS]
        for host, router, base, step in ((h1, r1, 20000, 1), (h2, r2, 30000, 3)):
            same = [x["observed"] for x in self.query(host, *targets, local_port=40000)]
            new = [x["observed"] for x in self.query(host, *targets[:4], new_socket=True)]
            ports = [port(a) for a in same + new]
            self.assertEqual({ip(a) for a in same + new}, {router.wan_ip})
            self.assertEqual(ports, list(range(base, base + 12 * step, step)))

    def test_background_consumes_ports(self):
        """
        A background host opening new flows makes the next port jump.
        """
        srv = self.server()
        r = self.lab.add_router("r", kind="symmetric-sequential")
        h = self.lab.add_host("h", behind=r)
        (first,) = self.query(h, f"{srv.ip}:3478")
        bg = self.lab.add_background("bg", behind=r, target=srv, rate=20)
        time.sleep(1.0)
        (second,) = self.query(h, f"{srv.ip}:3479")
        self.assertIsNone(bg.process.poll(), bg.process.describe())
        jump = port(second["observed"]) - port(first["observed"])
        # About 20 flows in 1 s at 20/s, less the background's start-up;
        # without background the jump would be 1.
        self.assertGreaterEqual(jump, 5)
        self.assertLessEqual(jump, 60)
        self.lab.close()
        self.assertIsNotNone(bg.process.poll())


class RandomTests(LabTestCase):
    def test_unpredictable(self):
        """
        A fully-random router neither keeps the port nor counts up: from one
        socket, eight destinations give eight scattered ports.
        """
        srv = self.server()
        r = self.lab.add_router("r", kind="symmetric-random")
        h = self.lab.add_host("h", behind=r)
        res = self.query(h, *[f"{srv.ip}:{p}" for p in SERVER_PORTS], local_port=40000)
        ports = [port(x["observed"]) for x in res]
        self.assertEqual({ip(x["observed"]) for x in res}, {r.wan_ip})
        diffs = {b - a for a, b in zip(ports, ports[1:])}
        self.assertNotEqual(diffs, {1}, ports)  # not sequential
        self.assertGreater(len(diffs), 2, ports)  # no fixed step either
        self.assertLessEqual(ports.count(40000), 1, ports)  # not preserving
        self.assertGreaterEqual(len(set(ports)), 6, ports)  # not one mapping


class DoubleNatTests(LabTestCase):
    def test_reaches_server_through_two_nats(self):
        """
        A host behind a home router behind a carrier-grade NAT reaches a
        server, which sees the outer router's address; the CGN segment is in
        100.64.0.0/10, and the outer (sequential) NAT still counts up.
        """
        srv = self.server()
        home = self.lab.add_router("home", kind="double")
        h = self.lab.add_host("h", behind=home)
        self.assertIn(ipaddress.IPv4Address(home.wan_ip), ipaddress.IPv4Network("100.64.0.0/10"))
        self.assertEqual(home.outer.kind, "symmetric-sequential")
        self.assertEqual(home.public_ip, home.outer.wan_ip)
        res = self.query(h, *[f"{srv.ip}:{p}" for p in SERVER_PORTS[:3]], local_port=40000)
        self.assertEqual([x["observed"] for x in res],
                         [f"{home.outer.wan_ip}:{p}" for p in (20000, 20001, 20002)])


class FirewallTests(LabTestCase):
    def test_unsolicited_dropped_then_punch(self):
        """
        Unsolicited packets, to the router's address or straight to the
        host's private address, are dropped; an early probe leaves no trace
        that would change the port the host later gets; once the host has
        sent to the peer, the peer's packets get in.
        """
        srv = self.lab.add_server("srv")
        r = self.lab.add_router("r", kind="cone")
        h = self.lab.add_host("h", behind=r)
        # An attacker on the internet segment routes the LAN to the router.
        srv.run(["ip", "route", "add", str(r.lan), "via", r.wan_ip], check=True)
        listener = h.start_probe("listen", "--port=40000", "--timeout=1.2", "--max=5")
        listener.wait_for_output('"ready"')
        for target in (f"{r.wan_ip}:40000", f"{h.ip}:40000"):
            srv.probe("send", f"--to={target}", "--local-port=5000", "--count=3")
        self.assertEqual(finish_python(listener)["received"], [])
        # Now both punch: the host's port must still be 40000 (the early
        # probe made no conntrack entry on the router).
        peer = srv.start_probe("listen", "--port=5000", f"--punch={r.wan_ip}:40000",
                               "--timeout=3", "--max=1")
        peer.wait_for_output('"ready"')
        local = h.start_probe("listen", "--port=40000", f"--punch={srv.ip}:5000",
                              "--timeout=3", "--max=1")
        got_peer, got_local = finish_python(peer)["received"], finish_python(local)["received"]
        self.assertEqual([x["from"] for x in got_peer], [f"{r.wan_ip}:40000"])
        self.assertEqual([x["from"] for x in got_local], [f"{srv.ip}:5000"])

    def test_flush_conntrack(self):
        """flush_conntrack forgets the router's mappings."""
        srv = self.server(ports=(3478,))
        r = self.lab.add_router("r", kind="cone", udp_timeout=7)
        h = self.lab.add_host("h", behind=r)
        self.query(h, f"{srv.ip}:3478", local_port=40000)
        self.assertIn("sport=40000", self.lab.conntrack(r))
        self.lab.flush_conntrack(r)
        self.assertNotIn("sport=40000", self.lab.conntrack(r))
        done = r.run(["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"], check=True)
        self.assertEqual(done.stdout.strip(), "7")


class SameRangeTests(LabTestCase):
    def test_two_lans_on_one_range(self):
        """
        Two LANs both on 192.168.1.0/24, with hosts of the same address,
        reach the server and punch through to each other (two cone NATs).
        """
        srv = self.server(ports=(3478,))
        ra = self.lab.add_router("ra", kind="cone", lan="192.168.1.0/24")
        rb = self.lab.add_router("rb", kind="cone", lan="192.168.1.0/24")
        a = self.lab.add_host("a", behind=ra)
        b = self.lab.add_host("b", behind=rb)
        self.assertEqual(a.ip, b.ip)
        self.assertEqual(self.query(a, f"{srv.ip}:3478", local_port=40000)[0]["observed"],
                         f"{ra.wan_ip}:40000")
        self.assertEqual(self.query(b, f"{srv.ip}:3478", local_port=40000)[0]["observed"],
                         f"{rb.wan_ip}:40000")
        pa = a.start_probe("listen", "--port=40000", f"--punch={rb.wan_ip}:40000", "--timeout=3")
        pb = b.start_probe("listen", "--port=40000", f"--punch={ra.wan_ip}:40000", "--timeout=3")
        self.assertEqual([x["from"] for x in finish_python(pa)["received"]], [f"{rb.wan_ip}:40000"])
        self.assertEqual([x["from"] for x in finish_python(pb)["received"]], [f"{ra.wan_ip}:40000"])


class ImpairmentTests(LabTestCase):
    def test_loss(self):
        """loss_pct drops packets on the WAN link (nftables, no netem)."""
        srv = self.server(ports=(3478,))
        clean = self.lab.add_router("clean", kind="cone")
        lossy = self.lab.add_router("lossy", kind="cone", loss_pct=95)
        steps = [f"{srv.ip}:3478"] * 8
        # Through the lossy link a step succeeds with p = 0.05 * 0.05.
        for router, low, high in ((clean, 8, 8), (lossy, 0, 2)):
            h = self.lab.add_host(f"h{router.name}", behind=router)
            res = self.query(h, *steps, new_socket=True, tries=1, timeout=0.25)
            answered = sum(x["observed"] is not None for x in res)
            self.assertTrue(low <= answered <= high, (router.name, answered))

    def test_delay(self):
        """
        delay_ms needs sch_netem: with it the RTT grows; without it the
        option fails with a clear error and leaves nothing behind.
        """
        srv = self.server(ports=(3478,))
        try:
            r = self.lab.add_router("r", kind="cone", delay_ms=20)
        except LabUnavailable as e:
            self.assertIn("netem", str(e))
            self.assertNotIn("\n", str(e))
            # Nothing was built: the name is still free.
            self.assertNotIn(state.ns_name(self.lab.lab_id, "r"), netns_list())
            r = self.lab.add_router("r", kind="cone", loss_pct=1)
            self.assertEqual(r.kind, "cone")
            return
        h = self.lab.add_host("h", behind=r)
        (res,) = self.query(h, f"{srv.ip}:3478", timeout=2)
        self.assertGreaterEqual(res["rtt_ms"], 40)


class PublicTests(LabTestCase):
    def test_public_host(self):
        """A host behind a 'public' router is on the internet: no NAT."""
        srv = self.server(ports=(3478,))
        none = self.lab.add_router("none", kind="public")
        h = self.lab.add_host("h", behind=none)
        self.assertIsNone(none.ns)
        (res,) = self.query(h, f"{srv.ip}:3478", local_port=40000)
        self.assertEqual(res["observed"], f"{h.ip}:40000")
        self.assertEqual(h.public_ip, h.ip)


class LifecycleTests(SynchronousTestCase):
    def setUp(self):
        cases.require_lab()

    def test_teardown_when_body_raises(self):
        """
        Leaving the ``with`` block by an exception removes every namespace,
        ends every process and removes the state file.
        """
        from p2pnat.lab import Lab

        with self.assertRaises(ZeroDivisionError):
            with Lab() as lab:
                r = lab.add_router("r", kind="double")
                h = lab.add_host("h", behind=r)
                srv = lab.add_server("srv")
                proc = srv.start_probe_server()
                stray = h.popen(["sleep", "30"], start_new_session=False)
                self.assertTrue(set(lab.namespaces) <= set(netns_list()))
                1 / 0
        self.assertEqual(len(lab.namespaces), 5)  # inet, r-cgn, r, h, srv
        self.assertFalse(set(lab.namespaces) & set(netns_list()))
        self.assertIsNotNone(proc.poll())
        self.assertIsNotNone(stray.poll())
        self.assertIn('"listening"', proc.stdout())  # output kept after teardown
        self.assertIsNone(state.read_state(lab.state_dir, lab.lab_id))
        self.assertRaises(LabError, lab.add_server, "late")

    def test_names_unique(self):
        from p2pnat.lab import Lab

        with Lab() as one, Lab() as two:
            self.assertNotEqual(one.lab_id, two.lab_id)
            one.add_server("srv")
            two.add_server("srv")
            self.assertRaises(LabConfigError, one.add_server, "srv")
            self.assertRaises(LabConfigError, one.add_server, "inet")
            self.assertRaises(LabConfigError, one.add_router, "x", kind="full-cone")
            self.assertNotEqual(one.nodes["srv"].ns, two.nodes["srv"].ns)

    def test_stale_reaped_live_kept(self):
        """
        A new lab removes the namespaces of a lab whose process died, and
        keeps those of a live one.
        """
        from p2pnat.lab import Lab

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = state.ns_name(state.ephemeral_lab_id(dead.pid, 1), "a")
        live = state.ns_name(state.ephemeral_lab_id(os.getpid(), 999999), "a")
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            self.addCleanup(subprocess.run, ["ip", "netns", "delete", ns], capture_output=True)
        with Lab():
            names = netns_list()
            self.assertNotIn(stale, names)
            self.assertIn(live, names)

    def test_named_lab_cli(self):
        """``p2pnat lab up``/``status``/``down`` on a named lab."""
        from p2pnat.lab import destroy_named

        name = f"t{os.getpid()}"[:12]
        cli = CommandLineTests("test_lab_without_command")
        status, out, err = cli.main("lab", "up", "--name", name, "--nat", "a=cone",
                                    "--nat", "b=symmetric-sequential", "--background", "b=5")
        self.addCleanup(lambda: name in self.named() and destroy_named(name))
        self.assertEqual(status, 0, err)
        self.assertIn(f"ip netns exec p2l-{name}-a", out)
        self.assertEqual(len(self.named(name)), 7)  # inet relay ra a rb b bgb
        status, out, _ = cli.main("lab", "status", "--name", name)
        self.assertIn(f"{name}: 7/7 namespaces, named", out)
        # The probe server answers inside the lab.
        from p2pnat.lab import topology

        a = topology.Host(None, "a", f"p2l-{name}-a", ["10.0.1.2"])
        deadline = time.monotonic() + 5
        while True:  # the server may still be starting
            res = a.probe("query", "--to=198.18.1.1:3478", "--timeout=0.5")["results"][0]
            if res["observed"] or time.monotonic() > deadline:
                break
        self.assertEqual(ip(res["observed"]), "198.18.2.1")
        status, _, err = cli.main("lab", "up", "--name", name, "--nat", "a=cone")
        self.assertEqual((status, err.count("\n")), (2, 1))
        status, out, _ = cli.main("lab", "down", "--name", name)
        self.assertEqual(status, 0)
        self.assertEqual(self.named(name), [])
        status, _, err = cli.main("lab", "down", "--name", name)
        self.assertEqual(status, 2)
        self.assertIn("no lab named", err)

    def named(self, name=None):
        return [ns for ns in netns_list() if ns.startswith(f"p2l-{name or ''}")]
