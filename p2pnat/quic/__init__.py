"""
End-to-end encrypted, mutually authenticated QUIC between two peers of a
deployment, over a UDP socket that also carries p2pnat's own traffic.

- L{identity}: who a peer is (its certificate from the deployment's CA);
- L{connection}: aioquic's sans-IO connection with both sides
  authenticated and receive windows that follow the application;
- L{endpoint}: the Twisted driver (L{endpoint.QuicSocket},
  L{endpoint.QuicEndpoint}): demultiplexing, timers, events;
- L{stream}: a stream as a Twisted transport; L{header}: the service
  header that opens each stream.

``docs/quic.rst`` says what the layer promises.
"""

from p2pnat.quic.endpoint import (
    ConnectionClosed,
    HandshakeFailed,
    QuicEndpoint,
    QuicSocket,
    is_quic,
)
from p2pnat.quic.identity import Credentials, PeerCertificateError, PeerIdentity
from p2pnat.quic.stream import StreamRefused, StreamTransport

__all__ = ["ConnectionClosed", "Credentials", "HandshakeFailed", "PeerCertificateError",
           "PeerIdentity", "QuicEndpoint", "QuicSocket", "StreamRefused", "StreamTransport",
           "is_quic"]
