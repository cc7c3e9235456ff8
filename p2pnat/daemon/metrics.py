# -*- test-case-name: tests.unit.test_taps -*-
"""
Prometheus metrics for the daemons.

Each daemon has its own L{Metrics} (its own registry, so several daemons or
tests in one process do not collide) and, when ``metrics.listen`` is set,
serves it at ``/metrics`` on that endpoint from the reactor.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.twisted import MetricsResource
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site


class Metrics:
    """
    The counters an operator of a p2pnat daemon needs.

    @ivar packets_in: UDP datagrams received, by ``kind`` (``stun``, the
        message type name, or ``invalid``).
    @ivar packets_out: UDP datagrams sent, by ``kind``.
    @ivar dropped: UDP datagrams dropped, by ``reason``.
    @ivar sessions: sessions started, by ``outcome``.
    @ivar active_sessions: sessions in progress.
    @ivar online: principals (devices or lobby clients) currently online.
    """

    def __init__(self, daemon):
        self.daemon = daemon
        self.registry = r = CollectorRegistry()
        self.packets_in = Counter("p2pnat_udp_received", "UDP datagrams received",
                                  ["kind"], registry=r)
        self.packets_out = Counter("p2pnat_udp_sent", "UDP datagrams sent", ["kind"], registry=r)
        self.dropped = Counter("p2pnat_udp_dropped", "UDP datagrams dropped", ["reason"],
                               registry=r)
        self.sessions = Counter("p2pnat_sessions", "sessions started, by outcome", ["outcome"],
                                registry=r)
        self.active_sessions = Gauge("p2pnat_sessions_active", "sessions in progress",
                                     registry=r)
        self.online = Gauge("p2pnat_online", "devices or clients online", registry=r)
        self._children = {}

    # Cached label children: labels(...) costs more than the increment.

    def received(self, kind):
        self._child(self.packets_in, kind).inc()

    def sent(self, kind):
        self._child(self.packets_out, kind).inc()

    def drop(self, reason):
        self._child(self.dropped, reason).inc()

    def _child(self, metric, label):
        cache = self._children.setdefault(id(metric), {})
        child = cache.get(label)
        if child is None:
            child = cache[label] = metric.labels(label)
        return child

    def value(self, name, **labels):
        """The current value of a sample, for tests and the CLI."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else v

    def service(self, endpoint, reactor):
        """
        A service serving ``/metrics`` on the server endpoint string
        C{endpoint}.
        """
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        return StreamServerEndpointService(serverFromString(reactor, endpoint), Site(root))
