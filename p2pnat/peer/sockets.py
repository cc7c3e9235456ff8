# -*- test-case-name: tests.unit.test_peer_candidates -*-
"""
Long-lived sockets that many sessions share: the client's IPv6 socket
and its port-mapped IPv4 socket.  Their addresses are candidates the
lobby passes to peers, so they cannot be opened afresh for each session
as the IPv4 punch sockets are.

A L{SharedSocket} tells its sessions apart by the key ID of each frame
(``SESSION.ROLE``, see L{p2pnat.protocol.p2p.session_key_id}), and gives
each session a L{SessionPort}: an object that the punch and the path use
as they use a socket of their own (C{handler}, C{send}, C{transport} with
C{stopListening}), where stopping only ends that session's lease.
"""

from p2pnat.daemon.logs import Logger


class SessionPort:
    """
    One session's lease on a L{SharedSocket}, with the interface of a
    L{p2pnat.net.udp.ControlProtocol} that punches and paths use.

    @ivar handler: receives the frames of the session's peer.
    @ivar transport: this object while the lease lasts, None after
        L{stopListening}.
    """

    def __init__(self, shared, peer_key_id, handler):
        self.shared = shared
        self.peer_key_id = peer_key_id
        self.handler = handler
        self.transport = self

    @property
    def family(self):
        return self.shared.family

    def send(self, data, addr, kind):
        self.shared.proto.send(data, addr, kind)

    def getHost(self):
        return self.shared.proto.transport.getHost()

    def getHandle(self):
        # A shared socket's TTL stays as it is: other sessions send on it.
        raise AttributeError("a shared socket has no handle to give")

    def stopListening(self):
        """End the lease (the socket stays open for the other sessions)."""
        if self.transport is not None:
            self.transport = None
            self.shared.release(self)


class SharedSocket:
    """
    A UDP socket open for the client's lifetime, demultiplexed by session.

    @param proto: the L{p2pnat.net.udp.ControlProtocol} bound to it; its
        handler becomes this object.
    @param address: the C{(ip, port)} peers send to (the bound address, or
        for a port-mapped socket the mapping's external address is given
        to peers instead; see L{LobbyClient.candidates}).
    @param name: ``"ipv6"`` or ``"mapped"``, for logs and reports.
    """

    log = Logger(namespace="p2pnat.client")

    #: Sessions leasing one socket at a time, at most (each lease is one
    #: punch or one path; a bound, so that a peer cannot make us keep
    #: state without end).
    MAX_LEASES = 1024

    def __init__(self, proto, address, name):
        self.proto = proto
        self.address = address
        self.name = name
        self.family = 6 if ":" in address[0] else 4
        self.leases = {}  # the peer's key ID -> SessionPort
        proto.handler = self

    def lease(self, session, handler):
        """
        A L{SessionPort} for C{session}, whose peer's frames go to
        C{handler}; None when the socket is closed or at L{MAX_LEASES}.
        """
        if self.proto.transport is None or len(self.leases) >= self.MAX_LEASES:
            return None
        old = self.leases.get(session.peer_key_id)
        if old is not None:
            old.transport = None  # one lease per session: the newest wins
        port = SessionPort(self, session.peer_key_id, handler)
        self.leases[session.peer_key_id] = port
        return port

    def release(self, port):
        if self.leases.get(port.peer_key_id) is port:
            del self.leases[port.peer_key_id]

    def close(self):
        """Close the socket (the client stops): every lease ends with it."""
        for port in list(self.leases.values()):
            port.transport = None
        self.leases.clear()
        if self.proto.transport is not None:
            return self.proto.transport.stopListening()
        return None

    # -- ControlProtocol handler: only the frames of a leasing session's peer --------

    def key_for(self, key_id, mtype):
        port = self.leases.get(key_id)
        return port.handler.key_for(key_id, mtype) if port is not None else None

    def handle(self, frame, message, addr, proto):
        port = self.leases.get(frame.key_id)
        if port is None:
            return None
        return port.handler.handle(frame, message, addr, port)
