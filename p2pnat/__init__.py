"""
p2pnat: reach machines behind NAT.

Three Twisted daemons (``twistd lobby``, ``twistd relay``,
``twistd device-agent``), a client library and the ``p2pnat`` command.
"""

__version__ = "0.1.0"
