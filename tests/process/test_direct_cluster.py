"""
Direct sessions through a relay cluster, on loopback: two relay nodes in
this process sharing a real Redis (L{tests.support.redis}), a device agent
whose notifies reach node Y (the owner), and ``p2pnat forward --json`` as a
real process talking to node X (TLS terminal port and STUN on X's UDP
port).  X asks Y over the node channel; Y sends the device the direct
request; X offers the session; 1 MB goes through the forward and back,
checked by SHA-256, on the direct path.
"""

import os
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from p2pnat.daemon import config as C
from p2pnat.relay.tap import SCHEMA as RELAY_SCHEMA
from p2pnat.relay.tap import RelayService
from tests.process import test_forward_direct as F
from tests.process.test_endpoint import Echo, wait_for
from tests.support.redis import RedisServer, require_redis
from tests.support.relay import start_agent, start_relay

LOOPBACK = "127.0.0.1"


class DirectClusterTests(TestCase):
    timeout = 90

    def setUp(self):
        require_redis()
        self.redis = RedisServer(self)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface=LOOPBACK)
        self.addCleanup(echo.stopListening)
        self.echo_port = echo.getHost().port
        cluster = {"cluster.redis": self.redis.url, "relay.sync_interval": 0.2}
        self.owner = start_relay(self, os.path.join(self.dir, "y"), **cluster,
                                 **{"cluster.node": "y"})
        # Node X shares Y's state files (CA, certificate, terminal secret).
        state = os.path.join(self.dir, "x", "state")
        shutil.copytree(self.owner.state_dir, state)
        self.relay = RelayService(C.load(None, RELAY_SCHEMA, {
            "relay.state_dir": state, "relay.hostname": "relay.test",
            "udp.listen": f"{LOOPBACK}:0", "tunnel.listen": f"tcp:0:interface={LOOPBACK}",
            "terminal.https": f"tcp:0:interface={LOOPBACK}", "terminal.http": "",
            "cluster.node": "x", **cluster}), reactor)
        self.relay.startService()
        self.addCleanup(self.relay.stopService)
        self.ca = os.path.join(state, "ca.crt")

    def test_terminal_on_the_non_owner_node_goes_direct(self):
        async def run():
            await wait_for(lambda: self.owner.cluster.available()
                           and self.relay.cluster.available(), "both nodes on redis")
            await start_agent(self, self.owner, "cam", os.path.join(self.dir, "cam"),
                              self.echo_port, **{
                                  "agent.extra_services": f"echo={LOOPBACK}:{self.echo_port}"})
            await wait_for(lambda: "cam" in self.owner.relay.direct_capable,
                           "a notify saying the device takes direct requests")
            await wait_for(lambda: self.relay.table.get("cam") is not None,
                           "node x has the device's record", 10)
            await wait_for(lambda: self.redis.command("EXISTS", "p2pnat:live:cam") == b":1",
                           "the device's live entry")
            self.assertNotIn("cam", self.relay.relay.direct_capable, "cam is y's, not x's")
            fwd, port = await F.ForwardDirectTests.forward(self, "cam:echo")
            path = await F.ForwardDirectTests.one_transfer(self, fwd, port)
            self.assertEqual(path["path"], "direct", path)
            # And again: a new offer through the owner, a new secret.
            path = await F.ForwardDirectTests.one_transfer(self, fwd, port)
            self.assertEqual(path["path"], "direct", path)
        return defer.Deferred.fromCoroutine(run())
