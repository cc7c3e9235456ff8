"""
``p2pnat:`` endpoints from C{clientFromString}, in the test's own reactor,
against real daemons on loopback:

- the peer form: a ``twistd lobby`` process and ``p2pnat peer wait
  --service echo=HOST:PORT`` (bob), alice's lobby client in this process;
  an echo through the QUIC stream, a second stream over the same client
  and connection, a service bob does not serve, and a peer offline;
- the device form: an in-process relay and device agent
  (L{tests.support.relay}), through the relay's HTTPS terminal port.

Port mapping and IPv6 are off and the NAT is given, so nothing leaves
the machine and no discovery runs.
"""

import os

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial.unittest import TestCase

from p2pnat.peer import endpoint as E
from p2pnat.quic.stream import StreamRefused
from tests.process.test_daemons import ETC, LOOPBACK, Daemon
from tests.process.test_peer_streams import NAT, QUIET
from tests.support import procs
from tests.support.lab.running import events
from tests.support.procs import provision
from tests.support.relay import start_agent, start_relay


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    """Sends C{data}, collects until C{until} bytes came back, then closes."""

    def __init__(self, data, until=None):
        self.data = data
        self.until = len(data) if until is None else until
        self.got = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= self.until:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback((bytes(self.got), reason))


def escape(text):
    """A value for an endpoint string (its colons, backslashes and equals escaped)."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


async def wait_for(predicate, what, seconds=30.0):
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await deferLater(0.05)
    raise AssertionError(f"no {what} in {seconds}s")


async def echo_through(testcase, ep, size):
    """Send C{size} random bytes through C{ep} to an echo; check they come back."""
    data = os.urandom(size)
    c = Collect(data)
    proto = await endpoints.connectProtocol(ep, c)
    testcase.assertIs(proto, c)
    got, _ = await c.done
    testcase.assertEqual(got, data)


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class PeerEndpointProcessTests(TestCase):
    timeout = 90

    def setUp(self):
        self.daemons = []
        self.state = os.path.join(self.tmpdir(), "lobby")
        lobby = Daemon(self, "lobby", ("--config", os.path.join(ETC, "lobby.toml"),
                                       "--lobby-state-dir", self.state,
                                       "--udp-listen", f"{LOOPBACK}:0"))
        port = int(lobby.wait_for(r"ControlProtocol starting on (\d+)").group(1))
        self.bundles = {}
        for name in ("alice", "bob", "carol"):
            self.bundles[name] = os.path.join(self.tmpdir(), name)
            provision("client", "add", name, "--state-dir", self.state, "--lobby",
                      f"{LOOPBACK}:{port}", "--out", self.bundles[name])
        self.echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=LOOPBACK)
        self.addCleanup(self.echo.stopListening)

    def tmpdir(self):
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def endpoint(self, peer, service, timeout=20):
        config = os.path.join(self.bundles["alice"], "client.toml")
        ep = endpoints.clientFromString(
            reactor, f"p2pnat:peer={peer}:service={service}:config={escape(config)}"
                     f":nat={escape(NAT)}:portmap=no:ipv6=off:timeout={timeout}")
        self.addCleanup(self.forget, ep.shared)
        return ep

    def forget(self, shared):
        E._CLIENTS.pop((id(reactor), shared.settings.path), None)
        return shared.stop()

    def bob(self):
        bob = Daemon(self, "peer-bob", (), argv=procs.p2pnat(
            "peer", "wait", "--service", f"echo={LOOPBACK}:{self.echo.getHost().port}",
            "--config", os.path.join(self.bundles["bob"], "client.toml"), *QUIET))
        bob.wait_for(r'"event": "login"')
        return bob

    def test_peer_service(self):
        """
        Two streams to bob's echo through one lobby client and one QUIC
        connection; a service bob does not serve ends in StreamRefused.
        """
        bob = self.bob()

        async def run():
            ep = self.endpoint("bob", "echo")
            await echo_through(self, ep, 500_000)
            client = ep.shared.client
            streams = await ep.shared.streams("bob")
            await echo_through(self, self.endpoint("bob", "echo"), 1000)
            self.assertIs(self.endpoint("bob", "echo").shared.client, client)
            self.assertIs(await ep.shared.streams("bob"), streams)
            c = Collect(b"hello", until=1)
            await endpoints.connectProtocol(self.endpoint("bob", "nope"), c)
            got, reason = await c.done
            self.assertEqual(got, b"")
            self.assertTrue(reason.check(StreamRefused), reason)
            await wait_for(lambda: len([e for e in events(bob.output())
                                        if e["event"] == "stream-closed"]) == 2,
                           "stream-closed events from bob")

        return defer.Deferred.fromCoroutine(run())

    def test_peer_offline(self):
        """carol is a client of the lobby, but not logged in: a clear error, soon."""
        d = self.endpoint("carol", "echo").connect(protocol.Factory.forProtocol(Echo))

        def check(f):
            f.trap(E.EndpointConnectError)
            self.assertEqual(str(f.value), "carol's echo: peer offline")

        return d.addCallbacks(lambda p: self.fail(f"connected: {p}"), check)


class DeviceEndpointProcessTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=LOOPBACK)
        self.addCleanup(echo.stopListening)
        self.relay = start_relay(self, self.dir, **{"terminal.https": "tcp:0:interface=127.0.0.1"})
        yield defer.Deferred.fromCoroutine(start_agent(
            self, self.relay, "cam", os.path.join(self.dir, "cam"), echo.getHost().port,
            **{"agent.extra_services": f"echo=127.0.0.1:{echo.getHost().port}"}))
        self.ca = os.path.join(self.relay.state_dir, "ca.crt")

    def endpoint(self, device, service="echo"):
        port = self.relay.terminal_https.address[1]
        return endpoints.clientFromString(
            reactor, f"p2pnat:device={device}:service={service}:relay=127.0.0.1\\:{port}"
                     f":relay_hostname=cam.relay.test:ca={escape(self.ca)}:timeout=10")

    def test_device_service(self):
        return defer.Deferred.fromCoroutine(
            echo_through(self, self.endpoint("cam"), 500_000))

    def test_unknown_device(self):
        d = self.endpoint("nobody").connect(protocol.Factory.forProtocol(Echo))

        def check(f):
            f.trap(E.EndpointConnectError)
            self.assertEqual(str(f.value),
                             "device nobody:echo: the relay refused: HTTP/1.1 401 Unauthorized")

        return d.addCallbacks(lambda p: self.fail(f"connected: {p}"), check)
