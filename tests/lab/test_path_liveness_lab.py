"""
Paths that stay up, across the Linux kernel's real NATs: every pair of
symmetric NATs (sequential and random port allocation) whose conntrack UDP
timeout is 10 s, shorter than the path's starting 15 s keepalive.  Each
pair connects (``p2pnat peer connect --stay`` against ``peer wait
--echo``), says a first line, then the peers idle for 60 s and talk again:
the echo must come back within the path's detection bound.

During the idle time the first keepalives leave after the mappings timed
out, so the path dies in silence; each side must see that (``path-silent``
with the shortened ``keepalive`` in its ``--json`` events), recover over
the lobby's relay and punch again.  The lobby asks for presence
keepalives every 5 s (``--lobby-keepalive``), below the NATs' timeout,
so that it can still reach the clients.

The tests need root, ``ip``, ``nft`` and ``conntrack``; they skip
otherwise, and fail instead when the environment variable ``CI`` is set.
"""

import subprocess
import time

from tests.support.lab import p2p as P
from tests.support.lab.cases import LabTestCase, measured
from tests.support.lab.homes import add_home
from tests.support.lab.running import events, wait_event

#: The routers' conntrack UDP timeout (seconds).
UDP_TIMEOUT = 10
#: Seconds both peers stay quiet.
IDLE = 60.0
#: The path's detection bound with the default 15 s keepalive
#: (L{p2pnat.peer.health}: two keepalives and a 3 s grace).
DETECTION_BOUND = 33.0

PAIRS = [("symmetric-sequential", "symmetric-sequential"),
         ("symmetric-sequential", "symmetric-random"),
         ("symmetric-random", "symmetric-random")]


class LivenessLab(P.P2PLab):
    def start_lobby(self, timeout=20):
        """The lobby, asking for presence keepalives below the NATs' timeout."""
        return super().start_lobby("--lobby-keepalive", "5", timeout=timeout)


class IdleSymmetricPairsTests(LabTestCase):
    @classmethod
    def make_env(cls, workdir):
        return LivenessLab(workdir)

    @classmethod
    def build(cls, pl):
        for i, (a, b) in enumerate(PAIRS):
            for side, kind in (("a", a), ("b", b)):
                add_home(pl, f"{side}{i}", kind, udp_timeout=UDP_TIMEOUT)
        pl.start_lobby()
        for i in range(len(PAIRS)):
            pl.start_wait(f"b{i}", "--echo")
        for i in range(len(PAIRS)):
            pl.wait_login(f"b{i}")

    def say(self, proc, text):
        proc.popen.stdin.write(text.encode() + b"\n")
        proc.popen.stdin.flush()

    def echo_of(self, proc, text, timeout):
        return wait_event(proc, "data", timeout=timeout, where=lambda e: e.get("text") == text)

    def test_idle_60s_then_talk(self):
        pl = self.env
        started = []
        for i in range(len(PAIRS)):
            started.append(pl.start_connect(f"a{i}", f"b{i}", "--stay", "--exit-after", "150",
                                            stdin=subprocess.PIPE))
        paths = []
        for i, a in enumerate(started):
            paths.append(wait_event(a, "path", timeout=40))
            self.assertIn("keepalive", paths[-1])
            self.say(a, f"before{i}")
            self.echo_of(a, f"before{i}", 10)
        time.sleep(IDLE)
        sent = {}
        for i, a in enumerate(started):
            sent[i] = time.monotonic()
            self.say(a, f"after{i}")
        for i, a in enumerate(started):
            self.echo_of(a, f"after{i}", DETECTION_BOUND + 10)
            took = time.monotonic() - sent[i]
            a_events = events(a.stdout())
            b_events = events(pl.clients[f"b{i}"].waiter.stdout())
            silent = [e for e in a_events + b_events if e.get("event") == "path-silent"]
            modes = [e["mode"] for e in a_events if e.get("event") == "mode"]
            keepalive = [e["keepalive"] for e in a_events if "keepalive" in e]
            line = (f"{PAIRS[i][0]} -> {PAIRS[i][1]}: first path {paths[i]['mode']}, echo after"
                    f" {IDLE:g}s idle in {took:.3f}s (bound {DETECTION_BOUND:g}s); silent events"
                    f" {len(silent)}, modes {modes}, keepalive {keepalive[0]:g}s ->"
                    f" {keepalive[-1]:g}s")
            measured(line)
            self.assertLessEqual(took, DETECTION_BOUND, line)
            # The mappings timed out under the 15 s keepalive: the path went
            # silent, was seen to, and the interval was learnt below 10 s.
            self.assertTrue(silent, line)
            self.assertTrue(all(e["keepalive"] < UDP_TIMEOUT for e in silent), line)
            if P.expect_direct(*PAIRS[i]):
                self.assertEqual(modes[-1:], ["direct"], line)
