"""
Port mapping against Debian's miniupnpd on real lab routers (symmetric
random NATs: without a mapping nothing from outside reaches their hosts).

The lab: a public host ``pub``; router ``r1`` running miniupnpd with UPnP,
NAT-PMP and PCP, host ``h`` behind it; router ``r2`` with no port mapping
at all, host ``g``; router ``r3`` whose miniupnpd has only NAT-PMP on (PCP
and UPnP switched off), host ``k``.  The client is ``python -m
p2pnat.portmap map`` (a PortMapper holding a mapping of a UDP port it
listens on) inside the host's namespace.

What each test shows: a mapping is granted with each of PCP, NAT-PMP and
UPnP in turn, within the budget, and a datagram from ``pub`` to the mapped
address reaches the host; with all three the client takes PCP and leaves
one mapping on the router; a router that grants nothing gives no mapping
within the budget; renewal keeps a short-lived mapping alive (one nobody
renews is gone); the switches leave a router speaking only NAT-PMP, which
the client falls back to; the mapping is gone from the router after the
client stops; ``probe`` reports what each router offers.
"""

import os
import signal
import time

from p2pnat.lab import upnp
from tests.support.lab.cases import LabSetup, LabTestCase, measured
from tests.support.lab.running import events, run_python, start_python, wait_event

#: The clients' budget, and what a race may take beyond it (the process's
#: own scheduling on a busy machine).
BUDGET = 1.0
SLACK = 0.5
#: Short PCP/NAT-PMP/UPnP lifetimes for the renewal test.
SHORT_LIFETIME = 3


class PortmapSetup(LabSetup):
    def setup(self):
        lab = self.lab
        self.pub = lab.add_server("pub")
        self.r1 = lab.add_router("r1", kind="symmetric-random")
        self.h = lab.add_host("h", behind=self.r1)
        self.r2 = lab.add_router("r2", kind="symmetric-random")
        self.g = lab.add_host("g", behind=self.r2)
        self.r3 = lab.add_router("r3", kind="symmetric-random")
        self.k = lab.add_host("k", behind=self.r3)
        self.upnpd = upnp.start_miniupnpd(self.r1, min_lifetime=2)
        self.natpmp_only = upnp.start_miniupnpd(self.r3, upnp=False, pcp=False)


class PortmapLabTests(LabTestCase):
    @classmethod
    def make_env(cls, workdir):
        return PortmapSetup(workdir)

    def start_client(self, host, port, protocols=("pcp", "nat-pmp", "upnp"),
                     lifetime=3600):
        proc = start_python(host, "p2pnat.portmap", "map", f"--port={port}",
                            f"--protocols={','.join(protocols)}", f"--budget={BUDGET}",
                            f"--lifetime={lifetime}")
        self.addCleanup(proc.stop)
        return proc

    def first(self, proc):
        event = wait_event(proc, "first", timeout=15)
        self.assertLessEqual(event["took"], BUDGET + SLACK)
        return event["mapping"], event["took"]

    def router_has(self, daemon, host, port):
        """The external ports ``daemon`` forwards to ``host``:``port``."""
        return [ext for proto, ext, ip, iport in daemon.mappings()
                if proto == "udp" and ip == host.ip and iport == port]

    def reaches(self, proc, external, text):
        """Send ``text`` from pub to ``external`` and wait until the client got it."""
        ip, _, port = external.rpartition(":")
        run_python(self.env.pub, "p2pnat.lab.probe", "send", f"--to={ip}:{port}",
                   f"--data={text}", "--count=3")
        return wait_event(proc, "datagram", timeout=5, where=lambda e: e["data"] == text)

    def stop(self, proc):
        os.kill(proc.pid, signal.SIGTERM)
        wait_event(proc, "stopped", timeout=5)
        proc.wait(5)

    def check_protocol(self, protocols, expected, port):
        env = self.env
        proc = self.start_client(env.h, port, protocols)
        mapping, took = self.first(proc)
        measured(f"{expected} in {took:.3f}s")
        self.assertIsNotNone(mapping, proc.describe())
        self.assertEqual(mapping["protocol"], expected)
        ip, _, ext = mapping["external"].rpartition(":")
        self.assertEqual(ip, env.r1.public_ip)
        self.assertEqual(self.router_has(env.upnpd, env.h, port), [int(ext)])
        got = self.reaches(proc, mapping["external"], f"to-{expected}")
        self.assertEqual(got["source"].rpartition(":")[0], env.pub.ip)
        self.stop(proc)
        self.assertEqual(self.router_has(env.upnpd, env.h, port), [])

    def test_pcp(self):
        self.check_protocol(("pcp",), "pcp", 4001)

    def test_natpmp(self):
        self.check_protocol(("nat-pmp",), "nat-pmp", 4002)

    def test_upnp(self):
        self.check_protocol(("upnp",), "upnp", 4003)

    def test_all_three_prefer_pcp_and_leave_one_mapping(self):
        self.check_protocol(("pcp", "nat-pmp", "upnp"), "pcp", 4004)

    def test_without_the_mapping_nothing_reaches_the_host(self):
        """The control for the tests above: the router really filters."""
        env = self.env
        proc = start_python(env.h, "p2pnat.lab.probe", "listen", "--port=4005",
                            "--timeout=2")
        self.addCleanup(proc.stop)
        proc.wait_for_output('"ready"')
        run_python(env.pub, "p2pnat.lab.probe", "send", f"--to={env.r1.public_ip}:4005",
                   "--count=3")
        proc.wait(10)
        self.assertNotIn("hello", proc.stdout())

    def test_a_router_that_grants_nothing(self):
        env = self.env
        proc = self.start_client(env.g, 4006)
        mapping, took = self.first(proc)
        measured(f"nothing in {took:.3f}s")
        self.assertIsNone(mapping)
        self.stop(proc)

    def test_renewal(self):
        env = self.env
        clients = {}
        for port, protocol in ((4011, "pcp"), (4012, "nat-pmp"), (4013, "upnp")):
            clients[protocol] = (port, self.start_client(env.h, port, (protocol,),
                                                         lifetime=SHORT_LIFETIME))
        # The control: a client killed at once neither renews nor deletes.
        lost = self.start_client(env.h, 4014, ("pcp",), lifetime=SHORT_LIFETIME)
        externals = {}
        for protocol, (port, proc) in clients.items():
            mapping, _ = self.first(proc)
            self.assertEqual(mapping["protocol"], protocol)
            externals[protocol] = mapping["external"]
        self.assertIsNotNone(self.first(lost)[0])
        lost.popen.send_signal(signal.SIGKILL)
        time.sleep(3 * SHORT_LIFETIME)
        self.assertEqual(self.router_has(env.upnpd, env.h, 4014), [],
                         "miniupnpd kept a mapping nobody renewed")
        for protocol, (port, proc) in clients.items():
            self.assertEqual(len(self.router_has(env.upnpd, env.h, port)), 1, protocol)
            mapping_events = [e for e in events(proc.stdout()) if e["event"] == "mapping"]
            # Renewed with the same address: no change to tell.
            self.assertEqual(len(mapping_events), 1, proc.stdout())
            self.reaches(proc, externals[protocol], f"renewed-{protocol}")
            self.stop(proc)
            self.assertEqual(self.router_has(env.upnpd, env.h, port), [])

    def test_switched_off_protocols_fall_back_to_natpmp(self):
        env = self.env
        proc = self.start_client(env.k, 4021)
        mapping, took = self.first(proc)
        measured(f"nat-pmp after PCP dropped, {took:.3f}s")
        self.assertEqual(mapping["protocol"], "nat-pmp")
        self.reaches(proc, mapping["external"], "fallback")
        self.stop(proc)
        self.assertEqual(env.natpmp_only.mappings(), [])

    def probe(self, host):
        result = run_python(host, "p2pnat.portmap", "probe", f"--budget={BUDGET}")
        self.assertEqual(result["event"], "probe")
        return {k: v for k, v in result.items() if k != "event"}

    def test_probe(self):
        env = self.env
        self.assertEqual(self.probe(env.h), {"pcp": True, "nat-pmp": True, "upnp": True,
                                             "external": env.r1.public_ip})
        self.assertEqual(self.probe(env.g), {"pcp": False, "nat-pmp": False, "upnp": False,
                                             "external": None})
        self.assertEqual(self.probe(env.k), {"pcp": False, "nat-pmp": True, "upnp": False,
                                             "external": env.r3.public_ip})
        self.assertEqual(env.upnpd.mappings(), [])

