"""
The relay's protocol state machines with no transport at all: every input
is handled in every state, an unexpected one is logged and changes
nothing, and the machines' main paths driven by hand.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import tunnel
from p2pnat.relay import access
from p2pnat.relay.core import Timeouts, TunnelRequest
from p2pnat.relay.machine import MachineBuilder
from p2pnat.relay.terminal_machine import TerminalCore, TerminalInputs, TerminalMachine
from p2pnat.relay.tunnel_machine import TunnelCore, TunnelInputs, TunnelMachine


def handled(machine):
    automaton = machine.__automat_automaton__
    return {(state.name, symbol) for state, symbol, _, _ in automaton.allTransitions()}


def inputs_of(protocol):
    return {name for name in vars(protocol) if not name.startswith("_")
            and callable(getattr(protocol, name))}


class CompletenessTests(SynchronousTestCase):
    def test_every_input_in_every_state(self):
        for machine, protocol, states in [
                (TerminalMachine, TerminalInputs,
                 {"head", "body", "auth", "waiting", "stream", "check", "finishing", "done"}),
                (TunnelMachine, TunnelInputs,
                 {"hello", "idle", "opening", "stream", "draining", "answering", "closed"})]:
            pairs = handled(machine)
            self.assertEqual({s for s, _ in pairs}, states)
            self.assertEqual(pairs, {(s, i) for s in states for i in inputs_of(protocol)})

    def test_builder_fills_the_gaps(self):
        from typing import Protocol

        class Inputs(Protocol):
            def go(self) -> None: ...
            def stop(self) -> None: ...
            def state(self) -> str: ...

        class Core:
            def __init__(self):
                self.seen = []

        b = MachineBuilder(Inputs, Core)
        a, z = b.state("a"), b.state("z")
        b.on(a, Inputs.go, to=z)(lambda m, c: c.seen.append("went"))
        b.ignore(z, Inputs.go)
        machine = b.build(lambda core, state, input: core.seen.append((state, input)))
        core = Core()
        m = machine(core)
        m.stop()
        m.go()
        m.go()
        m.stop()
        self.assertEqual(core.seen, [("a", "stop"), "went", ("z", "stop")])
        self.assertEqual(m.state(), "z")


class FakeTerminalIO:
    def __init__(self):
        self.written = []
        self.closed = self.aborted = self.paused = False
        self.send = None

    def write(self, data):
        self.written.append(data)

    def close_connection(self):
        self.closed = True

    def abort_connection(self):
        self.aborted = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def peer(self):
        return "192.0.2.1:1"

    def stream_to(self, send):
        self.send = send


class FakeRelay:
    """The parts of IRelay the machines call, recording the calls."""

    hostname = "relay.test"
    trusted_proxies = access.NO_PROXIES

    def __init__(self):
        self.clock = Clock()
        self.timeouts = Timeouts()
        self.calls = []
        self.requests = []
        self.devices = {}

    def count(self, outcome):
        self.calls.append(("count", outcome))

    def reachable(self, device_id):
        return self.devices[device_id]

    def request_tunnel(self, device_id, reuse=True):
        d = Deferred()
        req = TunnelRequest(d, lambda: self.calls.append(("cancel", device_id)))
        self.requests.append(req)
        return req

    def __getattr__(self, name):
        # terminal_opened, terminal_streaming, terminal_closed, tunnel_idle, ...
        if name.startswith(("terminal_", "tunnel_", "claim")):
            return lambda *args: self.calls.append((name,) + args)
        raise AttributeError(name)


class Device:
    access_mode = "device"


class FakeTunnel:
    def __init__(self):
        self.calls = []

    def start_stream(self, terminal, service, reused):
        self.calls.append(("start", service, reused))

    def send_data(self, data):
        self.calls.append(("data", data))

    def send_end(self):
        self.calls.append(("end",))

    def give_back(self):
        self.calls.append(("give_back",))


class TerminalMachineTests(SynchronousTestCase):
    def setUp(self):
        self.relay = FakeRelay()
        self.relay.devices["cam"] = Device()
        self.io = FakeTerminalIO()
        self.core = TerminalCore(self.relay, self.io, secure=True)
        self.m = self.core.machine = TerminalMachine(self.core)

    def test_to_stream_and_back(self):
        self.m.data(b"CONNECT cam:ssh HTTP/1.1\r\n\r\nearly")
        self.assertEqual(self.m.state(), "waiting")
        self.assertEqual(self.relay.clock.getDelayedCalls(), [])  # head timer gone
        tun = FakeTunnel()
        self.relay.requests[0].ready.callback((tun, False))
        self.assertEqual(self.m.state(), "stream")
        self.assertEqual(tun.calls, [("start", "ssh", False), ("data", b"early")])
        self.assertEqual(self.io.written, [b"HTTP/1.1 200 Connection established\r\n\r\n"])
        self.assertEqual(self.io.send, tun.send_data)
        # A dead reused tunnel: back to waiting, the 200 is not sent twice.
        self.m.retry(b"again")
        self.assertEqual((self.m.state(), self.io.send), ("waiting", None))
        tun2 = FakeTunnel()
        self.relay.requests[1].ready.callback((tun2, False))
        self.assertEqual(tun2.calls, [("start", "ssh", False), ("data", b"again")])
        self.assertEqual(len(self.io.written), 1)
        self.m.tunnel_ended()
        self.assertEqual((self.m.state(), self.io.closed, self.io.send), ("done", True, None))

    def test_late_tunnel_given_back(self):
        self.m.data(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        self.m.connection_lost()
        self.assertIn(("cancel", "cam"), self.relay.calls)
        tun = FakeTunnel()
        self.m.tunnel_ready(tun, True)
        self.assertEqual(tun.calls, [("give_back",)])
        self.m.tunnel_failed(None)  # ignored once done
        self.assertEqual(self.m.state(), "done")

    def test_unexpected_input_logged_state_kept(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.m.data(b"GET / HTTP/1.1\r\nHost: cam.relay.test\r\n\r\n")
        self.relay.requests[0].ready.callback((FakeTunnel(), False))
        self.m.reply(500, "x", "y")  # the relay does not answer mid-stream
        self.assertEqual(self.m.state(), "stream")
        [event] = [e for e in events if e.get("input") == "reply"]
        self.assertEqual((event["state"], event["log_level"].name), ("stream", "warn"))

    def test_head_timeout(self):
        self.m.data(b"GET / HTTP/1.1\r\n")
        self.relay.clock.advance(30)
        self.assertEqual((self.m.state(), self.io.aborted), ("done", True))


class FakeTunnelIO:
    def __init__(self):
        self.written = []
        self.routed = (None, False)
        self.closed = self.aborted = False

    def write(self, data):
        self.written.append(data)

    def write_data(self, data):
        self.written.append(tunnel.data_header(len(data)) + data)

    def close_connection(self):
        self.closed = True

    def abort_connection(self):
        self.aborted = True

    def peer(self):
        return "198.51.100.1:2"

    def couple(self, terminal):
        pass

    def uncouple(self, terminal):
        pass

    def resume_reading(self):
        pass

    def route(self, terminal, direct):
        self.routed = (terminal, direct)


class FakeTerminal:
    def __init__(self):
        self.got = []

    def writer(self):
        return self.got.append

    def tunnel_ended(self):
        self.got.append("ended")

    def tunnel_lost(self, abort):
        self.got.append(("lost", abort))

    def retry(self, pending):
        self.got.append(("retry", pending))


class TunnelMachineTests(SynchronousTestCase):
    def setUp(self):
        self.relay = FakeRelay()
        self.io = FakeTunnelIO()
        self.core = TunnelCore(self.relay, self.io)
        self.m = self.core.machine = TunnelMachine(self.core)
        self.m.bind("cam", type("S", (), {"id": b"s" * 16})(), False)
        self.assertEqual(self.m.state(), "idle")

    def test_reused_stream_confirmed(self):
        term = FakeTerminal()
        self.m.start_reused_stream(term, "")
        self.assertEqual((self.m.state(), self.io.routed), ("opening", (term, False)))
        self.m.terminal_data(b"req")
        self.m.device_opened()
        self.assertEqual((self.m.state(), self.io.routed), ("stream", (term, True)))
        self.relay.clock.advance(5)  # the open timer is gone
        self.m.device_end()
        self.assertEqual(self.m.state(), "idle")
        self.assertEqual(term.got, ["ended"])
        self.assertEqual(self.io.written[-1], tunnel.frame(tunnel.END))

    def test_reused_stream_dead(self):
        term = FakeTerminal()
        self.m.start_reused_stream(term, "")
        self.m.terminal_data(b"a")
        self.m.terminal_data(b"b")
        self.relay.clock.advance(2)
        self.assertEqual((self.m.state(), self.io.aborted), ("closed", True))
        self.assertEqual(term.got, [("retry", b"ab")])
        self.m.connection_lost()
        self.assertEqual(term.got, [("retry", b"ab")])  # not told twice

    def test_frames_outside_a_stream_are_errors(self):
        self.assertRaises(tunnel.TunnelError, self.m.device_data, b"x")
        self.assertRaises(tunnel.TunnelError, self.m.device_end)
        self.assertRaises(tunnel.TunnelError, self.m.device_open)

    def test_draining(self):
        term = FakeTerminal()
        self.m.start_stream(term, "")
        self.m.terminal_end()
        self.assertEqual((self.m.state(), self.io.routed), ("draining", (None, False)))
        self.m.device_data(b"late")  # the terminal is gone: dropped
        self.m.device_end()
        self.assertEqual(self.m.state(), "idle")
        self.assertEqual(term.got, [])
        self.relay.clock.advance(60)
        self.assertEqual((self.m.state(), self.io.closed), ("closed", True))

    def test_drop_cuts_the_terminal(self):
        term = FakeTerminal()
        self.m.start_stream(term, "")
        self.m.drop()
        self.m.connection_lost()
        self.assertEqual(term.got, [("lost", True)])
        self.assertIn(("tunnel_closed", self.io), self.relay.calls)
