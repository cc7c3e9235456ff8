"""
``p2pnat netcheck`` in the NAT lab: a real lobby (``twistd lobby``, two
IPs and two ports) on the internet segment, and the command run from a host
behind each kind of router the lab builds, against the Linux kernel's own
NAT.  Each verdict must be what the router's nftables recipe does, the
paths it announces must be the ones the P2P matrix proves, and each run
must take under 3 s (measured and printed).

- :class:`KindsTests`: every router kind of the lab, one host behind each;
- :class:`LifetimeTests`: the mapping lifetime of a router with a short
  UDP timeout;
- :class:`DualStackTests`: a lobby on IPv4 and IPv6, a dual-stack host and
  an IPv6-only host behind a stateful IPv6 firewall;
- :class:`PortmapTests`: routers running miniupnpd with PCP, NAT-PMP or
  UPnP alone: the exact ``portmap`` verdict, and the paths a granted
  mapping opens.

Needs root, ``ip``, ``nft`` and ``conntrack``: skips with the reason
otherwise, and fails instead when the environment variable ``CI`` is set.
"""

import json
import time

from p2pnat.lab.topology import hostport
from p2pnat.protocol.netcheck import PORTMAP_PROTOCOLS
from tests.support import procs
from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured

#: What netcheck must say behind each kind of router: the kind, the
#: mapping, filtering and allocation, the step.  A double NAT is what its
#: outer (sequential, carrier-grade) NAT does; a lobby with two IPs lets
#: the public host's filtering be told.
EXPECTED = {
    "public": ("no-nat", "none", "none", "preserving", 0),
    "cone": ("cone", "endpoint-independent", "address-and-port-dependent", "preserving", 0),
    "symmetric-sequential": ("symmetric-sequential", "address-and-port-dependent",
                             "address-and-port-dependent", "sequential", 1),
    "symmetric-random": ("symmetric-random", "address-and-port-dependent",
                         "address-and-port-dependent", "random", 0),
    "double": ("symmetric-sequential", "address-and-port-dependent",
               "address-and-port-dependent", "sequential", 1),
}
#: netcheck's peer kinds as the lab's router kinds (for p2p.expect_direct).
PEER_KIND = {"no-nat": "public", "cone": "cone", "symmetric-sequential": "symmetric-sequential",
             "symmetric-random": "symmetric-random"}
#: Seconds a default run may take, from start to exit.
LIMIT = 3.0


class NetcheckLabTestCase(LabTestCase):
    """A lab per class with a lobby of two IPs; a failure carries the lab's report."""

    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir, addresses=2)

    def lobby(self):
        """Start the lobby (once per lab); its addresses as ``--lobby`` options, primary first."""
        if self.env.lobby is None:
            self.env.start_lobby(timeout=15)
        (a1, a2), (p1, p2) = self.env.server.ips, P.LOBBY_PORTS
        order = [f"{a1}:{p1}", f"{a2}:{p1}", f"{a2}:{p2}", f"{a1}:{p2}"]
        return [a for addr in order for a in ("--lobby", addr)]

    def netcheck(self, host, *args, timeout=60):
        """Run ``p2pnat netcheck --json`` in ``host``: (its report, wall seconds)."""
        t0 = time.monotonic()
        done = host.run(procs.p2pnat("netcheck", "--json", *args), cwd=procs.REPO,
                        env=procs.env(), timeout=timeout)
        wall = time.monotonic() - t0
        self.assertEqual(done.returncode, 0, f"{host.name}: {done.stdout}\n{done.stderr}")
        self.assertNotIn("Traceback", done.stderr)
        return json.loads(done.stdout.strip().splitlines()[-1]), wall


class KindsTests(NetcheckLabTestCase):
    def test_every_router_kind(self):
        """
        A host behind each kind of router runs netcheck, one after the
        other (so that each has the machine's cores to itself, as a user's
        run would): the right NAT, hairpinning (no lab router hairpins;
        the public host reaches itself), reachability, latency, the
        paths of the P2P matrix, under 3 s each.
        """
        lobby = self.lobby()
        lab = self.lab
        routers = {kind: lab.add_router(f"r{P.SHORT[kind]}", kind=kind) for kind in P.KINDS}
        hosts = {kind: lab.add_host(f"h{P.SHORT[kind]}", behind=r) for kind, r in routers.items()}
        walls = {}
        for kind in P.KINDS:
            r, walls[kind] = self.netcheck(hosts[kind], *lobby)
            nat = r["nat"]
            got = (nat["kind"], nat["mapping"], nat["filtering"], nat["allocation"], nat["step"])
            self.assertEqual(got, EXPECTED[kind], (kind, r))
            router = routers[kind]
            public_ip = {"public": hosts[kind].ip, "double": getattr(router.outer, "wan_ip", None)
                         }.get(kind, router.wan_ip)
            self.assertEqual(nat["public"].rpartition(":")[0], str(public_ip), (kind, r))
            self.assertIs(r["hairpin"], kind == "public", (kind, r))
            self.assertEqual(r["ipv4"]["reachable"], True, (kind, r))
            self.assertEqual(r["ipv4"]["public"].rpartition(":")[0], str(public_ip))
            # The lab has no IPv6 yet: no lobby address of that family.
            self.assertIsNone(r["ipv6"]["reachable"], (kind, r))
            for s in r["servers"]:
                self.assertEqual((s["reachable"], s["answered"]), (True, 3), (kind, s))
                self.assertLess(s["latency_ms"], 50, (kind, s))
            # No lab router offers port mapping.
            if r["portmap"] is not None:
                self.assertFalse(any(r["portmap"][p] for p in PORTMAP_PROTOCOLS), (kind, r))
            for path in r["paths"]:
                if path["peer"] == "same-nat":
                    continue
                self.assertEqual(path["direct"], P.expect_direct(kind, PEER_KIND[path["peer"]]),
                                 (kind, path))
            self.assertEqual(r["notes"], [], (kind, r))
            self.assertLess(r["elapsed"], r["budget"], (kind, r))
        measured(", ".join(f"{k} {w:.2f} s" for k, w in walls.items()))
        for kind, wall in walls.items():
            self.assertLess(wall, LIMIT, kind)


class LifetimeTests(NetcheckLabTestCase):
    def test_sequential_router_timeout(self):
        """
        A sequential router whose conntrack forgets idle UDP flows after
        3 s: the mapping was kept after 2 s idle and gone after 4 s; the
        8 s interval stops there.  Behind a cone router (ports kept) the
        lifetime cannot be seen, and the run says so at once.
        """
        lobby = self.lobby()
        seq = self.lab.add_router("rseq", kind="symmetric-sequential", udp_timeout=3)
        cone = self.lab.add_router("rcone", kind="cone", udp_timeout=3)
        r, wall = self.netcheck(self.lab.add_host("hseq", behind=seq), *lobby, "--lifetime",
                                "--lifetime-max", "8", "--no-portmap")
        lt = r["lifetime"]
        measured(f"lifetime between {lt['at_least']} and {lt['at_most']} s, {wall:.2f} s")
        self.assertEqual((lt["at_least"], lt["at_most"]), (2.0, 4.0), r)
        self.assertEqual([t for t, _ in lt["tested"]], [1.0, 2.0, 4.0])
        self.assertLess(wall, 4.0 + LIMIT)
        r, wall = self.netcheck(self.lab.add_host("hcone", behind=cone), *lobby, "--lifetime",
                                "--no-portmap")
        self.assertIn("keeps the local port", r["lifetime"]["note"])
        self.assertLess(wall, LIMIT)


class DualStackTests(NetcheckLabTestCase):
    """
    A dual-stack lab whose lobby listens on two IPv4 and two IPv6
    addresses (two ports each): hosts behind home routers with a stateful
    IPv6 firewall (no NAT66).
    """

    @classmethod
    def make_env(cls, workdir):
        return P.DualStackP2PLab(workdir, addresses=2)

    def lobbies(self):
        """The lobby's IPv4 addresses (as :meth:`lobby`) and its IPv6 ones, both ports."""
        v4 = self.lobby()
        (a1, a2), (p1, p2) = self.env.server.ip6s, P.LOBBY_PORTS
        v6 = [hostport(a, p) for a, p in ((a1, p1), (a2, p1), (a2, p2), (a1, p2))]
        return v4, [a for addr in v6 for a in ("--lobby", addr)]

    def test_dual_stack_and_ipv6_only(self):
        """
        A dual-stack host behind a symmetric-random router with an IPv6
        firewall: its IPv4 NAT as before, IPv4 and IPv6 both reachable,
        the IPv6 address seen as it is (no NAT66).  An IPv6-only host
        behind the same router, its lobby's IPv6 addresses first: no NAT,
        but a stateful firewall (``firewall``), IPv6 reachable, IPv4 not
        (no route).  Each under 3 s.
        """
        v4, v6 = self.lobbies()
        router = self.lab.add_router("rds", kind="symmetric-random", ipv6=True)
        dual = self.lab.add_host("hds", behind=router)
        only6 = self.lab.add_host("hsix", behind=router, ipv4=False)
        r, wall_dual = self.netcheck(dual, *v4, *v6, "--no-portmap")
        nat = r["nat"]
        self.assertEqual((nat["kind"], nat["filtering"]), EXPECTED["symmetric-random"][:1]
                         + EXPECTED["symmetric-random"][2:3], r)
        self.assertEqual(nat["public"].rpartition(":")[0], router.wan_ip, r)
        self.assertIs(r["ipv4"]["reachable"], True, r)
        self.assertIs(r["ipv6"]["reachable"], True, r)
        self.assertEqual(r["ipv6"]["public"].rpartition(":")[0], f"[{dual.ip6}]", r)
        self.assertEqual(r["ipv6"]["servers"], 4, r)
        for s in r["servers"]:
            self.assertEqual((s["reachable"], s["answered"]), (True, 3), s)
        self.assertEqual(r["notes"], [], r)

        r, wall_six = self.netcheck(only6, *v6, *v4, "--no-portmap")
        nat = r["nat"]
        self.assertEqual((nat["kind"], nat["mapping"], nat["filtering"]),
                         ("firewall", "none", "address-and-port-dependent"), r)
        self.assertEqual(nat["public"].rpartition(":")[0], f"[{only6.ip6}]", r)
        self.assertIs(r["ipv6"]["reachable"], True, r)
        self.assertIs(r["ipv4"]["reachable"], False, r)
        self.assertEqual(r["ipv6"]["public"].rpartition(":")[0], f"[{only6.ip6}]", r)
        for s in r["servers"]:
            self.assertEqual(s["reachable"], s["family"] == "ipv6", s)
        measured(f"dual-stack {wall_dual:.2f} s, IPv6-only {wall_six:.2f} s")
        self.assertLess(wall_dual, LIMIT)
        self.assertLess(wall_six, LIMIT)


class PortmapTests(NetcheckLabTestCase):
    def test_each_protocol(self):
        """
        Hosts behind symmetric-random routers running miniupnpd with only
        PCP, only NAT-PMP or only UPnP IGD on: netcheck names exactly that
        protocol (and the external address, which PCP's ANNOUNCE does not
        tell), leaves no mapping behind, and expects a direct path with
        every kind of peer (the peer sends to the port mapping the gateway
        grants, as ``p2pnat peer`` offers it), under 3 s each.
        """
        from p2pnat.lab import upnp

        lobby = self.lobby()
        walls = {}
        for protocol, external in (("pcp", False), ("nat-pmp", True), ("upnp", True)):
            name = {"pcp": "pcp", "nat-pmp": "pmp", "upnp": "upnp"}[protocol]
            router = self.lab.add_router(f"r{name}", kind="symmetric-random")
            daemon = upnp.start_miniupnpd(router, upnp=protocol == "upnp",
                                          natpmp=protocol == "nat-pmp", pcp=protocol == "pcp")
            r, walls[protocol] = self.netcheck(self.lab.add_host(f"h{name}", behind=router),
                                               *lobby)
            self.assertEqual(r["nat"]["kind"], "symmetric-random", r)
            expected = {p: p == protocol for p in PORTMAP_PROTOCOLS}
            expected["external"] = router.wan_ip if external else None
            self.assertEqual(r["portmap"], expected, r)
            self.assertIsNone(r["portmap_note"], r)
            self.assertEqual(daemon.mappings(), [], daemon.describe())
            for path in r["paths"]:
                self.assertTrue(path["direct"], (protocol, path))
            random_peer = next(p for p in r["paths"] if p["peer"] == "symmetric-random")
            self.assertEqual(random_peer["strategy"], "relay", r)  # the plan without it
            self.assertIn("direct, the peer sending to the port mapping our gateway grants",
                          random_peer["words"], r)
            self.assertEqual(r["notes"], [], r)
        measured(", ".join(f"{p} {w:.2f} s" for p, w in walls.items()))
        for protocol, wall in walls.items():
            self.assertLess(wall, LIMIT, protocol)

    def test_home_router_behind_a_carrier_grade_nat(self):
        """
        miniupnpd on the home router of a double NAT: netcheck names what
        it offers and its external address (the carrier's 100.64/10 side),
        and the paths stay those of the carrier's sequential NAT, since
        nobody outside can reach a port mapped on an address behind it.
        """
        from p2pnat.lab import upnp

        lobby = self.lobby()
        router = self.lab.add_router("rdbl", kind="double")
        upnp.start_miniupnpd(router)
        r, wall = self.netcheck(self.lab.add_host("hdbl", behind=router), *lobby)
        measured(f"{wall:.2f} s")
        self.assertEqual(r["nat"]["kind"], "symmetric-sequential", r)
        self.assertEqual(r["portmap"], {"pcp": True, "nat-pmp": True, "upnp": True,
                                        "external": router.wan_ip}, r)
        self.assertNotEqual(r["nat"]["public"].rpartition(":")[0], router.wan_ip, r)
        for path in r["paths"]:
            if path["peer"] != "same-nat":
                self.assertEqual(path["direct"],
                                 P.expect_direct("double", PEER_KIND[path["peer"]]), path)
            self.assertNotIn("port mapping", path["words"], path)
        self.assertLess(wall, LIMIT)
