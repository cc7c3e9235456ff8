# -*- test-case-name: tests.process.test_demo -*-
"""
``p2pnat demo``: the relay path on one machine, in one reactor, with no
root and no configuration.

It prepares a state directory (``./p2pnat-demo`` unless ``--dir``)::

    relay/    the relay's state: CA, certificate for relay.localhost, registry
    device/   the agent bundle of device "demo" (as `p2pnat device add` writes it)

then runs, in one process, the relay (UDP notifies, HTTPS and HTTP terminal
listeners, TLS tunnel listener, all on 127.0.0.1), the agent of device
``demo`` and the device's sample web site (L{p2pnat.cli.demo_site}).  Nothing
is short-circuited: a browser's request reaches the site only through the
agent's notifies, the relay's connect request and the agent's TLS tunnel.

Browsers resolve every name under ``.localhost`` to the loopback address,
so ``https://demo.relay.localhost:8443/`` works with no DNS or hosts-file
change.  The URLs go to standard output once the device is online; logs go
to standard error.  Ctrl-C stops everything and exits with status 0.
"""

import faulthandler
import os
import signal
import sys

from p2pnat.cli import CommandError

HOSTNAME = "relay.localhost"
DEVICE = "demo"
LOOPBACK = "127.0.0.1"
#: Seconds to wait for the agent's first notify A before giving up.
ONLINE_TIMEOUT = 20.0


def add_parser(subparsers):
    help = "run a relay, a device and its web site on this machine, to try p2pnat in a browser"
    p = subparsers.add_parser("demo", help=help, description=help[0].upper() + help[1:] + ".")
    p.add_argument("--dir", default="p2pnat-demo", metavar="DIR",
                   help="state directory (CA, relay certificate, device bundle); created if"
                        " missing, reused if present (default: ./p2pnat-demo)")
    for name, default, what in (
            ("https-port", 8443, "the relay's HTTPS terminal port"),
            ("http-port", 8080, "the relay's plain HTTP terminal port"),
            ("udp-port", 7478, "the relay's UDP notify port"),
            ("tunnel-port", 7443, "the relay's TLS port for device tunnels"),
            ("site-port", 0, "the device web site's port")):
        p.add_argument(f"--{name}", type=_port, default=default, metavar="N",
                       help=f"{what} on {LOOPBACK} (default: {default or 'any free port'};"
                            " 0: any free port)")
    p.set_defaults(func=run)


def _port(text):
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


# -- the state directory ------------------------------------------------------

class StateDir:
    """Where the demo keeps its relay state and its device's agent bundle."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.relay = os.path.join(self.path, "relay")
        self.device = os.path.join(self.path, "device")

    def relay_file(self, name):
        return os.path.join(self.relay, name)

    def device_file(self, name):
        return os.path.join(self.device, name)


def prepare(state, udp_port, site_port, log):
    """
    Make C{state} ready: a relay CA and certificate for L{HOSTNAME}, and
    device L{DEVICE} registered with an agent bundle.  What is there and
    still consistent is reused; a device bundle that no longer matches the
    registry or the CA is issued again.

    @raise CommandError: if the directory cannot be used.
    """
    from p2pnat.deployment import pki, provision
    from p2pnat.deployment.registry import Registry, RegistryError

    relay = f"{LOOPBACK}:{udp_port or 7478}"
    try:
        pki.make_private_dir(state.path)
        if not os.path.exists(state.relay_file(provision.CA_CERT)):
            log.info("creating the demo's CA and a relay certificate for {hostname} in {dir}",
                     hostname=HOSTNAME, dir=state.relay)
            provision.init_relay_state(state.relay, HOSTNAME, udp=relay)
        relay_cert = pki.load_cert(state.relay_file(provision.RELAY_CERT))
        if not pki.covers_hostname(relay_cert, HOSTNAME):
            raise CommandError(f"{state.relay_file(provision.RELAY_CERT)} is not a certificate"
                               f" for {HOSTNAME}; use another --dir")
        with Registry.open_state_dir(state.relay) as reg:
            record = reg.device(DEVICE)
        if record is not None and _bundle_matches(state, record):
            return
        for name in provision.DEVICE_BUNDLE:
            try:
                os.unlink(state.device_file(name))
            except FileNotFoundError:
                pass
        log.info("provisioning device {device_id}: agent bundle in {dir}", device_id=DEVICE,
                 dir=state.device)
        provision.add_device(state.relay, DEVICE, state.device, service=f"{LOOPBACK}:{site_port}",
                             relay=relay, relay_hostname=HOSTNAME, replace=record is not None)
    except (pki.PKIError, RegistryError, provision.ProvisionError) as e:
        raise CommandError(str(e))


def _bundle_matches(state, record):
    from p2pnat.deployment import pki, provision

    if not record.active or not all(os.path.exists(state.device_file(n))
                                    for n in provision.DEVICE_BUNDLE):
        return False
    try:
        cert = pki.load_cert(state.device_file(pki.DEVICE_CERT_FILE))
        with open(state.device_file(pki.CA_CERT_FILE), "rb") as a, \
                open(state.relay_file(pki.CA_CERT_FILE), "rb") as b:
            same_ca = a.read() == b.read()
    except (OSError, pki.PKIError):
        return False
    return same_ca and record.accepts(pki.fingerprint(cert))


# -- running ------------------------------------------------------------------

class Demo:
    """
    The relay, the agent and the site in one service tree, and the wait
    for the device's first notify A.

    @ivar status: the exit status once the reactor has stopped.
    """

    def __init__(self, state, args, reactor, out):
        from twisted.application import service

        from p2pnat.daemon.logs import Logger

        self.log = Logger(namespace="p2pnat.cli.demo")
        self.state = state
        self.args = args
        self.reactor = reactor
        self.out = out
        self.top = service.MultiService()
        self.status = 0
        self.relay = self.agent = self.site = None
        self._waiting = None
        self._timeout = None

    def start(self):
        """
        Bind every socket and start the agent (before the reactor runs, so
        that a port in use is a one-line error).

        @raise CommandError: on a configuration or listening problem.
        """
        from twisted.internet.error import CannotListenError

        from p2pnat.daemon import config as C
        from p2pnat.deployment.pki import PKIError
        from p2pnat.deployment.registry import RegistryError

        try:
            self._start()
        except CommandError:
            self._abandon()
            raise
        except CannotListenError as e:
            self._abandon()
            raise CommandError(
                f"cannot listen on {e.interface or LOOPBACK}:{e.port}: {_reason(e)};"
                " is another demo running? Choose other ports with --https-port,"
                " --http-port, --udp-port, --tunnel-port, --site-port (0: any free port)")
        except OSError as e:
            self._abandon()
            raise CommandError(f"cannot start: {e}")
        except (C.ConfigError, PKIError, RegistryError) as e:
            self._abandon()
            raise CommandError(str(e))

    def _abandon(self):
        if self.top.running:
            self.top.stopService()
        elif self.relay is not None:
            self.relay.registry.close()

    def _start(self):
        from p2pnat.agent import tap as agent_tap
        from p2pnat.cli.demo_site import make_site
        from p2pnat.daemon import config as C
        from p2pnat.daemon.services import EndpointListener
        from p2pnat.relay import tap as relay_tap

        args = self.args
        self.site = EndpointListener(self.reactor, _tcp(args.site_port), make_site())
        self.site.setServiceParent(self.top)
        self.top.startService()  # the site's port, before provisioning records it
        site_port = self.site.address[1]
        prepare(self.state, args.udp_port, site_port, self.log)

        relay_config = C.load(None, relay_tap.SCHEMA, {
            "relay.hostname": HOSTNAME,
            "relay.state_dir": self.state.relay,
            "udp.listen": f"{LOOPBACK}:{args.udp_port}",
            "terminal.https": _tcp(args.https_port),
            "terminal.http": _tcp(args.http_port),
            "tunnel.listen": _tcp(args.tunnel_port),
        })
        self.relay = relay_tap.RelayService(relay_config, self.reactor)
        self.relay.setServiceParent(self.top)
        self.started = self.reactor.seconds()
        udp_port = self.relay.udp[0].address[1]

        # The bundle as `p2pnat device add` wrote it, with the ports of this run.
        agent_config = C.load(self.state.device_file("agent.toml"), agent_tap.SCHEMA, {
            "agent.relay": f"{LOOPBACK}:{udp_port}",
            "agent.service": f"{LOOPBACK}:{site_port}",
            "udp.listen": f"{LOOPBACK}:0",
        })
        mac_key = C.read_mac_key(agent_config, "agent.mac_key_file")
        self.agent = agent_tap.AgentService(
            agent_config, mac_key, self.reactor, agent_tap.services_of(agent_config),
            agent_tap.client_tls_options(agent_config))
        self.agent.setServiceParent(self.top)

        from twisted.internet.task import LoopingCall

        self._waiting = LoopingCall(self._check_online)
        self._waiting.clock = self.reactor
        self._waiting.start(0.05, now=False)
        self._timeout = self.reactor.callLater(ONLINE_TIMEOUT, self._not_online)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _check_online(self):
        d = self.relay.table.get(DEVICE)
        # socket is set by a notify this process received; last_access may
        # also come from the registry, written by an earlier run.
        if d is None or d.socket is None or d.last_access is None \
                or d.last_access < self.started:
            return
        self._waiting.stop()
        self._timeout.cancel()
        self.print_urls()

    def _not_online(self):
        self._waiting.stop()
        self.log.error("device {device_id} did not reach the relay within {t:.0f} s",
                       device_id=DEVICE, t=ONLINE_TIMEOUT)
        self.status = 1
        self.reactor.stop()

    def print_urls(self):
        from p2pnat.deployment.provision import CA_CERT, CA_KEY

        relay = self.relay.relay
        https = relay.device_url(DEVICE, True)
        http = relay.device_url(DEVICE, False)
        connect = f"https://{HOSTNAME}:{relay.https_port}/connect?ID={DEVICE}"
        ca = self.state.relay_file(CA_CERT)
        text = f"""\
p2pnat demo: relay {HOSTNAME}, device "{DEVICE}" is online; its web site runs on\
 {LOOPBACK}:{self.site.address[1]} and is reached only through the relay.

  Open {https}
    or {http}
  (or the seed's way, through the relay's own page: {connect})

The HTTPS certificate comes from this demo's own CA, so the browser warns about it
until you trust that CA: import {ca}
as a certificate authority (Chrome: Settings > Privacy and security > Security >
Manage certificates; Firefox: Settings > Privacy & Security > View Certificates >
Authorities > Import), or just accept the warning. Remove it again when you are done:
its private key ({self.state.relay_file(CA_KEY)}) is on this disk. The http:// link
needs nothing.

Press Ctrl-C to stop.
"""
        self.out.write(text)
        self.out.flush()

    def _shutdown(self):
        if self._waiting is not None and self._waiting.running:
            self._waiting.stop()
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self.log.info("demo stopping")
        return self.top.stopService()


def _tcp(port):
    return f"tcp:{port}:interface={LOOPBACK}"


def _reason(error):
    socket_error = error.socketError
    return getattr(socket_error, "strerror", None) or str(socket_error)


def run(args, out=None, reactor=None):
    """The ``p2pnat demo`` command: runs until Ctrl-C (or SIGTERM)."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    out = out or sys.stdout
    if reactor is None:
        from twisted.internet import reactor
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    # `kill -USR1 PID` prints every thread's stack to standard error: what a
    # demo that does not stop is doing (tests.process.test_demo asks for it).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    demo = Demo(StateDir(args.dir), args, reactor, out)
    demo.start()
    reactor.run()
    return demo.status
