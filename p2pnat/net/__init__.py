"""
Twisted glue shared by the daemons and the peer: UDP control sockets, TCP/TLS streams.
"""
