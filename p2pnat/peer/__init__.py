"""
p2pnat.peer: the peer-to-peer path.

NAT behaviour: :mod:`p2pnat.protocol.nat` (classification of discovery
observations, port prediction, the choice of punch strategy -- pure logic)
and :mod:`p2pnat.peer.discovery` (the client side of RFC 5780 style
discovery against the lobby's addresses).  The lobby's logic, the wire
messages, the client, the punch executor and the path live beside them.
"""
