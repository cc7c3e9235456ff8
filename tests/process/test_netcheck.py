"""
``p2pnat netcheck`` as a process against a real ``twistd lobby`` (two
ports on each of two loopback IPs, and ``::1``) and a real ``twistd
relay``, all on loopback: no NAT there, so the verdict is "no NAT" with
every test run, in well under 3 s.  And what it says when there is no
server to ask, or nobody answers.

Port mapping is never asked for here (``--no-portmap``): its probe would
look for the machine's real gateway.
"""

import json
import os
import re
import socket
import subprocess
import time

from tests.process.test_daemons import ETC, DaemonTestCase
from tests.process.test_stun_interop import _ipv6_loopback
from tests.support import procs
from tests.support.lab.cases import measured
from tests.support.procs import provision

LOOPBACK, OTHER = "127.0.0.1", "127.0.0.2"


class NetcheckProcessTests(DaemonTestCase):
    def start_lobby(self, v6=False):
        """
        ``twistd lobby`` on two ports of each of two loopback IPs (and
        ``::1``); its UDP addresses in the order of ``--udp-listen``, and
        the state directory.
        """
        state = os.path.join(self.tmpdir(), "lobby")
        listen = [f"{LOOPBACK}:0", f"{LOOPBACK}:0", f"{OTHER}:0", f"{OTHER}:0"]
        if v6:
            listen.append("[::1]:0")
        lobby = self.start("lobby", "--config", os.path.join(ETC, "lobby.toml"),
                           "--lobby-state-dir", state, "--udp-listen", ",".join(listen))
        lobby.wait_for("(ControlProtocol starting on \\d+.*\n.*){%d}" % len(listen))
        # The sockets start in the order given.
        ports = [int(p) for p in re.findall(r"ControlProtocol starting on (\d+)",
                                            lobby.output())]
        hosts = [a.rpartition(":")[0].strip("[]") for a in listen]
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(hosts, ports)], state

    def netcheck(self, *args, timeout=30):
        t0 = time.monotonic()
        done = subprocess.run(procs.p2pnat("netcheck", *args), cwd=procs.REPO, env=procs.env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
        self.assertNotIn("Traceback", done.stderr)
        return done, time.monotonic() - t0

    def test_no_nat_json(self):
        """
        Every verdict on loopback: no NAT, nothing filtered (the lobby
        answers from its other IP and port), hairpinning, both families
        reachable, a latency for the lobby and the relay, direct paths with
        every kind of peer; under 3 s from start to exit.
        """
        v6 = _ipv6_loopback()
        addrs, _ = self.start_lobby(v6)
        _, relay_udp, _, _ = self.start_relay()
        # Primary, other IP, both other, other port.
        lobbies = [addrs[0], addrs[2], addrs[3], addrs[1]] + addrs[4:]
        args = [a for addr in lobbies for a in ("--lobby", addr)]
        done, wall = self.netcheck(*args, "--relay", f"{relay_udp[0]}:{relay_udp[1]}",
                                   "--no-portmap", "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        r = json.loads(done.stdout)
        measured(f"{r['elapsed']:.2f} s measuring, {wall:.2f} s in all")
        self.assertLess(wall, 3.0)
        nat = r["nat"]
        self.assertEqual((nat["kind"], nat["mapping"], nat["filtering"], nat["allocation"]),
                         ("no-nat", "none", "none", "preserving"), nat)
        self.assertEqual(nat["public"], nat["local"])
        self.assertEqual(nat["notes"], [])
        self.assertIs(r["hairpin"], True)
        self.assertIsNone(r["lifetime"])
        self.assertTrue(r["ipv4"]["reachable"])
        self.assertEqual(r["ipv4"]["public"].rpartition(":")[0], LOOPBACK)
        self.assertEqual(r["ipv6"]["reachable"], True if v6 else None)
        self.assertIsNone(r["portmap"])
        self.assertEqual(r["portmap_note"], "turned off by --no-portmap")
        roles = [(s["role"], s["family"]) for s in r["servers"]]
        self.assertEqual(roles, [("lobby", "ipv4")] * 4 + [("lobby", "ipv6")] * v6
                         + [("relay", "ipv4")])
        for s in r["servers"]:
            self.assertTrue(s["reachable"], s)
            self.assertEqual((s["answered"], s["asked"]), (3, 3), s)
            self.assertLess(s["latency_ms"], 100, s)
        self.assertEqual({p["peer"]: p["strategy"] for p in r["paths"]},
                         {"no-nat": "direct", "cone": "direct", "symmetric-sequential": "direct",
                          "symmetric-random": "direct"})
        self.assertEqual(r["notes"], [])
        self.assertTrue(r["summary"].startswith("No NAT"), r["summary"])

    def test_text_from_config(self):
        """
        With a client's config the lobby is its ``client.lobby`` and
        discovery uses its ``client.discovery``; the report is plain text.
        """
        addrs, state = self.start_lobby()
        bundle = os.path.join(self.tmpdir(), "alice")
        provision("client", "add", "alice", "--state-dir", state, "--lobby", addrs[0],
                  "--out", bundle)
        config = os.path.join(bundle, "client.toml")
        order = [addrs[0], addrs[2], addrs[3], addrs[1]]
        with open(config, "a") as f:
            f.write("discovery = [%s]\n" % ", ".join(f'"{a}"' for a in order))
        done, wall = self.netcheck("--config", config, "--no-portmap")
        self.assertEqual(done.returncode, 0, done.stderr)
        text = done.stdout
        for line in ("No NAT: this host's own address is its public one, nothing filtered;"
                     " direct paths with every kind of peer.\n",
                     "NAT:           no-nat (",
                     "  filtering:   none\n",
                     "  hairpinning: yes\n",
                     "IPV4:          yes, as 127.0.0.1:",
                     "Port mapping:  not tested (turned off by --no-portmap)\n",
                     f"  lobby {addrs[0]}: ",
                     "Paths p2pnat peer connect will take, with:\n",
                     "  a peer behind a symmetric NAT with random ports: direct; "):
            self.assertIn(line, text)
        self.assertLess(wall, 3.0)

    def test_nobody_answers(self):
        """A lobby address where nothing listens: status 1 after about a second."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            # Bound but never read: nothing answers, nothing is refused.
            done, wall = self.netcheck("--lobby", f"{LOOPBACK}:{port}", "--no-portmap")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("No server answered: nothing could be measured.", done.stdout)
        self.assertIn(f"the lobby at {LOOPBACK}:{port} did not answer", done.stdout)
        self.assertLess(wall, 3.0)

    def test_no_server(self):
        """Nothing to ask: one line naming --lobby, status 2."""
        done, _ = self.netcheck("--no-portmap")
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stdout, "")
        self.assertEqual(done.stderr.strip(),
                         "p2pnat netcheck: no server to measure against: give --lobby HOST:PORT"
                         " (a p2pnat lobby's UDP address) or --config client.toml (from"
                         " `p2pnat client add`)")
        done, _ = self.netcheck("--lobby", "nowhere", "--no-portmap")
        self.assertEqual(done.returncode, 2)
        self.assertIn("--lobby nowhere: expected host:port", done.stderr)
        done, _ = self.netcheck("--lobby", "127.0.0.1:1", "--budget", "99")
        self.assertEqual(done.returncode, 2)
        self.assertIn("--budget must be 0.5-30 seconds", done.stderr)
