"""
A relay and device agents in the test's own reactor, on loopback, set up the
way an operator does it (``p2pnat relay init``, ``p2pnat device add``): the
shared fixture of the in-process relay tests (loopback, limits, pooling
proxy).
"""

import os

from twisted.internet import reactor, task

from p2pnat.agent.tap import SCHEMA as AGENT_SCHEMA
from p2pnat.agent.tap import AgentService
from p2pnat.cli import main as cli
from p2pnat.daemon import config as C
from p2pnat.daemon.config import read_mac_key
from p2pnat.relay.tap import SCHEMA as RELAY_SCHEMA
from p2pnat.relay.tap import RelayService


def start_relay(testcase, workdir, **settings):
    """
    A started L{RelayService} for ``relay.test`` whose state is made in
    C{workdir}/state, with UDP and tunnels on loopback and no terminal
    listener unless C{settings} (relay setting name -> value) give one.
    """
    state = os.path.join(workdir, "state")
    testcase.assertEqual(cli(["relay", "init", "--state-dir", state,
                              "--hostname", "relay.test"]), 0)
    relay = RelayService(C.load(None, RELAY_SCHEMA, {
        "relay.state_dir": state, "relay.hostname": "relay.test",
        "udp.listen": "127.0.0.1:0", "tunnel.listen": "tcp:0:interface=127.0.0.1",
        "terminal.https": "", "terminal.http": "", **settings}), reactor)
    relay.startService()
    testcase.addCleanup(relay.stopService)
    return relay


async def start_agent(testcase, relay, device_id, out, service_port, add_args=(), **settings):
    """
    Provision C{device_id} on C{relay} (its bundle in C{out}, its service
    on 127.0.0.1:C{service_port}; C{add_args} for ``p2pnat device add``),
    start its agent with the agent settings C{settings}, and wait until the
    relay has its notify A.

    @return: the started L{AgentService}.
    """
    udp = relay.udp[0].address
    testcase.assertEqual(cli(["device", "add", device_id, "--state-dir", relay.state_dir,
                              "--relay", f"127.0.0.1:{udp[1]}",
                              "--service", f"127.0.0.1:{service_port}", "--out", out,
                              *add_args]), 0)
    config = C.load(os.path.join(out, "agent.toml"), AGENT_SCHEMA,
                    {"udp.listen": "127.0.0.1:0", **settings})
    agent = AgentService(config, read_mac_key(config, "agent.mac_key_file"), reactor)
    # The registry change reaches the relay at its next sync.
    relay.sync()
    agent.startService()
    testcase.addCleanup(agent.stopService)
    for _ in range(100):
        d = relay.table.get(device_id)
        if d is not None and d.last_access is not None:
            return agent
        await task.deferLater(reactor, 0.05, lambda: None)
    testcase.fail(f"{device_id} never came online")
