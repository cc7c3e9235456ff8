"""Relay nodes sharing state: the interface (L{p2pnat.cluster.state}) and its backends."""
