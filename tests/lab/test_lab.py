"""
Tests for the NAT lab (:mod:`p2pnat.lab`); its pure parts are tested in
L{tests.unit.test_lab_rules}.

The lab tests build real
namespaces with the kernel's NAT and need root, ``ip``, ``nft`` and
``conntrack``; they skip with the reason otherwise (and fail when the
environment variable ``CI`` is set).  Each lab test checks a
behaviour that a wrong recipe would break.
"""

import ipaddress
import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.lab import state
from p2pnat.lab.errors import LabConfigError, LabError, LabUnavailable
from p2pnat.lab.topology import netns_list
from tests.support.lab import cases
from tests.support.lab.running import finish_python
from tests.unit.test_lab_rules import CommandLineTests

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
