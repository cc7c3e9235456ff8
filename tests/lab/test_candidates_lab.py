"""
Candidates end to end in the NAT lab: ``p2pnat peer`` processes whose
routers grant a port mapping (Debian's miniupnpd with one protocol on) or
whose hosts have global IPv6 addresses behind stateful IPv6 firewalls, a
lobby (``twistd lobby``) on the lab's server, and the peers' ``--json``
events as the evidence.

One dual-stack lab for the whole module (:class:`CandidateTests`):

- B (``b``, behind the symmetric-random IPv4-only router ``rb``, no port
  mapping) runs ``peer wait --echo``;
- A behind a symmetric-random router running miniupnpd with only PCP
  (``apcp``), only NAT-PMP (``apmp``) or only UPnP IGD (``aupnp``) on
  connects to B: the path is direct, on A's mapped candidate (A's ``path``
  event says ``mapped``, B's ``peer-mapped``), it was granted by that
  protocol, and the router holds no mapping of A's once A exited;
- A behind a symmetric-random router without port mapping (``anone``)
  connects to B: relayed, as without candidates, and the port mapping
  attempt adds no more than its budget to the time to the path (measured
  against ``--no-portmap`` runs and printed);
- dual-stack hosts behind routers with ``ipv6=True`` (stateful IPv6
  firewall, no NAT66) whose IPv4 side is cone, symmetric sequential,
  symmetric random or double NAT connect in every pair of those kinds,
  each kind with itself too (symmetric random on both ends among them):
  every path is direct over IPv6.

Needs root, ``ip``, ``nft``, ``conntrack`` and ``miniupnpd``
(``miniupnpd-nftables``): skips with the reason otherwise, and fails
instead when the environment variable ``CI`` is set.
"""

import re
import statistics

from p2pnat.lab import upnp
from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.running import events, first, wait_event

#: The peers' port mapping budget (``PortMapper``'s default) and what a
#: measurement may add beyond it on a busy machine.
BUDGET = 1.0
SLACK = 0.5
#: The routers granting mappings: host name -> the one protocol on.
MAPPING_HOSTS = {"apcp": "pcp", "apmp": "nat-pmp", "aupnp": "upnp"}
#: The dual-stack hosts' IPv4 NAT kinds, and the pairs (A, B) that connect.
V6_HOSTS = {"c6": "cone", "c7": "cone", "q6": "symmetric-sequential",
            "q7": "symmetric-sequential", "r6": "symmetric-random", "s6": "symmetric-random",
            "d6": "double", "d7": "double"}
#: Every pair of kinds, each kind with itself too.
V6_PAIRS = (("c6", "c7"), ("c6", "q6"), ("c6", "r6"), ("c6", "d6"), ("q6", "q7"),
            ("q6", "r6"), ("q6", "d6"), ("s6", "r6"), ("r6", "d6"), ("d6", "d7"))
#: Runs with and without port mapping for the relayed timing.
TIMING_RUNS = 2


class CandidateTests(LabTestCase):
    """The module's one lab (see the module's docstring); tests run their own connects."""

    @classmethod
    def make_env(cls, workdir):
        return P.DualStackP2PLab(workdir, addresses=2)

    @classmethod
    def build(cls, pl):
        lab = pl.lab
        cls.daemons = {}
        for name, protocol in MAPPING_HOSTS.items():
            router = lab.add_router(f"r{name}", kind="symmetric-random")
            pl.add_client(name, lab.add_host(name, behind=router))
            cls.daemons[name] = upnp.start_miniupnpd(
                router, upnp=protocol == "upnp", natpmp=protocol == "nat-pmp",
                pcp=protocol == "pcp")
        pl.add_client("anone", lab.add_host("anone", behind=lab.add_router(
            "ranone", kind="symmetric-random")))
        pl.add_client("b", lab.add_host("b", behind=lab.add_router("rb", kind="symmetric-random")))
        for name, kind in V6_HOSTS.items():
            host = lab.add_host(name, behind=lab.add_router(f"r{name}", kind=kind, ipv6=True))
            pl.add_client(f"c-{name}", host)  # connects
            pl.add_client(f"w-{name}", host)  # waits
        pl.start_lobby()
        waiters = ["b"] + sorted({f"w-{b}" for _, b in V6_PAIRS})
        for cid in waiters:
            pl.start_wait(cid, "--echo")
        for cid in waiters:
            pl.wait_login(cid)

    def connect(self, a, b, *args):
        t = self.env.connect(a, b, "--send", "ping", "--wait", "4", *args)
        self.assertEqual((t.returncode, [e.get("text") for e in t.echoes]), (0, ["ping"]),
                         t.describe())
        return t

    def incoming(self, b, a, start):
        """B's ``path`` event for A's connect (B's events after the first ``start``)."""
        return wait_event(self.env.clients[b].waiter, "path", start=start, timeout=10,
                          where=lambda e: e.get("peer") == a)

    def b_events(self, b):
        return len(events(self.env.clients[b].waiter.stdout()))

    # -- port mapping ---------------------------------------------------------------

    def check_mapped(self, name):
        env, protocol = self.env, MAPPING_HOSTS[name]
        host, daemon = env.clients[name].host, self.daemons[name]
        start = self.b_events("b")
        t = self.connect(name, "b")
        offered = first(t.events, "candidates")
        self.assertTrue(offered["mapped"], t.describe())
        granted = re.search(r"port mapping by (\S+): (\S+) -> (\d+)", t.stderr)
        self.assertIsNotNone(granted, t.describe())
        self.assertEqual(granted.group(1), protocol, t.describe())
        self.assertEqual(granted.group(2).rpartition(":")[0], host.router.public_ip)
        self.assertEqual((t.mode, t.path["candidate"]), ("direct", "mapped"), t.describe())
        theirs = self.incoming("b", name, start)
        self.assertEqual((theirs["mode"], theirs["candidate"]), ("direct", "peer-mapped"),
                         env.clients["b"].waiter.describe(3000))
        # The peer deleted its mapping as it exited.
        left = [m for m in daemon.mappings() if m[2] == host.ip]
        self.assertEqual(left, [], daemon.describe())
        measured(f"{protocol}: direct via {granted.group(2)} in {t.path['seconds']:.3f}s,"
                 f" {t.path['strategy']}")

    def test_pcp(self):
        """A's router grants a mapping by PCP only: direct on it, deleted after."""
        self.check_mapped("apcp")

    def test_natpmp(self):
        """A's router grants a mapping by NAT-PMP only: direct on it, deleted after."""
        self.check_mapped("apmp")

    def test_upnp(self):
        """A's router grants a mapping by UPnP IGD only: direct on it, deleted after."""
        self.check_mapped("aupnp")

    def test_no_mapping_relayed_within_the_budget(self):
        """
        No router grants a mapping: relayed, as without port mapping, and the
        attempt costs at most its budget.  Measured: the start (the command's
        start to the ``login`` event: discovery, login and the mapping
        attempt go on at once), and the time to the path from the command's
        start.
        """
        runs = {True: [], False: []}
        for _ in range(TIMING_RUNS):
            for portmap in (True, False):
                t = self.connect("anone", "b", *(() if portmap else ("--no-portmap",)))
                self.assertEqual(t.mode, "relayed", t.describe())
                self.assertEqual(first(t.events, "candidates")["candidates"], [], t.describe())
                start = first(t.events, "login")["t"]
                runs[portmap].append((start, t.path["seconds"], t.path["total"]))

        def median(portmap, i):
            return statistics.median(r[i] for r in runs[portmap])

        measured("relayed path, with port mapping / without: start "
                 f"{median(True, 0):.3f}/{median(False, 0):.3f}s, connect to path "
                 f"{median(True, 1):.3f}/{median(False, 1):.3f}s, command start to path "
                 f"{median(True, 2):.3f}/{median(False, 2):.3f}s")
        self.assertLess(median(True, 0) - median(False, 0), BUDGET + SLACK, runs)
        self.assertLess(median(True, 0), BUDGET + SLACK, runs)
        # The connect itself is the same: no mapping, no candidate.
        self.assertLess(median(True, 1) - median(False, 1), SLACK, runs)

    # -- IPv6 -------------------------------------------------------------------------

    def test_ipv6_pairs_direct(self):
        """
        Every pair of dual-stack hosts behind stateful IPv6 firewalls goes
        direct over IPv6, symmetric random IPv4 sides on both ends included.
        """
        env = self.env
        took = []
        for a, b in V6_PAIRS:
            start = self.b_events(f"w-{b}")
            t = self.connect(f"c-{a}", f"w-{b}")
            label = f"{V6_HOSTS[a]} -> {V6_HOSTS[b]}"
            offered = first(t.events, "candidates")
            self.assertTrue(offered["ipv6"], t.describe())
            self.assertIn([env.clients[f"c-{a}"].host.ip6], [c[:1] for c in offered["candidates"]],
                          t.describe())
            self.assertEqual((t.mode, t.path["candidate"]), ("direct", "ipv6"),
                             f"{label}: {t.describe()}")
            theirs = self.incoming(f"w-{b}", f"c-{a}", start)
            self.assertEqual((theirs["mode"], theirs["candidate"]), ("direct", "ipv6"),
                             f"{label}: {env.clients[f'w-{b}'].waiter.describe(3000)}")
            took.append(f"{label} {t.path['seconds']:.3f}s")
        measured("direct over IPv6: " + ", ".join(took))
