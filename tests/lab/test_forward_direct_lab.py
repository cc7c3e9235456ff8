"""
``p2pnat forward`` across the kernel's real NATs: direct where physics
allows, relayed otherwise, the transfer intact either way.

One lab: the relay on the internet segment; devices behind a cone NAT,
a symmetric NAT with sequential ports, one with random ports, and a
double NAT (a cone home router behind a sequential carrier-grade NAT),
each running ``python -m http.server`` and the device agent; two
terminals, one on the internet segment and one behind its own cone NAT.
Each terminal runs ``p2pnat forward DEVICE --json`` to each device and
fetches a 1 MB file through it with ``curl``, checked by SHA-256, and the
forward's JSON event says which path the connection took:

- a device behind the cone NAT: ``direct``.  The agent punched from its
  notify socket toward the terminal's STUN mapping, so its NAT lets the
  terminal's QUIC Initial in through the very mapping the relay knows;
- behind a symmetric NAT (sequential, random, or the double NAT's outer
  one): ``relayed``.  Its punch leaves from another public port than the
  relay's mapping, which takes packets from the relay only: the QUIC
  attempt finds nothing within the budget, and the relayed connection,
  held meanwhile, serves.

And over IPv6 (L{ForwardDirectIPv6LabTests}): a device on IPv6 only,
behind a home router's stateful IPv6 firewall, which its punch opens; a
terminal that reaches the relay over IPv6 goes direct over IPv6, and over
IPv4 it is relayed (the device has no IPv4 mapping).
"""

import hashlib
import json
import os

from p2pnat.lab.topology import hostport
from tests.support import procs
from tests.support.lab import relay as F
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.ipv6 import DualStackRelayLab
from tests.support.lab.running import wait_for_log

SIZE = 1024 * 1024
#: device: (router kind, the path expected from either terminal)
KINDS = {
    "cone": ("cone", "direct"),
    "seq": ("symmetric-sequential", "relayed"),
    "rand": ("symmetric-random", "relayed"),
    "double": ("double", "relayed"),
}

def paths_of(proc):
    """The path each connection of forward C{proc} took (its JSON lines)."""
    return [json.loads(line)["path"] for line in proc.stdout().splitlines()
            if '"event": "path"' in line]


class ForwardDirectLabTests(LabTestCase):
    tools = ("curl",)

    @classmethod
    def make_env(cls, workdir):
        env = F.RelayLab.with_docroot(workdir)
        data = os.urandom(SIZE)
        with open(os.path.join(env.docroot, "mb.bin"), "wb") as f:
            f.write(data)
        cls.sha256 = hashlib.sha256(data).hexdigest()
        return env

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        cls.terminals = {"public": lab.add_host("tpub"),
                         "cone": lab.add_host("tcone", behind=lab.add_router("tnat"))}
        hosts = {name: lab.add_host(f"d{name}", behind=lab.add_router(f"r{name}", kind=kind))
                 for name, (kind, _) in KINDS.items()}
        rl.start_relay()
        for host in hosts.values():
            rl.start_web(host)
        rl.start_agents([rl.add_device(name, host, start=False) for name, host in hosts.items()])

    def forward(self, terminal, device, port):
        rl = self.env
        proc = terminal.popen(procs.p2pnat(
            "forward", device, "--relay", f"{rl.relay_ip}:{F.HTTPS_PORT}", "--relay-hostname",
            F.RELAY_HOSTNAME, "--ca", rl.ca, "--listen", f"127.0.0.1:{port}", "--json"),
            cwd=procs.REPO, env=procs.env())
        self.addCleanup(proc.stop)
        wait_for_log(proc, '"event": "forwarding"', timeout=20)
        return proc

    def through(self, terminal_name):
        """Every device from one terminal: 1 MB each, the path as expected."""
        terminal = self.terminals[terminal_name]
        seen = {}
        for i, (device, (_, expected)) in enumerate(KINDS.items()):
            port = 2300 + i
            fwd = self.forward(terminal, device, port)
            out = os.path.join(self.env.workdir, f"{terminal_name}-{device}.bin")
            done = terminal.run(["curl", "-sS", "--max-time", "30", "-o", out, "-w",
                                 "%{http_code} %{time_starttransfer}",
                                 f"http://127.0.0.1:{port}/mb.bin"], timeout=45)
            code, first = (done.stdout.split() + ["", ""])[:2]
            self.assertEqual((done.returncode, code), (0, "200"),
                             f"{device}: {done.stderr} {fwd.stderr()[-2000:]}")
            self.assertEqual(F.sha256_file(out), self.sha256, device)
            os.unlink(out)
            # One connection, the forward's first: a new QUIC connection
            # to the device, direct behind the cone NAT.
            paths = paths_of(fwd)
            self.assertEqual(paths, [expected], f"{terminal_name} to {device}")
            seen[device] = f"{paths[0]} {float(first):.3f}s"
        measured(", ".join(f"{d} {s}" for d, s in seen.items()))

    def test_from_the_internet(self):
        self.through("public")

    def test_from_behind_a_cone_nat(self):
        self.through("cone")


class ForwardDirectIPv6LabTests(LabTestCase):
    """
    A relay on both families; a device on IPv6 only behind a home router's
    stateful IPv6 firewall (no NAT66); a dual-stack public terminal.
    """

    tools = ("curl",)

    @classmethod
    def make_env(cls, workdir):
        return DualStackRelayLab.with_docroot(workdir)

    @classmethod
    def build(cls, rl):
        lab = rl.lab
        host = lab.add_host("dsix", behind=lab.add_router("home", kind="cone", ipv6=True),
                            ipv4=False)
        cls.terminal = lab.add_host("tdual")
        rl.start_relay()
        rl.start_web6(host)
        rl.add_ipv6_device("cam", host)

    def fetch(self, relay_ip, port):
        """The device's page through a new forward to the relay at C{relay_ip}: its path."""
        rl = self.env
        proc = self.terminal.popen(procs.p2pnat(
            "forward", "cam", "--relay", hostport(relay_ip, F.HTTPS_PORT), "--relay-hostname",
            F.RELAY_HOSTNAME, "--ca", rl.ca, "--listen", f"127.0.0.1:{port}", "--json"),
            cwd=procs.REPO, env=procs.env())
        self.addCleanup(proc.stop)
        wait_for_log(proc, '"event": "forwarding"', timeout=20)
        done = self.terminal.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/"],
                                 timeout=30, text=False)
        self.assertEqual((done.returncode, done.stdout), (0, F.INDEX),
                         f"{done.stderr!r} {proc.stderr()[-2000:]}")
        return paths_of(proc)

    def test_direct_over_ipv6(self):
        """
        Reaching the relay over IPv6, the terminal asks STUN from its IPv6
        socket and goes direct over IPv6: the device's punch opened its
        firewall.
        """
        self.assertEqual(self.fetch(self.env.relay_ip6, 2310), ["direct"])

    def test_relayed_over_ipv4(self):
        """Over IPv4 the device has no mapping of the terminal's family: relayed."""
        self.assertEqual(self.fetch(self.env.relay_ip, 2311), ["relayed"])
