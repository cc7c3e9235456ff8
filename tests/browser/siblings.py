"""
Two devices on one relay, on loopback, for the browser tests of issue #9
(L{tests.browser.test_siblings}): run as a process,

    python -m tests.browser.siblings DIR CREDENTIAL

it provisions, in DIR, a relay for ``relay.localhost`` and two devices:

- ``attacker``, access mode "device": its own web site serves the pages a
  hostile or compromised device could serve (L{ATTACKER_PAGES});
- ``victim``, access mode "relay" with access credential CREDENTIAL: its
  site appends every request it gets (``METHOD PATH``) to DIR/victim.log.

Then it runs the relay (HTTPS terminal port), both agents and both sites
in one reactor, through the real protocol, and prints ``ready PORT`` (the
relay's HTTPS port) once both devices are online.  SIGTERM/SIGINT stop it.
"""

import os
import sys

from twisted.web import resource, server

HOSTNAME = "relay.localhost"
LOOPBACK = "127.0.0.1"

#: Pages of the attacker's device.  PORT is the relay's HTTPS port.
ATTACKER_PAGES = {
    # Posts a form to the victim's device as soon as it loads.
    b"post": """<!doctype html><html><head><title>attacker</title></head><body>
<form id='f' method='post' action='https://victim.relay.localhost:PORT/settings'>
<input name='name' value='owned'></form>
<script>document.getElementById('f').submit()</script></body></html>""",
    # Tosses cookies of the relay's login for the whole relay domain, for
    # the path the victim's user opens (longer paths are sent first).
    b"toss": """<!doctype html><html><head><title>attacker</title></head><body>
<script>
for (const path of ['/', '/home']) {
  for (const c of ['p2pnat_auth=9999999999.AAAAAAAAAAAAAAAAAAAAAAAA',
                   '__Host-p2pnat_auth=9999999999.AAAAAAAAAAAAAAAAAAAAAAAA',
                   '=__Host-p2pnat_auth=9999999999.AAAAAAAAAAAAAAAAAAAAAAAA']) {
    document.cookie = c + '; domain=relay.localhost; path=' + path + '; secure';
  }
}
document.title = 'tossed';
</script></body></html>""",
}


class Attacker(resource.Resource):
    isLeaf = True

    def __init__(self, port):
        super().__init__()
        self.port = port

    def render_GET(self, request):
        page = ATTACKER_PAGES.get(request.path.strip(b"/"))
        if page is None:
            request.setResponseCode(404)
            return b"no such page"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.replace("PORT", str(self.port)).encode()


class Victim(resource.Resource):
    """
    Answers every request with a page naming it, and logs it.  Each answer
    closes its connection, so every request of the browser is the first
    of a terminal connection: these tests are about the relay's access
    rules, not about kept-alive connections (before issue #9's per-request
    routing, only a connection's first head was routed and authorized).
    """

    isLeaf = True

    def __init__(self, log_path):
        super().__init__()
        self.log_path = log_path

    def render(self, request):
        line = f"{request.method.decode()} {request.path.decode()}"
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"connection", b"close")
        return (f"<!doctype html><html><head><title>victim device</title></head><body>"
                f"<p id='seen'>{line}</p>"
                "<form id='f' method='post' action='/settings'><input name='name' value='mine'>"
                "<button id='save'>Save</button></form></body></html>").encode()


def main(directory, credential):
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from p2pnat.agent import tap as agent_tap
    from p2pnat.daemon import config as C
    from p2pnat.deployment import provision
    from p2pnat.relay import tap as relay_tap

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    state = os.path.join(directory, "relay")
    attacker = Attacker(0)
    sites = {"attacker": reactor.listenTCP(0, server.Site(attacker), interface=LOOPBACK),
             "victim": reactor.listenTCP(
                 0, server.Site(Victim(os.path.join(directory, "victim.log"))),
                 interface=LOOPBACK)}
    provision.init_relay_state(state, HOSTNAME, udp=f"{LOOPBACK}:7478")
    cred_file = os.path.join(directory, "credential")
    with open(cred_file, "w") as f:
        f.write(credential + "\n")
    for device_id, port in sites.items():
        options = {"access": "relay", "credential_file": cred_file} \
            if device_id == "victim" else {}
        provision.add_device(state, device_id, os.path.join(directory, device_id),
                             service=f"{LOOPBACK}:{port.getHost().port}", **options)
    relay = relay_tap.RelayService(C.load(None, relay_tap.SCHEMA, {
        "relay.hostname": HOSTNAME, "relay.state_dir": state,
        "udp.listen": f"{LOOPBACK}:0", "terminal.https": f"tcp:0:interface={LOOPBACK}",
        "tunnel.listen": f"tcp:0:interface={LOOPBACK}"}), reactor)
    relay.startService()
    attacker.port = relay.relay.https_port
    udp_port = relay.udp[0].address[1]
    agents = []
    for device_id, port in sites.items():
        bundle = os.path.join(directory, device_id)
        config = C.load(os.path.join(bundle, "agent.toml"), agent_tap.SCHEMA, {
            "agent.relay": f"{LOOPBACK}:{udp_port}",
            "agent.service": f"{LOOPBACK}:{port.getHost().port}",
            "udp.listen": f"{LOOPBACK}:0"})
        agent = agent_tap.AgentService(config, C.read_mac_key(config, "agent.mac_key_file"),
                                       reactor, agent_tap.services_of(config),
                                       agent_tap.client_tls_options(config))
        agent.startService()
        agents.append(agent)

    def check_online():
        if all((d := relay.table.get(device_id)) is not None and d.socket is not None
               for device_id in sites):
            waiting.stop()
            print(f"ready {relay.relay.https_port}", flush=True)

    waiting = LoopingCall(check_online)
    waiting.start(0.05)

    def stop():
        for agent in agents:
            agent.stopService()
        return relay.stopService()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
