"""
p2pnat.p2p: the peer-to-peer path (SPEC.md Part 2 and "What we add").

NAT behaviour: :mod:`p2pnat.p2p.nat` (classification of discovery
observations, port prediction, the choice of punch strategy -- pure logic)
and :mod:`p2pnat.p2p.discovery` (the client side of RFC 5780 style
discovery against the lobby's addresses).  The lobby's logic, the wire
messages, the client, the punch executor and the path live beside them.
"""
