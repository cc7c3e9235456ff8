"""
A standard RFC 5780 client against our lobby in the NAT lab: pion's
``stun-nat-behaviour`` (built from Debian's sources, see
:mod:`tests.support.lab.rfc5780`) run from a host behind every kind of
router the lab builds, against a real lobby (``twistd lobby``) with two
IPs and two ports on each.  Its verdicts must be what each router's
nftables recipe does, and every answer it got must say truly where it
came from (RESPONSE-ORIGIN) and name the lobby's alternate address
(OTHER-ADDRESS).

Needs root, ``ip``, ``nft``, ``conntrack`` and the client's Debian
packages: skips with the reason otherwise, and fails instead when the
environment variable ``CI`` is set.
"""

import time

from p2pnat.lab import nft
from p2pnat.protocol.nat import APD, EI
from tests.support.lab import p2p as P
from tests.support.lab import rfc5780
from tests.support.lab.cases import LabTestCase

#: What the client must conclude behind each router kind (mapping,
#: filtering).  Without a NAT it says endpoint-independent for both (it
#: cannot tell "no NAT", see rfc5780.VERDICTS); a double NAT is what its
#: outer, sequential NAT does.
EXPECTED = {
    "public": (EI, EI),
    "cone": (EI, APD),
    "symmetric-sequential": (APD, APD),
    "symmetric-random": (APD, APD),
    "double": (APD, APD),
}


class StandardClientTests(LabTestCase):
    @classmethod
    def make_env(cls, workdir):
        return P.P2PLab(workdir, addresses=2)

    def setUp(self):
        rfc5780.require_client()
        super().setUp()

    def test_every_router_kind(self):
        """
        A host behind each kind of router runs the client (all at once)
        against the lobby's first address; each verdict is the router's,
        and each answer is the 56 bytes of XOR-MAPPED-ADDRESS,
        RESPONSE-ORIGIN and OTHER-ADDRESS that docs/stun.rst gives.
        """
        self.assertEqual(set(EXPECTED), set(nft.KINDS), "a router kind without an expectation")
        rfc5780.client_path()  # built before the clock starts
        t0 = time.monotonic()
        self.env.start_lobby(timeout=15)
        (a1, a2), (p1, p2) = self.env.server.ips, P.LOBBY_PORTS
        primary = f"{a1}:{p1}"
        # Each of the lobby's addresses and its alternate (other IP, other port).
        alternate = {f"{a}:{p}": f"{a2 if a == a1 else a1}:{p2 if p == p1 else p1}"
                     for a in (a1, a2) for p in (p1, p2)}
        routers = {kind: self.lab.add_router(f"r{P.SHORT[kind]}", kind=kind) for kind in EXPECTED}
        hosts = {kind: self.lab.add_host(f"h{P.SHORT[kind]}", behind=r)
                 for kind, r in routers.items()}
        procs = {kind: rfc5780.start(h, primary) for kind, h in hosts.items()}
        got = {kind: rfc5780.finish(p) for kind, p in procs.items()}

        for kind, verdict in got.items():
            self.assertEqual((verdict.mapping, verdict.filtering), EXPECTED[kind],
                             f"{kind}:\n{verdict.output}")
            router = routers[kind]
            public = hosts[kind].ip if kind == "public" else (
                router.outer.wan_ip if kind == "double" else router.wan_ip)
            answered = [x for x in verdict.exchanges if x.source is not None]
            self.assertTrue(answered, kind)
            for x in answered:
                what = f"{kind}: {x}"
                self.assertEqual(x.response_origin, x.source, what)
                # The alternate of the address asked, whichever sibling answered.
                self.assertEqual(x.other_address, alternate[x.to], what)
                self.assertEqual(x.mapped.rpartition(":")[0], str(public), what)
                self.assertEqual((x.sent, x.received), (20, 56) if x.sent == 20 else (28, 56),
                                 what)
            # The change requests went to the primary address and, when let
            # through, came from the address they asked for.
            changes = [x for x in verdict.exchanges if x.sent == 28]
            self.assertTrue(changes and all(x.to == primary for x in changes), kind)
        # Behind the public host's missing firewall, the IP-and-port change
        # is answered from the alternate address itself.
        [change] = [x for x in got["public"].exchanges if x.sent == 28]
        self.assertEqual(change.source, alternate[primary])
        # Behind every NAT, both change requests time out: nothing answered
        # them from the primary address instead.
        for kind in EXPECTED:
            if kind != "public":
                self.assertEqual(
                    [x.source for x in got[kind].exchanges if x.sent == 28], [None, None], kind)
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, 30.0)
