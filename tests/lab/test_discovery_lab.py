"""
NAT behaviour discovery in the NAT lab: a real lobby (``twistd lobby``,
RFC 5780 with two IPs and two ports) on the internet segment, and
``python -m p2pnat.peer.discovery`` run from a host behind each kind of
router, against the Linux kernel's own NAT.

Needs root, ``ip``, ``nft`` and ``conntrack``: skips with the reason
otherwise, and fails instead when the environment variable ``CI`` is set.
Each class has one test and a lab of its own.
"""

import time

from p2pnat.protocol.nat import APD, EI, NONE, plan
from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase
from tests.support.lab.running import finish_python, start_python


class DiscoveryLabTestCase(LabTestCase):
    """
    A lab per class (each has one test) with a lobby server of
    :attr:`addresses` IPs; a failure's message carries the lab's report.
    """

    addresses = 2

    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir, addresses=cls.addresses)

    def lobby(self):
        """
        Start ``twistd lobby`` on each of the server's IPs and both ports;
        return the addresses in the order a client gives them (primary,
        other IP, both other, other port).
        """
        self.env.start_lobby(timeout=15)
        ips, (p1, p2) = self.env.server.ips, P.LOBBY_PORTS
        if len(ips) == 1:
            return [f"{ips[0]}:{p1}", f"{ips[0]}:{p2}"]
        a1, a2 = ips
        return [f"{a1}:{p1}", f"{a2}:{p1}", f"{a2}:{p2}", f"{a1}:{p2}"]

    def start_discovery(self, host, servers, *args):
        return start_python(host, "p2pnat.peer.discovery", "--observations", *args, *servers)


def ip_of(addr):
    return addr.rpartition(":")[0]


def port_of(addr):
    return int(addr.rpartition(":")[2])


class KindsTests(DiscoveryLabTestCase):
    def test_every_router_kind(self):
        """
        One lobby with two IPs; a host behind each kind of router runs
        discovery (all at once).  What each run classifies is what the
        router's nftables recipe does.
        """
        servers = self.lobby()
        lab = self.lab
        routers = {
            "public": lab.add_router("rpub", kind="public"),
            "cone": lab.add_router("rcone", kind="cone"),
            "sequential": lab.add_router("rseq", kind="symmetric-sequential"),
            "step3": lab.add_router("rstep", kind="symmetric-sequential", port_base=30000,
                                    port_count=1000, port_step=3),
            "random": lab.add_router("rrnd", kind="symmetric-random"),
            "double": lab.add_router("rdbl", kind="double"),
        }
        hosts = {kind: lab.add_host(f"h{router.name[1:]}", behind=router)
                 for kind, router in routers.items()}
        procs_ = {kind: self.start_discovery(h, servers) for kind, h in hosts.items()}
        got = {kind: finish_python(p) for kind, p in procs_.items()}

        def check(kind, mapping, filtering, allocation, step, public_ip):
            r = got[kind]
            self.assertEqual((r["mapping"], r["filtering"], r["allocation"], r["step"]),
                             (mapping, filtering, allocation, step), (kind, r))
            self.assertEqual(ip_of(r["public"]), public_ip, (kind, r))
            # About the pause plus round trips; never beyond the deadline.
            self.assertLess(r["elapsed"], 2.0, (kind, r))

        check("public", NONE, NONE, "preserving", 0, hosts["public"].ip)
        self.assertEqual(got["public"]["public"], got["public"]["local"])
        check("cone", EI, APD, "preserving", 0, routers["cone"].wan_ip)
        self.assertEqual(port_of(got["cone"]["public"]), port_of(got["cone"]["local"]))
        check("sequential", APD, APD, "sequential", 1, routers["sequential"].wan_ip)
        self.assertEqual(port_of(got["sequential"]["public"]), 20000)  # the first of the plan
        check("step3", APD, APD, "sequential", 3, routers["step3"].wan_ip)
        check("random", APD, APD, "random", 0, routers["random"].wan_ip)
        # Double NAT: what the outer (sequential) NAT does.
        check("double", APD, APD, "sequential", 1, routers["double"].outer.wan_ip)
        for kind in ("sequential", "step3", "double"):
            self.assertEqual(got[kind]["rate"], 0.0, kind)  # nothing else behind them
        # And what the planner makes of pairs of them.
        from p2pnat.protocol.nat import NatBehaviour

        b = {kind: NatBehaviour.from_json({k: v for k, v in r.items()
                                           if k not in ("elapsed", "sent", "observations")})
             for kind, r in got.items()}
        self.assertEqual(plan(b["cone"], b["cone"]).strategy, "simultaneous-open")
        self.assertEqual(plan(b["sequential"], b["double"]).strategy, "predict")
        self.assertEqual(plan(b["random"], b["cone"]).strategy, "birthday")
        self.assertEqual(plan(b["random"], b["sequential"]).strategy, "relay")
        self.assertEqual(plan(b["random"], b["public"]).strategy, "direct")


class OneAddressTests(DiscoveryLabTestCase):
    addresses = 1

    def test_two_ports_on_one_ip(self):
        """
        The lobby's default shape (one IP, two ports): change-port works,
        change-IP is refused, and the notes say what could not be told.
        """
        servers = self.lobby()
        cone = self.lab.add_router("rcone", kind="cone")
        seq = self.lab.add_router("rseq", kind="symmetric-sequential")
        hc = self.lab.add_host("hcone", behind=cone)
        hs = self.lab.add_host("hseq", behind=seq)
        rc, rs = finish_python(self.start_discovery(hc, servers)), \
            finish_python(self.start_discovery(hs, servers))
        self.assertEqual((rc["mapping"], rc["filtering"], rc["allocation"]),
                         (EI, APD, "preserving"))
        self.assertTrue(any("address-dependent mapping would look" in n for n in rc["notes"]), rc)
        self.assertEqual((rs["mapping"], rs["filtering"], rs["allocation"], rs["step"]),
                         (APD, APD, "sequential", 1))
        refused = [p for p in rc["observations"]["probes"] if p["refused"]]
        self.assertEqual(sorted(p["change"] for p in refused), ["ip", "ip+port"])


class RateTests(DiscoveryLabTestCase):
    def test_background_rate(self):
        """
        A background host behind the sequential router opens 20 new flows
        a second: the measured rate is about that.
        """
        servers = self.lobby()
        r = self.lab.add_router("rseq", kind="symmetric-sequential")
        h = self.lab.add_host("h", behind=r)
        srv = self.env.server
        bg = self.lab.add_background("bg", behind=r, target=srv, rate=20)
        time.sleep(1.0)  # the background's start-up
        rates = []
        for _ in range(2):
            res = finish_python(self.start_discovery(h, servers, "--pause=0.5"))
            self.assertEqual((res["allocation"], res["step"]), ("sequential", 1), res)
            rates.append(res["rate"])
        self.assertIsNone(bg.process.poll(), bg.process.describe())
        for rate in rates:
            self.assertTrue(12 <= rate <= 28, rates)
