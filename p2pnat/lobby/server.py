# -*- test-case-name: tests.unit.test_lobby_server -*-
"""
The lobby's logic: presence of logged-in clients, the
introduction of A to B and of B's answer to A, the per-session keys, and
the relay of datagrams between two peers that cannot go direct.

Driven by L{p2pnat.net.udp.ControlProtocol}: every message here has passed
its MAC and replay checks.  Times come from the clock given.
"""

import os
from collections import OrderedDict

from p2pnat.daemon.logs import Logger
from p2pnat.net.udp import TokenBucket
from p2pnat.protocol import p2p as M
from p2pnat.protocol import wire


class ByteBudget:
    """C{rate} bytes per second, with a burst of one second's worth."""

    __slots__ = ("clock", "rate", "tokens", "then")

    def __init__(self, clock, rate):
        self.clock = clock
        self.rate = rate
        self.tokens = rate
        self.then = clock.seconds()

    def take(self, n):
        now = self.clock.seconds()
        self.tokens = min(self.rate, self.tokens + (now - self.then) * self.rate)
        self.then = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class Presence:
    """
    A logged-in client: where its keepalives come from, its NAT, and
    whether it reads candidate lists (L{M.FLAG_CANDIDATES} on its Login).
    """

    __slots__ = ("id", "addr", "socket", "local", "nat", "seen", "candidates_ok")

    def __init__(self, id, addr, socket, local, nat, seen, candidates_ok=False):
        self.id = id
        self.addr = addr
        self.socket = socket
        self.local = local
        self.nat = nat
        self.seen = seen
        self.candidates_ok = candidates_ok


class Pending:
    """A connect request waiting for B's answer (and its retransmissions)."""

    __slots__ = ("a", "b", "request_id", "a_addr", "a_socket", "a_local", "a_nat", "session_id",
                 "session_key", "created", "answer", "a_candidates", "a_reads")

    def __init__(self, a, b, request_id, a_addr, a_socket, a_local, a_nat, session_id,
                 session_key, created, a_candidates=(), a_reads=False):
        self.a, self.b, self.request_id = a, b, request_id
        self.a_addr, self.a_socket, self.a_local, self.a_nat = a_addr, a_socket, a_local, a_nat
        self.session_id, self.session_key, self.created = session_id, session_key, created
        #: A's valid candidates, and whether A reads B's (its request's flag).
        self.a_candidates, self.a_reads = a_candidates, a_reads
        #: (accepted, b_addr, b_local, b_nat, b_candidates, b_reads) once B answered.
        self.answer = None


class Session:
    """
    An introduced pair: its key, the fresh mapping the lobby observed for
    each role (the source of A's request and of B's answer: the only
    address that role may be relayed to), and where each role is bound.
    """

    __slots__ = ("id", "key", "peers", "observed", "binds", "created", "used", "budget")

    def __init__(self, id, key, a, b, created, budget, observed):
        self.id = id
        self.key = key
        self.peers = {"a": a, "b": b}
        self.observed = observed  # role -> (host, port)
        self.binds = {}  # role -> (addr, socket)
        self.created = created
        self.used = created
        self.budget = budget


class Lobby:
    """
    @param client_key: C{client_key(client_id) -> bytes | None}.
    @param keepalive: seconds between a client's keepalives; presence
        expires after three missed ones.
    @param relay_rate: bytes per second one session may have relayed.
    """

    log = Logger(namespace="p2pnat.lobby")

    _FROM_CLIENTS = frozenset({wire.Ping.TYPE, M.Login.TYPE, M.Keepalive.TYPE, M.Logout.TYPE,
                               M.ConnectRequest.TYPE, M.Answer.TYPE})
    _FROM_PEERS = frozenset({M.RelayBind.TYPE, M.Data.TYPE, M.PathKeepalive.TYPE,
                             M.PathClose.TYPE})

    def __init__(self, client_key, clock, metrics, *, keepalive=20, relay_rate=512 * 1024,
                 request_rate=5.0, session_ttl=600.0, max_sessions=100_000, random=os.urandom):
        self.client_key = client_key
        self.clock = clock
        self.metrics = metrics
        self.keepalive = keepalive
        self.relay_rate = relay_rate
        self.session_ttl = session_ttl
        self.max_sessions = max_sessions
        self._random = random
        self.presence = {}
        self.pending = {}  # (a, request_id) -> Pending
        self.by_request = {}  # (b, request_id) -> Pending
        #: Sessions by ID, least recently active first (see L{_touch}).
        self.sessions = OrderedDict()
        self.request_limit = TokenBucket(clock, request_rate, request_rate * 2)

    # -- ControlProtocol handler -------------------------------------------------

    def key_for(self, key_id, mtype):
        if mtype in self._FROM_CLIENTS:
            return self.client_key(key_id)
        if mtype in self._FROM_PEERS:
            parsed = M.parse_session_key_id(key_id)
            if parsed is None:
                return None
            s = self.sessions.get(parsed[0])
            return s.key if s is not None else None
        return None

    def handle(self, frame, message, addr, proto):
        now = self.clock.seconds()
        if isinstance(message, wire.Ping):
            return wire.Pong(frame.timestamp, addr, int(now * 1e6))
        handler = getattr(self, "_on_" + type(message).__name__, None)
        if handler is None:
            return None
        return handler(frame, message, addr, proto, now)

    # -- presence ---------------------------------------------------------------

    def _on_Login(self, frame, m, addr, proto, now):
        cid = frame.key_id
        known = self.presence.get(cid)
        if known is None or known.addr != addr:
            self.log.info("client {client} logged in from {addr}", client=cid, addr=wire.format_addr(addr))
        self.presence[cid] = Presence(cid, addr, proto, m.local, m.nat, now,
                                      bool(frame.flags & M.FLAG_CANDIDATES))
        self.metrics.online.set(len(self.presence))
        return self._welcome(frame, addr, proto, now)

    def _welcome(self, frame, addr, proto, now):
        """
        Answer a Login or Keepalive with a L{M.Welcome} flagged
        L{M.FLAG_CANDIDATES} (this lobby relays candidates): sent here, as
        replies returned to the socket carry no flags; never larger than
        the request, as every reply.
        """
        welcome = M.Welcome(frame.timestamp, addr, int(now * 1e6), self.keepalive)
        data = wire.seal(welcome, frame.key_id, self.client_key(frame.key_id), proto.stamper(),
                         flags=M.FLAG_CANDIDATES)
        if len(data) > len(frame.signed) + len(frame.mac):
            return proto.drop("would-amplify", addr, f"Welcome {len(data)} bytes")
        proto.send(data, addr, "Welcome")
        return None

    def _on_Keepalive(self, frame, m, addr, proto, now):
        p = self.presence.get(frame.key_id)
        if p is None:
            return M.Refusal(0, 5)
        if p.addr != addr:
            self.log.info("client {client} now at {addr}", client=p.id, addr=wire.format_addr(addr))
        p.addr, p.socket, p.seen = addr, proto, now
        return self._welcome(frame, addr, proto, now)

    def _on_Logout(self, frame, m, addr, proto, now):
        if self.presence.pop(frame.key_id, None) is not None:
            self.log.info("client {client} logged out", client=frame.key_id)
            self.metrics.online.set(len(self.presence))

    def expire(self):
        """Forget clients that missed three keepalives, stale requests and idle sessions."""
        now = self.clock.seconds()
        for cid in [c for c, p in self.presence.items() if now - p.seen > 3 * self.keepalive]:
            del self.presence[cid]
            self.log.info("client {client} timed out", client=cid)
        for key in [k for k, p in self.pending.items() if now - p.created > 60]:
            p = self.pending.pop(key)
            self.by_request.pop((p.b, p.request_id), None)
        while self.sessions:
            # Least recently active first: stop at the first one still live.
            oldest = next(iter(self.sessions.values()))
            if now - oldest.used <= self.session_ttl:
                break
            del self.sessions[oldest.id]
        self.metrics.online.set(len(self.presence))
        self.metrics.active_sessions.set(len(self.sessions))

    # -- introductions ----------------------------------------------------------

    def _on_ConnectRequest(self, frame, m, addr, proto, now):
        a = frame.key_id
        if a not in self.presence:
            return M.Refusal(m.request_id, 5)
        p = self.pending.get((a, m.request_id))
        if p is None:
            if not self.request_limit.allow(a):
                return M.Refusal(m.request_id, 4)
            if self.client_key(m.peer) is None:
                return M.Refusal(m.request_id, 1)
            b = self.presence.get(m.peer)
            if b is None or m.peer == a:
                return M.Refusal(m.request_id, 2)
            if (m.peer, m.request_id) in self.by_request:
                return M.Refusal(m.request_id, 4)
            p = Pending(a, m.peer, m.request_id, addr, proto, m.local, m.nat, self._random(16),
                        self._random(32), now, self._valid_candidates(m, addr, proto),
                        bool(frame.flags & M.FLAG_CANDIDATES))
            self.pending[(a, m.request_id)] = p
            self.by_request[(m.peer, m.request_id)] = p
            self.metrics.sessions.labels("requested").inc()
            self.log.info("{a} asks for {b}: A's fresh mapping {addr}", a=a, b=m.peer,
                          addr=wire.format_addr(addr))
        elif p.a_addr != addr:
            return None  # a retransmission must come from the same fresh mapping
        if p.answer is not None:
            # B already answered: the Introduce was lost; send it again.
            self._introduce(p)
            return None
        b = self.presence.get(p.b)
        if b is None:
            return M.Refusal(m.request_id, 2)
        key = self.client_key(p.b)
        invite = M.Invite(p.request_id, a, p.a_addr, p.a_local, p.a_nat, p.session_id,
                          M.seal_session_key(key, p.session_id, p.session_key),
                          candidates=p.a_candidates if b.candidates_ok else ())
        # The flag tells B whether A gets B's candidates.
        self._send(b.socket, invite, p.b, key, b.addr, M.FLAG_CANDIDATES if p.a_reads else 0)
        return None

    def _valid_candidates(self, m, addr, proto):
        """
        The candidates of a request or answer that peers may be given: the
        rest (loopback, multicast, unspecified, link-local … see
        L{M.valid_candidate}) and repeats are dropped, and counted.  The
        decoder already refused lists longer than L{M.MAX_CANDIDATES}.
        """
        valid = tuple(dict.fromkeys(c for c in m.candidates if M.valid_candidate(c)))
        if len(valid) != len(m.candidates):
            proto.drop("bad-candidate", addr, f"{len(m.candidates) - len(valid)} of"
                                              f" {len(m.candidates)} candidates")
        return valid

    def _on_Answer(self, frame, m, addr, proto, now):
        b = frame.key_id
        p = self.by_request.get((b, m.request_id))
        if p is None:
            return None
        if p.answer is None:
            p.answer = (m.accepted, addr, m.local, m.nat, self._valid_candidates(m, addr, proto),
                        bool(frame.flags & M.FLAG_CANDIDATES))
            if m.accepted:
                while len(self.sessions) >= self.max_sessions:
                    # At the cap, the least recently active session makes
                    # room (the table is kept in that order): O(1), where a
                    # full expiry scan per answer made the lobby fall over
                    # at 100 000 sessions; and a session still relaying
                    # outlives any number of idle ones made after it.
                    self.sessions.popitem(last=False)
                    self.metrics.sessions.labels("evicted").inc()
                self.sessions[p.session_id] = Session(
                    p.session_id, p.session_key, p.a, p.b, now,
                    ByteBudget(self.clock, self.relay_rate), {"a": p.a_addr, "b": addr})
                self.metrics.sessions.labels("introduced").inc()
                self.metrics.active_sessions.set(len(self.sessions))
            else:
                self.metrics.sessions.labels("refused").inc()
            self.log.info("{b} {verb} {a}: B's fresh mapping {addr}", b=b, a=p.a, addr=wire.format_addr(addr),
                          verb="accepts" if m.accepted else "refuses")
        self._introduce(p)
        return M.AnswerAck(m.request_id, addr)

    def _introduce(self, p):
        accepted, b_addr, b_local, b_nat, b_candidates, b_reads = p.answer
        key = self.client_key(p.a)
        if key is None:
            return
        sealed = M.seal_session_key(key, p.session_id, p.session_key) if accepted else bytes(32)
        intro = M.Introduce(p.request_id, p.b, b_addr, b_local, b_nat, p.session_id, sealed,
                            accepted, b_candidates if p.a_reads else ())
        # The flag tells A whether B got A's candidates.
        self._send(p.a_socket, intro, p.a, key, p.a_addr, M.FLAG_CANDIDATES if b_reads else 0)

    def _send(self, proto, message, key_id, key, addr, flags=0):
        data = wire.seal(message, key_id, key, proto.stamper(), flags=flags)
        proto.send(data, addr, type(message).__name__)

    # -- relay --------------------------------------------------------------------

    def _session(self, frame):
        sid, role = M.parse_session_key_id(frame.key_id)
        return self.sessions.get(sid), role

    def _touch(self, s, now):
        """C{s} was active now: it moves to the end of the eviction order."""
        s.used = now
        self.sessions.move_to_end(s.id)

    def _on_RelayBind(self, frame, m, addr, proto, now):
        s, role = self._session(frame)
        if s is None:
            return None
        if addr != s.observed[role]:
            # Both peers hold the session key: without this, either could
            # bind the other's role, or its own to any (spoofed) address,
            # and have the lobby send the other's datagrams there.
            proto.drop("relay-bind-elsewhere", addr, f"{role} of session {s.id.hex()[:8]}")
            return None
        if s.binds.get(role, (None,))[0] != addr:
            self.log.info("relaying session {sid} for {client} at {addr}", sid=s.id.hex()[:8],
                          client=s.peers[role], addr=wire.format_addr(addr))
        s.binds[role] = (addr, proto)
        self._touch(s, now)
        return M.RelayBound(len(s.binds) == 2)

    def _forward(self, frame, addr, now, raw_size):
        s, role = self._session(frame)
        if s is None:
            return "no-session"
        mine = s.binds.get(role)
        if mine is None or mine[0] != addr:
            return "relay-unbound"  # only from the bound address: no reflection
        other = s.binds.get("b" if role == "a" else "a")
        if other is None:
            return "relay-no-peer"
        if not s.budget.take(raw_size):
            return "relay-rate-limited"
        self._touch(s, now)
        return other

    def relay(self, frame, data, addr, now):
        """
        Forward a peer's datagram, as it is, to the other peer's bound
        address; the receiver checks its MAC with the session key.

        @return: None, or the drop reason.
        """
        target = self._forward(frame, addr, now, len(data))
        if isinstance(target, str):
            return target
        taddr, tproto = target
        tproto.send(data, taddr, "relayed")
        self.metrics.packets_out.labels("relayed").inc()
        return None

    def _on_Data(self, frame, m, addr, proto, now):
        why = self.relay(frame, frame.signed + frame.mac, addr, now)
        if why:
            proto.drop(why, addr)

    _on_PathKeepalive = _on_Data
    _on_PathClose = _on_Data

