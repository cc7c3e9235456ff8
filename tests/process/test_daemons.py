"""
The three daemons as real processes (``twistd -n`` from this source tree,
each with its ``etc/`` config file and command-line overrides for ports and
state), on loopback only:

- every kind of bad datagram sent to a daemon's UDP port (empty, truncated,
  oversized, wrong MAC, unknown ID, replayed, garbage) is dropped with a log
  line naming the reason, and the daemon keeps serving;
- Debian's ``stun`` client gets its mapped address from a running lobby;
- a device agent reports to a running relay;
- SIGTERM stops each daemon cleanly (status 0, no traceback);
- a bad config (missing file, unknown key, bad value, unusable path) is one
  line on stderr naming the file and the key, and status 1.

Every process is killed in a cleanup, and a failure message carries the
output of the daemons its test started.  Ports are chosen by the kernel
(port 0) and read back from the daemons' logs, so tests cannot collide on a
port.
"""

import collections
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from p2pnat.protocol import p2p as M
from p2pnat.protocol import stun, wire
from tests.support import procs
from tests.support.procs import provision

ETC = os.path.join(procs.REPO, "etc")
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 30.0  # seconds; a cold start of twistd takes 1-2 s here
REPLY_TIMEOUT = 3.0
STUN_CLIENT = shutil.which("stun")


def now_us():
    """A frame timestamp on the daemons' clock (same host, same clock)."""
    return int(time.time() * 1_000_000)


def read_key(path):
    with open(path) as f:
        return bytes.fromhex(f.read().strip())


class Daemon:
    """
    One ``twistd -n DAEMON`` process, its standard output and error going
    to a file under the test's temporary directory.
    """

    def __init__(self, testcase, name, args, argv=None, cwd=procs.REPO, env=None):
        self.testcase = testcase
        self.name = name
        self.log_path = os.path.abspath(testcase.mktemp()) + f"-{name}.log"
        argv = argv or procs.twistd(name, *args)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env or procs.env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        testcase.addCleanup(self.kill)
        testcase.daemons.append(self)

    def output(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def report(self):
        status = self.proc.poll()
        state = "running" if status is None else f"exit status {status}"
        return f"\n--- {self.name} (pid {self.proc.pid}, {state}) output ---\n{self.output()}"

    def wait_for(self, pattern, timeout=STARTUP_TIMEOUT, start=0):
        """
        Wait until the output (from offset C{start}) matches the regular
        expression C{pattern}; return the match.  Fails if the daemon
        exits first or C{timeout} seconds pass.
        """
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            m = regex.search(self.output(), start)
            if m:
                return m
            if self.proc.poll() is not None:
                self.testcase.fail(f"{self.name} exited before logging {pattern!r}")
            if time.monotonic() > deadline:
                self.testcase.fail(f"{self.name} did not log {pattern!r} in {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout=15.0):
        """SIGTERM the daemon and wait for it; return its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.testcase.fail(f"{self.name} still running {timeout}s after SIGTERM")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Client:
    """A UDP socket on loopback with a bounded wait for answers."""

    def __init__(self, testcase):
        self.testcase = testcase
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        testcase.addCleanup(self.sock.close)
        self.sock.bind((LOOPBACK, 0))
        self.address = self.sock.getsockname()

    def send(self, data, to):
        self.sock.sendto(data, to)

    def receive(self, timeout=REPLY_TIMEOUT, accept=lambda data, addr: True):
        """
        The next datagram C{accept} takes, or None after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                return None
            if accept(data, addr):
                return data

    def drain(self):
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recvfrom(65536)
        except BlockingIOError:
            pass

    def stun(self, to):
        """A STUN Binding request answered by C{to}: the mapped address."""
        for attempt in range(3):
            tid, request = stun.binding_request()
            self.send(request, to)
            answer = self.receive(accept=lambda data, addr: addr == to and data[:1] < b"\x04"
                                  and data[8:20] == tid)
            if answer is not None:
                return stun.parse_binding_response(answer, tid).mapped
        self.testcase.fail(f"no STUN answer from {to}")

    def exchange(self, request, to, key, key_id, answer_type):
        """
        Send a sealed frame and return the C{answer_type} message that
        answers it (checked with C{key}), or None.
        """
        def ours(data, addr):
            return (addr == to and len(data) > 2 and data[0] == wire.MARKER
                    and data[2] == answer_type.TYPE)

        self.send(request, to)
        data = self.receive(accept=ours)
        if data is None:
            return None
        frame, message = wire.unseal(data, lambda kid, t: key if kid == key_id else None)
        return message


#: Command-line overrides that keep a daemon on loopback, on ports of its
#: own: for the daemons the tests start, and should a bad-config case start
#: after all.  The command line is applied after the file, so they do not
#: hide an error in the file.
LOOPBACK_ONLY = {
    "relay": ["--udp-listen", f"{LOOPBACK}:0", "--terminal-https", f"tcp:0:interface={LOOPBACK}",
              "--tunnel-listen", f"tcp:0:interface={LOOPBACK}"],
    "lobby": ["--udp-listen", f"{LOOPBACK}:0"],
    "device-agent": ["--udp-listen", f"{LOOPBACK}:0", "--agent-relay", f"{LOOPBACK}:9"],
}


class DaemonTestCase(SynchronousTestCase):
    """
    Starts daemons; a failure message carries the output of every daemon
    the test started.
    """

    def setUp(self):
        self.daemons = daemons = []

        class FailWithOutput(FailTest):
            def __init__(self, message=None):
                super().__init__(f"{message}{''.join(d.report() for d in daemons)}")

        self.failureException = FailWithOutput

    def start(self, name, *args, **kw):
        return Daemon(self, name, args, **kw)

    def tmpdir(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def start_lobby_on_loopback(self, state):
        """
        ``twistd lobby`` with etc/lobby.toml and state directory C{state},
        on a free loopback UDP port: C{(daemon, port)} once it listens.
        """
        lobby = self.start("lobby", "--config", os.path.join(ETC, "lobby.toml"),
                           "--lobby-state-dir", state, "--udp-listen", f"{LOOPBACK}:0")
        return lobby, int(lobby.wait_for(r"ControlProtocol starting on (\d+)").group(1))

    def provision_device(self, relay="127.0.0.1:7478"):
        """
        A relay state directory with device dev-1 registered, its bundle
        pointing at C{relay}: (state directory, bundle directory).
        """
        state = os.path.join(self.tmpdir(), "relay")
        provision("relay", "init", "--state-dir", state, "--hostname", "relay.localhost")
        bundle = os.path.join(self.tmpdir(), "dev-1")
        provision("device", "add", "dev-1", "--state-dir", state, "--relay", relay,
                  "--service", "127.0.0.1:9", "--out", bundle)
        return state, bundle

    def start_relay(self):
        """
        ``twistd relay`` with etc/relay.toml on loopback, dev-1 registered:
        (the daemon, its UDP address, dev-1's MAC key, dev-1's bundle).
        """
        state, bundle = self.provision_device()
        relay = self.start("relay", "--config", os.path.join(ETC, "relay.toml"),
                           "--relay-state-dir", state, *LOOPBACK_ONLY["relay"])
        m = relay.wait_for(r"relay relay\.localhost: 1 devices registered; notifies on"
                           r" 127\.0\.0\.1:(\d+); terminals on https port \d+;"
                           r" tunnels on port \d+")
        udp = (LOOPBACK, int(m.group(1)))
        return relay, udp, read_key(os.path.join(bundle, "mac.key")), bundle

    def assert_clean_stop(self, daemon):
        """
        SIGTERM stops C{daemon} cleanly: its services stop, the reactor
        ends, no traceback.

        twistd re-raises the signal once it has shut down (so that its
        parent sees how it ended), hence a status of -SIGTERM, 143 in a
        shell; systemd counts that as a clean stop.  0 would do as well.
        """
        status = daemon.stop()
        output = daemon.output()
        self.assertIn(status, (0, -signal.SIGTERM), f"{daemon.name} exit status after SIGTERM")
        self.assertIn("Received SIGTERM, shutting down.", output)
        self.assertIn("Main loop terminated.", output)
        self.assertIn("Server Shut Down.", output)
        self.assertNotIn("Traceback", output)

    def assert_dropped(self, daemon, source, reasons, timeout=REPLY_TIMEOUT):
        """
        Each of C{reasons} (one per datagram sent from C{source}) has its
        own log line ``dropped datagram from SOURCE: REASON``.  The daemon
        logs them as they arrive, so wait a little for the last ones.
        """
        prefix = re.escape(f"dropped datagram from {source[0]}:{source[1]}: ")
        expected = collections.Counter(reasons)
        deadline = time.monotonic() + timeout
        while True:
            output = daemon.output()
            missing = {reason: n for reason, n in expected.items()
                       if len(re.findall(prefix + re.escape(reason) + r"\b", output)) < n}
            if not missing:
                return
            if time.monotonic() > deadline:
                self.fail(f"{daemon.name} logged no drop (or too few) for {missing}")
            time.sleep(0.05)

    def assert_all_dropped(self, daemon, client, to, cases):
        """
        C{client} sends each datagram of C{cases} (name: (data, reason)) to
        C{daemon} at address C{to}: each is dropped with its reason logged,
        and none is answered.
        """
        for data, _ in cases.values():
            client.send(data, to)
        self.assert_dropped(daemon, client.address, [reason for _, reason in cases.values()])
        self.assertIsNone(client.receive(timeout=0.2))

    def assert_no_errors(self, daemon):
        output = daemon.output()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("internal-error", output)
        self.assertIsNone(daemon.proc.poll(), f"{daemon.name} exited")


def garbage_cases(genuine, wrong_mac, unknown_id):
    """
    The bad datagrams every daemon must drop, with the reason each is
    logged under.  C{genuine} is a genuine frame (cut short here),
    C{wrong_mac} a well-formed frame for a registered ID under the wrong
    key, C{unknown_id} one for an ID the daemon does not know.
    """
    rng = random.Random(20240601)
    noise = bytes([0xA5]) + rng.randbytes(99)  # not STUN, not ours (RFC 7983)
    framed_noise = bytes([wire.MARKER]) + rng.randbytes(60)
    try:
        wire.parse(framed_noise)
    except wire.WireError as e:
        framed_reason = e.reason
    else:
        raise AssertionError("the random frame parsed; pick another seed")
    return {
        "empty": (b"", "empty"),
        "truncated": (genuine[:20], "truncated"),
        "cut at the MAC": (genuine[:-1], "bad-length"),
        "oversized": (bytes(2000), "oversized"),
        "wrong MAC": (wrong_mac, "bad-mac"),
        "unknown ID": (unknown_id, "unknown-key"),
        "random garbage": (noise, "unknown-protocol"),
        "random bytes behind our marker": (framed_noise, framed_reason),
    }


class RelayProcessTests(DaemonTestCase):
    """``twistd relay`` with etc/relay.toml."""

    def test_bad_datagrams_dropped_and_logged(self):
        """
        Every bad datagram is dropped with a log line naming its reason;
        a replayed notify is refused; afterwards the relay still answers
        STUN and a genuine period request.
        """
        relay, udp, key, _ = self.start_relay()
        client = Client(self)
        self.assertEqual(client.stun(udp), client.address)

        def notify_a():
            return wire.seal(wire.NotifyA(local=client.address), "dev-1", key, now_us())

        genuine = notify_a()
        ack = client.exchange(genuine, udp, key, "dev-1", wire.NotifyAck)
        self.assertIsInstance(ack, wire.NotifyAck)
        self.assertEqual(ack.observed, client.address)
        relay.wait_for(re.escape(f"device dev-1 online at {client.address[0]}:"
                                 f"{client.address[1]}"))

        cases = garbage_cases(
            genuine,
            wrong_mac=wire.seal(wire.NotifyA(local=client.address), "dev-1", bytes(32),
                                now_us()),
            unknown_id=wire.seal(wire.NotifyA(local=client.address), "dev-2", key, now_us()))
        cases["replayed notify"] = (genuine, "replay")
        self.assert_all_dropped(relay, client, udp, cases)

        # Still serving.
        self.assertEqual(client.stun(udp), client.address)
        stamp = now_us()
        period = client.exchange(wire.seal(wire.PeriodRequest(), "dev-1", key, stamp), udp, key,
                                 "dev-1", wire.Period)
        self.assertIsInstance(period, wire.Period)
        self.assertEqual((period.period, period.notify_b_max, period.echo), (300, 20, stamp))
        ack = client.exchange(notify_a(), udp, key, "dev-1", wire.NotifyAck)
        self.assertEqual(ack.observed, client.address)
        self.assert_no_errors(relay)

    def test_sigterm_stops_cleanly(self):
        relay, udp, key, _ = self.start_relay()
        self.assertEqual(Client(self).stun(udp)[0], LOOPBACK)
        self.assert_clean_stop(relay)


class LobbyProcessTests(DaemonTestCase):
    """``twistd lobby`` with etc/lobby.toml."""

    def start_lobby(self):
        state = os.path.join(self.tmpdir(), "lobby")
        bundle = os.path.join(self.tmpdir(), "cl-1")
        provision("client", "add", "cl-1", "--state-dir", state, "--lobby", "127.0.0.1:3478",
                  "--out", bundle)
        lobby, port = self.start_lobby_on_loopback(state)
        return lobby, (LOOPBACK, port), read_key(os.path.join(bundle, "mac.key"))

    def test_bad_datagrams_dropped_and_logged(self):
        """
        Every bad datagram is dropped with a log line naming its reason; a
        replayed keepalive is refused; afterwards the lobby still answers
        STUN, a client's ping and its keepalive.
        """
        lobby, udp, key = self.start_lobby()
        client = Client(self)
        self.assertEqual(client.stun(udp), client.address)
        stamp = now_us()
        welcome = client.exchange(wire.seal(M.Login(local=client.address), "cl-1", key, stamp),
                                  udp, key, "cl-1", M.Welcome)
        self.assertIsInstance(welcome, M.Welcome)
        self.assertEqual((welcome.echo, welcome.observed), (stamp, client.address))
        lobby.wait_for(re.escape(f"client cl-1 logged in from {client.address[0]}:"
                                 f"{client.address[1]}"))
        genuine = wire.seal(M.Keepalive(), "cl-1", key, now_us())
        self.assertIsInstance(client.exchange(genuine, udp, key, "cl-1", M.Welcome), M.Welcome)

        cases = garbage_cases(
            genuine,
            wrong_mac=wire.seal(M.Keepalive(), "cl-1", bytes(32), now_us()),
            unknown_id=wire.seal(M.Keepalive(), "cl-2", key, now_us()))
        cases["client sending a device's message"] = (
            wire.seal(wire.NotifyA(local=client.address), "cl-1", key, now_us()), "unknown-key")
        cases["replayed keepalive"] = (genuine, "replay")
        self.assert_all_dropped(lobby, client, udp, cases)

        # Still serving.
        self.assertEqual(client.stun(udp), client.address)
        stamp = now_us()
        pong = client.exchange(wire.seal(wire.Ping(), "cl-1", key, stamp), udp, key, "cl-1",
                               wire.Pong)
        self.assertIsInstance(pong, wire.Pong)
        self.assertEqual((pong.echo, pong.observed), (stamp, client.address))
        welcome = client.exchange(wire.seal(M.Keepalive(), "cl-1", key, now_us()), udp, key,
                                  "cl-1", M.Welcome)
        self.assertEqual(welcome.observed, client.address)
        self.assert_no_errors(lobby)

    def test_debian_stun_client(self):
        """
        ``stun 127.0.0.1:PORT -v`` (Debian's stun-client, a classic RFC
        3489 client) reports its own address as the mapped address.
        """
        if STUN_CLIENT is None:
            raise SkipTest("Debian's stun client is not installed (apt-get install stun-client)")
        lobby, udp, key = self.start_lobby()
        Client(self).stun(udp)  # the lobby is serving
        try:
            run = subprocess.run([STUN_CLIENT, f"{udp[0]}:{udp[1]}", "-v"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=30)
        except subprocess.TimeoutExpired as e:
            self.fail(f"stun did not finish in 30s:\n{e.output}")
        text = run.stdout.decode("utf-8", "replace")
        # The client's exit status is a bit field describing the NAT, not an
        # error indication, so only its output is checked.
        mapped = re.findall(r"MappedAddress = (127\.0\.0\.1):(\d+)", text)
        self.assertTrue(mapped, f"no MappedAddress in the stun client's output:\n{text}")
        opened = re.findall(r"Opened port (\d+)", text)
        self.assertEqual(mapped[0][1], opened[0], text)
        self.assert_no_errors(lobby)

    def test_sigterm_stops_cleanly(self):
        lobby, udp, key = self.start_lobby()
        self.assertEqual(Client(self).stun(udp)[0], LOOPBACK)
        self.assert_clean_stop(lobby)


class AgentProcessTests(DaemonTestCase):
    """
    ``twistd device-agent`` with etc/device-agent.toml.  The agent only
    answers its relay, so here the test plays the relay: it answers the
    agent's period request and watches its notifies.
    """

    def start_agent(self, relay):
        _, bundle = self.provision_device(f"{relay[0]}:{relay[1]}")
        in_bundle = lambda name: os.path.join(bundle, name)  # noqa: E731
        agent = self.start(
            "device-agent", "--config", os.path.join(ETC, "device-agent.toml"),
            "--agent-device-id", "dev-1", "--agent-relay", f"{relay[0]}:{relay[1]}",
            "--agent-relay-hostname", "relay.localhost",
            "--agent-mac-key-file", in_bundle("mac.key"),
            "--agent-cert-file", in_bundle("device.crt"),
            "--agent-key-file", in_bundle("device.key"),
            "--agent-ca-file", in_bundle("ca.crt"),
            "--agent-service", "127.0.0.1:9", "--udp-listen", f"{LOOPBACK}:0")
        port = int(agent.wait_for(r"ControlProtocol starting on (\d+)").group(1))
        agent.wait_for(re.escape(f"device dev-1 reporting to relay {relay[0]}:{relay[1]}"))
        return agent, (LOOPBACK, port), read_key(in_bundle("mac.key"))

    def next_from_agent(self, relay, agent_udp, key, types, timeout=REPLY_TIMEOUT):
        """The next genuine frame of one of C{types} the agent sends the relay."""
        def genuine(data, addr):
            if addr != agent_udp:
                return False
            try:
                frame, message = wire.unseal(data, lambda kid, t: key if kid == "dev-1" else None)
            except wire.WireError:
                return False
            return isinstance(message, types)

        data = relay.receive(timeout=timeout, accept=genuine)
        if data is None:
            self.fail(f"no {' or '.join(t.__name__ for t in types)} from the agent in {timeout}s")
        return wire.unseal(data, lambda kid, t: key)

    def answer_period(self, relay, agent_udp, key):
        """Answer the agent's period request: notify A and B every second."""
        frame, request = self.next_from_agent(relay, agent_udp, key, (wire.PeriodRequest,))
        relay.send(wire.seal(wire.Period(3, 1, now_us(), frame.timestamp), "dev-1", key,
                             now_us()), agent_udp)

    def test_bad_datagrams_dropped_and_logged(self):
        """
        Every bad datagram sent to the agent's notify socket is dropped
        with a log line naming its reason (a replayed genuine ack too), and
        the agent goes on sending notifies.
        """
        relay = Client(self)
        agent, agent_udp, key = self.start_agent(relay.address)
        self.answer_period(relay, agent_udp, key)
        agent.wait_for(r"access-check period 3s; notify A every 1s, notify B every 1s")
        self.next_from_agent(relay, agent_udp, key, (wire.NotifyA, wire.NotifyB))

        other = Client(self)

        def ack():
            return wire.seal(wire.NotifyAck(now_us(), agent_udp, 0), "dev-1", key, now_us())

        # A genuine ack from the relay, then the bad datagrams from elsewhere
        # (its replay among them).
        genuine = ack()
        relay.send(genuine, agent_udp)
        agent.wait_for(re.escape(f"public address is {agent_udp[0]}:{agent_udp[1]}"))
        cases = garbage_cases(
            genuine,
            wrong_mac=wire.seal(wire.NotifyAck(now_us(), agent_udp, 0), "dev-1", bytes(32),
                                now_us()),
            unknown_id=wire.seal(wire.NotifyAck(now_us(), agent_udp, 0), "dev-2", key,
                                 now_us()))
        cases["STUN request (the agent answers none)"] = (stun.binding_request()[1],
                                                          "stun-disabled")
        cases["replayed ack"] = (genuine, "replay")
        self.assert_all_dropped(agent, other, agent_udp, cases)

        # The agent still sends genuine notifies, newer than any before.
        relay.drain()
        before = now_us() - 1_000_000
        for _ in range(3):
            frame, message = self.next_from_agent(relay, agent_udp, key,
                                                  (wire.NotifyA, wire.NotifyB))
            self.assertGreater(frame.timestamp, before)
            before = frame.timestamp
        self.assert_no_errors(agent)

    def test_sigterm_stops_cleanly(self):
        relay = Client(self)
        agent, agent_udp, key = self.start_agent(relay.address)
        self.answer_period(relay, agent_udp, key)
        self.next_from_agent(relay, agent_udp, key, (wire.NotifyA, wire.NotifyB))
        self.assert_clean_stop(agent)


class AgentWithRelayTests(DaemonTestCase):
    """A device agent started from its `p2pnat device add` bundle reports to a relay."""

    def test_device_online_at_relay(self):
        relay, (_, udp_port), _, bundle = self.start_relay()
        # The relay's port is only known now: the bundle's file, its port overridden.
        agent = self.start("device-agent", "--config", os.path.join(bundle, "agent.toml"),
                           "--agent-relay", f"{LOOPBACK}:{udp_port}",
                           "--udp-listen", f"{LOOPBACK}:0")
        agent_port = int(agent.wait_for(r"ControlProtocol starting on (\d+)").group(1))
        relay.wait_for(re.escape(f"device dev-1 online at {LOOPBACK}:{agent_port}"))
        agent.wait_for(re.escape(f"relay {LOOPBACK}:{udp_port} access-check period 300s"))
        agent.wait_for(re.escape(f"public address is {LOOPBACK}:{agent_port}"))
        self.assert_clean_stop(agent)
        self.assert_clean_stop(relay)


class BadConfigTests(DaemonTestCase):
    """
    A config error is one line on stderr, ``twistd DAEMON: FILE: KEY:
    what``, nothing on stdout, status 1, never a traceback.
    """

    def write(self, name, text):
        path = os.path.join(self.tmpdir(), name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def etc_with(self, daemon, old, new):
        """The daemon's etc/ config file with C{old} replaced by C{new}."""
        with open(os.path.join(ETC, f"{daemon}.toml")) as f:
            text = f.read()
        self.assertIn(old, text)
        return self.write(f"{daemon}.toml", text.replace(old, new, 1))

    @staticmethod
    def reap(p):
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)

    def run_all(self, cases):
        """
        Run each case's twistd at once (they are independent) and check
        the result of each: C{cases} is a list of ``(daemon, args, the
        words the one line must contain)``.
        """
        running = []
        for daemon, args, words in cases:
            # Should a case start after all, it listens on loopback only.
            args = [*args, *LOOPBACK_ONLY[daemon]]
            p = subprocess.Popen(procs.twistd(daemon, *args), cwd=procs.REPO, env=procs.env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            self.addCleanup(self.reap, p)
            running.append((p, daemon, args, words))
        for p, daemon, args, words in running:
            try:
                out, err = p.communicate(timeout=STARTUP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                self.fail(f"twistd {daemon} {args} still running after {STARTUP_TIMEOUT}s:"
                          f"\n{out.decode()}{err.decode()}")
            out, err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
            what = f"twistd {daemon} {' '.join(args)}:\nstdout: {out!r}\nstderr: {err!r}"
            self.assertEqual(p.returncode, 1, what)
            self.assertNotIn("Traceback", out + err, what)
            self.assertEqual(out, "", what)
            self.assertTrue(err.endswith("\n") and err.count("\n") == 1, what)
            self.assertTrue(err.startswith(f"twistd {daemon}: "), what)
            for word in words:
                self.assertIn(word, err, what)

    def test_config_file_errors(self):
        """A missing file, an unknown key or a bad value, for each daemon."""
        cases = []
        bad_values = {
            "relay": ("access_check_period = 300", 'access_check_period = "300"',
                      "relay.access_check_period"),
            "lobby": ('listen = ["0.0.0.0:3478", "0.0.0.0:3479"]',
                      'listen = ["localhost:3478"]', "udp.listen"),
            "device-agent": ("notify_b_interval = 20.0", "notify_b_interval = 0",
                             "agent.notify_b_interval"),
        }
        for daemon, (old, new, key) in bad_values.items():
            missing = os.path.join(self.tmpdir(), "missing.toml")
            cases.append((daemon, ["--config", missing], [missing, "no such config file"]))
            unknown = self.etc_with(daemon, "[log]\n", "[log]\nlevle = \"debug\"\n")
            cases.append((daemon, ["--config", unknown], [unknown, "log.levle", "unknown key"]))
            bad = self.etc_with(daemon, old, new)
            cases.append((daemon, ["--config", bad], [bad, key]))
        self.run_all(cases)

    def test_command_line_errors(self):
        """A bad value on the command line names its option."""
        etc = lambda daemon: os.path.join(ETC, f"{daemon}.toml")  # noqa: E731
        self.run_all([
            ("relay", ["--config", etc("relay"), "--relay-access-check-period", "-5"],
             ["--relay-access-check-period", "relay.access_check_period", "positive"]),
            ("lobby", ["--config", etc("lobby"), "--udp-stun-rate", "fast"],
             ["--udp-stun-rate", "udp.stun_rate"]),
            ("device-agent", ["--config", etc("device-agent"), "--log-level", "loud"],
             ["--log-level", "log.level"]),
        ])

    def test_agent_key_file_missing(self):
        """A file the config names is missing: the agent's MAC key."""
        state = os.path.join(self.tmpdir(), "relay")
        provision("relay", "init", "--state-dir", state, "--hostname", "relay.localhost")
        bundle = os.path.join(self.tmpdir(), "dev-1")
        provision("device", "add", "dev-1", "--state-dir", state, "--relay", "127.0.0.1:7478",
                  "--service", "127.0.0.1:9", "--out", bundle)
        os.unlink(os.path.join(bundle, "mac.key"))
        agent_toml = os.path.join(bundle, "agent.toml")
        self.run_all([("device-agent", ["--config", agent_toml],
                       [agent_toml, "agent.mac_key_file", os.path.join(bundle, "mac.key"),
                        "no such file"])])

    def test_state_dir_unusable(self):
        """
        A state directory that cannot be made (its parent is a file) is a
        bad value: the line names the config file and the key.
        """
        a_file = self.write("not-a-directory", "")
        relay_toml = self.etc_with("relay", 'state_dir = "/var/lib/p2pnat/relay"',
                                   f"state_dir = {os.path.join(a_file, 'relay')!r}")
        lobby_toml = self.etc_with("lobby", 'state_dir = "/var/lib/p2pnat/lobby"',
                                   f"state_dir = {os.path.join(a_file, 'lobby')!r}")
        self.run_all([
            ("relay", ["--config", relay_toml], [relay_toml, "relay.state_dir"]),
            ("lobby", ["--config", lobby_toml], [lobby_toml, "lobby.state_dir"]),
        ])

