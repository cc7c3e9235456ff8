"""
Direct sessions on loopback: an in-process relay and device agent
(L{tests.support.relay}), a TCP echo as the device's service, and
``p2pnat forward --json`` as a real process.  1 MB goes through the
forward and back, checked by SHA-256, and the forward's JSON event says
which path the connection took:

- the agent takes direct sessions: ``direct`` (QUIC from the forward's
  socket to the agent's notify socket, the relay only the lobby);
- the agent's direct sessions are off (L{AgentService.stop_direct}; its
  notifies no longer say it takes them): ``relayed``, as before;
- the relay offers a session the agent no longer takes: ``relayed`` after
  the budget;
- the agent refuses the stream that carried the application's first
  bytes with its secret: ``relayed``, those bytes replayed there, and the
  service sees them once;
- a service that sends 1 MB and closes first: all of it arrives;
- ``p2pnat:`` endpoint's device form in this process: direct too.
"""

import hashlib
import json
import os

from twisted.internet import defer, endpoints, error, protocol, reactor
from twisted.trial.unittest import TestCase

from p2pnat.peer import direct as D
from tests.process.test_endpoint import Collect, Echo, deferLater, escape, wait_for
from tests.support import procs
from tests.support.relay import start_agent, start_relay

LOOPBACK = "127.0.0.1"
SIZE = 1_000_000


class CountingEcho(Echo):
    """An echo that counts, in its factory's C{received}, every byte any connection got."""

    def dataReceived(self, data):
        self.factory.received += len(data)
        Echo.dataReceived(self, data)


class Source(protocol.Protocol):
    """Sends L{SOURCE} once the client's first byte came, then closes (as HTTP/1.0 does)."""

    def dataReceived(self, data):
        self.transport.write(SOURCE)
        self.transport.loseConnection()


SOURCE = os.urandom(SIZE)


class _Forward(protocol.ProcessProtocol):
    """A ``p2pnat forward --json`` process: its JSON events as they come."""

    def __init__(self):
        self.events = []
        self.out = b""
        self.err = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.out += data
        while b"\n" in self.out:
            line, self.out = self.out.split(b"\n", 1)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(None)


class ForwardDirectTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.echo = protocol.Factory.forProtocol(CountingEcho)
        self.echo.received = 0
        echo = reactor.listenTCP(0, self.echo, interface=LOOPBACK)
        self.addCleanup(echo.stopListening)
        self.echo_port = echo.getHost().port
        source = reactor.listenTCP(0, protocol.Factory.forProtocol(Source), interface=LOOPBACK)
        self.addCleanup(source.stopListening)
        self.source_port = source.getHost().port
        self.relay = start_relay(self, self.dir, **{
            "terminal.https": f"tcp:0:interface={LOOPBACK}"})
        self.ca = os.path.join(self.relay.state_dir, "ca.crt")
        yield defer.succeed(None)

    async def start_device(self, device_id, direct=True):
        agent = await start_agent(
            self, self.relay, device_id, os.path.join(self.dir, device_id), self.echo_port,
            **{"agent.extra_services": f"echo=127.0.0.1:{self.echo_port},"
                                      f"source=127.0.0.1:{self.source_port}"})
        await wait_for(lambda: device_id in self.relay.relay.direct_capable,
                       "a notify saying the device takes direct requests")
        if not direct:
            await agent.stop_direct()
            agent.notifier.notify_a()  # tells the relay at once
            await wait_for(lambda: device_id not in self.relay.relay.direct_capable,
                           "a notify without the flag")
        return agent

    async def forward(self, target):
        fwd = _Forward()
        port = self.relay.terminal_https.address[1]
        udp = self.relay.udp[0].address[1]
        proc = reactor.spawnProcess(
            fwd, procs.p2pnat()[0], procs.p2pnat(
                "forward", target, "--relay", f"{LOOPBACK}:{port}", "--relay-hostname",
                "relay.test", "--ca", self.ca, "--relay-udp", f"{LOOPBACK}:{udp}",
                "--json"),
            env=procs.env(), path=procs.REPO)

        async def stop():
            try:
                proc.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
            await fwd.ended

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        await wait_for(lambda: any(e["event"] == "forwarding" for e in fwd.events),
                       f"forwarding line (stderr {fwd.err[-2000:]!r})", 30)
        listen = next(e for e in fwd.events if e["event"] == "forwarding")
        return fwd, listen["port"]

    async def one_transfer(self, fwd, port):
        data = os.urandom(SIZE)
        c = Collect(data)
        ep = endpoints.TCP4ClientEndpoint(reactor, LOOPBACK, port)
        await endpoints.connectProtocol(ep, c)
        got, _ = await c.done
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest(),
                         f"{len(got)} of {SIZE} bytes back; forward said {fwd.events},"
                         f" stderr {fwd.err[-2000:]!r}")
        await wait_for(lambda: any(e["event"] == "path" for e in fwd.events), "path event")
        return [e for e in fwd.events if e["event"] == "path"][-1]

    def test_direct(self):
        """The device takes direct sessions: the stream goes direct, 1 MB intact."""
        async def run():
            await self.start_device("cam")
            fwd, port = await self.forward("cam:echo")
            path = await self.one_transfer(fwd, port)
            self.assertEqual(path["path"], "direct", path)
            # The first bytes went optimistically and reached the service once.
            self.assertEqual(self.echo.received, SIZE)
            # Nothing was left at the relay: its stream ended with ours.
            await wait_for(lambda: not self.relay.relay.streamed, "relay streams closed")
            # A second connection goes direct too (a new offer, a new secret).
            path = await self.one_transfer(fwd, port)
            self.assertEqual(path["path"], "direct", path)
        return defer.Deferred.fromCoroutine(run())

    def test_service_closes_first(self):
        """The service sends 1 MB and closes: all of it arrives, then the end."""
        async def run():
            await self.start_device("cam")
            fwd, port = await self.forward("cam:source")
            c = Collect(b"go", until=SIZE + 1)
            await endpoints.connectProtocol(
                endpoints.TCP4ClientEndpoint(reactor, LOOPBACK, port), c)
            got, _ = await c.done
            self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(SOURCE).hexdigest(),
                             f"{len(got)} of {SIZE} bytes; forward said {fwd.events} {fwd.err[-3000:]}")
            await wait_for(lambda: any(e["event"] == "path" for e in fwd.events), "path event")
            self.assertEqual([e["path"] for e in fwd.events if e["event"] == "path"], ["direct"])
        return defer.Deferred.fromCoroutine(run())

    def test_relayed_when_direct_is_off(self):
        """The agent's direct sessions are off: the relay offers none, and serves."""
        async def run():
            await self.start_device("cam", direct=False)
            fwd, port = await self.forward("cam:echo")
            path = await self.one_transfer(fwd, port)
            self.assertEqual((path["path"], path.get("why")), ("relayed", "no direct offer"))
        return defer.Deferred.fromCoroutine(run())

    def test_relayed_when_the_config_says_no(self):
        """C{agent.direct = false}: no direct server, no flag, relayed."""
        async def run():
            agent = await start_agent(
                self, self.relay, "cam", os.path.join(self.dir, "cam"), self.echo_port,
                **{"agent.extra_services": f"echo=127.0.0.1:{self.echo_port}",
                   "agent.direct": False})
            self.assertIsNone(agent.direct)
            fwd, port = await self.forward("cam:echo")
            path = await self.one_transfer(fwd, port)
            self.assertEqual((path["path"], path.get("why")), ("relayed", "no direct offer"))
            self.assertNotIn("cam", self.relay.relay.direct_capable)
        return defer.Deferred.fromCoroutine(run())

    def test_relayed_after_the_budget(self):
        """
        The relay offers a direct session the device no longer takes (it
        stopped, and no notify told the relay yet): no QUIC answer, so the
        relayed connection, held meanwhile, serves after the budget.
        """
        async def run():
            agent = await self.start_device("cam")
            await agent.stop_direct()
            self.assertIn("cam", self.relay.relay.direct_capable)
            fwd, port = await self.forward("cam:echo")
            path = await self.one_transfer(fwd, port)
            self.assertEqual((path["path"], path.get("why")),
                             ("relayed", "no direct stream within 0.50s"))
            self.assertEqual(self.echo.received, SIZE)
        return defer.Deferred.fromCoroutine(run())

    def test_refused_stream_replayed_on_the_relay(self):
        """
        The device refuses the direct stream (its secret is not taken),
        which carried the application's first bytes: the relayed
        connection serves, with those bytes replayed, and the service
        sees each byte once.
        """
        async def run():
            agent = await self.start_device("cam")
            agent.direct.sessions.take = lambda secret: None
            fwd, port = await self.forward("cam:echo")
            path = await self.one_transfer(fwd, port)
            self.assertEqual(path["path"], "relayed", path)
            self.assertNotIn("within", path.get("why", ""), path)
            self.assertEqual(self.echo.received, SIZE)
        return defer.Deferred.fromCoroutine(run())

    def test_endpoint_direct(self):
        """The p2pnat: endpoint's device form takes the same direct path."""
        async def run():
            await self.start_device("cam")
            port = self.relay.terminal_https.address[1]
            udp = self.relay.udp[0].address[1]
            ep = endpoints.clientFromString(
                reactor, f"p2pnat:device=cam:service=echo:relay=127.0.0.1\\:{port}"
                         f":relay_hostname=cam.relay.test:ca={escape(self.ca)}"
                         f":relay_udp=127.0.0.1\\:{udp}:timeout=10")
            paths = []
            ep.on_path = lambda path, target, why: paths.append((path, why))
            socket = ep.direct.socket
            self.addCleanup(socket.stop)
            D._SOCKETS.clear()
            data = os.urandom(SIZE)
            c = Collect(data)
            await endpoints.connectProtocol(ep, c)
            got, _ = await c.done
            self.assertEqual(got, data)
            self.assertEqual(paths, [("direct", "")])
            await deferLater(0.1)
        return defer.Deferred.fromCoroutine(run())
