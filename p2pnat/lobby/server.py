# -*- test-case-name: tests.unit.test_lobby_server -*-
"""
The lobby's logic: presence of logged-in clients, the
introduction of A to B and of B's answer to A, the per-session keys, and
the relay of datagrams between two peers that cannot go direct.

Driven by L{p2pnat.net.udp.ControlProtocol}: every message here has passed
its MAC and replay checks.  Times come from the clock given.

In a cluster of lobby nodes (L{p2pnat.cluster.lobby}) a request for a
client logged into another node is forwarded to that node, which sends
the Invite from the socket the client's presence uses and returns its
Answer.  A relayed session runs on one node: the asking client's, which
made the session.  The other node's client binds its role there, to the
node's relay address its Invite names, with a proof made from a bind
secret of its role (L{Session.secrets}): that node never observed the
client's fresh mapping, and the asking client, who holds the session key,
must not be able to bind the other's role.
"""

import hmac
import os
from collections import OrderedDict

from p2pnat.cluster.lobby import (
    REFUSAL_CLUSTER_DOWN,
    ClusterUnavailable,
    addr_in,
    addr_out,
    candidates_in,
    nat_in,
    nat_out,
)
from p2pnat.daemon.logs import Logger, Throttle
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
                 "session_key", "created", "answer", "a_candidates", "a_reads", "a_node",
                 "b_node", "relay", "bind_secret")

    def __init__(self, a, b, request_id, a_addr, a_socket, a_local, a_nat, session_id,
                 session_key, created, a_candidates=(), a_reads=False):
        self.a, self.b, self.request_id = a, b, request_id
        self.a_addr, self.a_socket, self.a_local, self.a_nat = a_addr, a_socket, a_local, a_nat
        self.session_id, self.session_key, self.created = session_id, session_key, created
        #: A's valid candidates, and whether A reads B's (its request's flag).
        self.a_candidates, self.a_reads = a_candidates, a_reads
        #: (accepted, b_addr, b_local, b_nat, b_candidates, b_reads) once B answered.
        self.answer = None
        #: In a cluster: the node A or B is logged into when not this one
        #: (None: here).  A's node relays the session: it makes B's bind
        #: secret; B's node learns it and that node's relay address, for
        #: B's Invite.
        self.a_node = self.b_node = None
        self.relay = self.bind_secret = None


class Session:
    """
    An introduced pair: its key, the fresh mapping the lobby observed for
    each role (the source of A's request and of B's answer: the only
    address that role may be relayed to), and where each role is bound.
    """

    __slots__ = ("id", "key", "peers", "observed", "binds", "created", "used", "budget",
                 "secrets")

    def __init__(self, id, key, a, b, created, budget, observed, secrets=None):
        self.id = id
        self.key = key
        self.peers = {"a": a, "b": b}
        self.observed = observed  # role -> (host, port), or None for a role with a secret
        self.binds = {}  # role -> (addr, socket)
        self.created = created
        self.used = created
        self.budget = budget
        #: In a cluster, role -> bind secret for the role logged into
        #: another node: this node never saw that client's fresh mapping,
        #: so its bind proves the role (L{M.bind_proof}) instead.
        self.secrets = secrets or {}


class Lobby:
    """
    @param client_key: C{client_key(client_id) -> bytes | None}.
    @param keepalive: seconds between a client's keepalives; presence
        expires after three missed ones.
    @param relay_rate: bytes per second one session may have relayed.
    @param cluster: the L{p2pnat.cluster.lobby.ILobbyCluster} of a lobby
        node, or None: a single lobby, exactly as before clusters.
    """

    log = Logger(namespace="p2pnat.lobby")

    _FROM_CLIENTS = frozenset({wire.Ping.TYPE, M.Login.TYPE, M.Keepalive.TYPE, M.Logout.TYPE,
                               M.ConnectRequest.TYPE, M.Answer.TYPE})
    _FROM_PEERS = frozenset({M.RelayBind.TYPE, M.Data.TYPE, M.PathKeepalive.TYPE,
                             M.PathClose.TYPE})

    def __init__(self, client_key, clock, metrics, *, keepalive=20, relay_rate=512 * 1024,
                 request_rate=5.0, session_ttl=600.0, max_sessions=100_000, random=os.urandom,
                 cluster=None):
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
        self.cluster = cluster
        #: In a cluster: requests from another node's clients for ours, by (a, request ID).
        self.remote = {}
        self.locating = set()  # (a, request ID) being looked up in the cluster
        #: This node's address as clients of other nodes reach it, to bind
        #: the sessions it relays (the tap sets it once the sockets are bound).
        self.relay_address = None
        self._throttle = Throttle(clock)

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
        if self.cluster is not None:
            self.cluster.present(cid, addr, now)
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
            return M.Refusal(0, M.NOT_LOGGED_IN)
        if p.addr != addr:
            self.log.info("client {client} now at {addr}", client=p.id, addr=wire.format_addr(addr))
        p.addr, p.socket, p.seen = addr, proto, now
        if self.cluster is not None:
            self.cluster.present(p.id, addr, now)
        return self._welcome(frame, addr, proto, now)

    def _on_Logout(self, frame, m, addr, proto, now):
        if self.presence.pop(frame.key_id, None) is not None:
            self.log.info("client {client} logged out", client=frame.key_id)
            self.metrics.online.set(len(self.presence))
            if self.cluster is not None:
                self.cluster.gone(frame.key_id)

    def expire(self):
        """Forget clients that missed three keepalives, stale requests and idle sessions."""
        now = self.clock.seconds()
        for cid in [c for c, p in self.presence.items() if now - p.seen > 3 * self.keepalive]:
            del self.presence[cid]
            self.log.info("client {client} timed out", client=cid)
            if self.cluster is not None:
                self.cluster.gone(cid)
        for table in (self.pending, self.remote):
            for key in [k for k, p in table.items() if now - p.created > 60]:
                p = table.pop(key)
                if self.by_request.get((p.b, p.request_id)) is p:
                    del self.by_request[(p.b, p.request_id)]
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
            return M.Refusal(m.request_id, M.NOT_LOGGED_IN)
        p = self.pending.get((a, m.request_id))
        if p is None:
            if (a, m.request_id) in self.locating:
                return None  # a retransmission while the cluster is asked
            if not self.request_limit.allow(a):
                return M.Refusal(m.request_id, 4)
            b = self.presence.get(m.peer)
            if b is None and m.peer != a and self.cluster is not None:
                # Not logged in here: perhaps on another node.
                return self._locate(frame, m, addr, proto)
            if self.client_key(m.peer) is None:
                return M.Refusal(m.request_id, 1)
            if b is None or m.peer == a:
                return M.Refusal(m.request_id, 2)
            if (m.peer, m.request_id) in self.by_request:
                return M.Refusal(m.request_id, 4)
            p = self._pending(frame, m, addr, proto, now)
            self.by_request[(m.peer, m.request_id)] = p
        elif p.a_addr != addr:
            return None  # a retransmission must come from the same fresh mapping
        if p.answer is not None:
            # B already answered: the Introduce was lost; send it again.
            self._introduce(p)
            return None
        if p.b_node is not None:
            self._invite_remote(p)
            return None
        b = self.presence.get(p.b)
        if b is None:
            return M.Refusal(m.request_id, 2)
        self._invite(p, b)
        return None

    def _pending(self, frame, m, addr, proto, now, b_node=None):
        """A's request, its session ID and key made (once, here): a new L{Pending}."""
        p = Pending(frame.key_id, m.peer, m.request_id, addr, proto, m.local, m.nat,
                    self._random(16), self._random(32), now,
                    self._valid_candidates(m, addr, proto), bool(frame.flags & M.FLAG_CANDIDATES))
        p.b_node = b_node
        if b_node is not None:
            # This node relays the session: B binds here with a proof.
            p.bind_secret = self._random(M.BIND_SECRET_LEN)
        self.pending[(p.a, p.request_id)] = p
        self.metrics.sessions.labels("requested").inc()
        self.log.info("{a} asks for {b}{where}: A's fresh mapping {addr}", a=p.a, b=p.b,
                      addr=wire.format_addr(addr),
                      where=f" (on node {b_node})" if b_node is not None else "")
        return p

    def _invite(self, p, b):
        """
        Send B (logged in here, as C{b}) the Invite, from the socket its
        presence uses; for A of another node, with the relay's address and
        B's bind secret.
        """
        key = self.client_key(p.b)
        relay = {}
        if p.a_node is not None:
            relay = {"relay": p.relay, "sealed_secret": M.seal_bind_secret(
                key, p.session_id, p.bind_secret)}
        invite = M.Invite(p.request_id, p.a, p.a_addr, p.a_local, p.a_nat, p.session_id,
                          M.seal_session_key(key, p.session_id, p.session_key),
                          candidates=p.a_candidates if b.candidates_ok else (), **relay)
        # The flag tells B whether A gets B's candidates.
        self._send(b.socket, invite, p.b, key, b.addr, M.FLAG_CANDIDATES if p.a_reads else 0)

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
            if p.a_node is None:
                self._answered(p, now)  # else A's node has the session
            self.log.info("{b} {verb} {a}: B's fresh mapping {addr}", b=b, a=p.a, addr=wire.format_addr(addr),
                          verb="accepts" if m.accepted else "refuses")
        self._introduce(p)
        return M.AnswerAck(m.request_id, addr)

    def _answered(self, p, now):
        """
        B answered A's request C{p}: an accepted one becomes a session,
        relayed from A's and B's fresh mappings, or, for B on another
        node, from where B binds with the proof of its bind secret.
        """
        if not p.answer[0]:
            self.metrics.sessions.labels("refused").inc()
            return
        while len(self.sessions) >= self.max_sessions:
            # At the cap, the least recently active session makes
            # room (the table is kept in that order): O(1), where a
            # full expiry scan per answer made the lobby fall over
            # at 100 000 sessions; and a session still relaying
            # outlives any number of idle ones made after it.
            self.sessions.popitem(last=False)
            self.metrics.sessions.labels("evicted").inc()
        remote = p.b_node is not None
        observed = {"a": p.a_addr, "b": None if remote else p.answer[1]}
        self.sessions[p.session_id] = Session(
            p.session_id, p.session_key, p.a, p.b, now, ByteBudget(self.clock, self.relay_rate),
            observed, {"b": p.bind_secret} if remote else None)
        self.metrics.sessions.labels("introduced").inc()
        self.metrics.active_sessions.set(len(self.sessions))

    def _introduce(self, p):
        accepted, b_addr, b_local, b_nat, b_candidates, b_reads = p.answer
        if p.a_node is not None:
            # A is on another node: it introduces, and relays; the session
            # key stays with the two nodes (A's made it).
            d = self.cluster.send(p.a_node, {
                "t": "answer", "a": p.a, "rid": p.request_id, "accepted": accepted,
                "b_addr": addr_out(b_addr), "b_local": addr_out(b_local),
                "b_nat": nat_out(b_nat), "cands": [addr_out(c) for c in b_candidates],
                "reads": b_reads})
            d.addErrback(lambda f: self._warn(
                "answer", "cannot pass {b}'s answer to node {node}: {error}", b=p.b,
                node=p.a_node, error=f.getErrorMessage()))
            return
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

    # -- across lobby nodes (a cluster) -------------------------------------------

    def _locate(self, frame, m, addr, proto):
        """
        Ask the cluster where B is; then forward A's request to B's node, or
        refuse it.  Retransmissions meanwhile are ignored (L{locating}).
        """
        a, rid = frame.key_id, m.request_id
        self.locating.add((a, rid))

        def found(where):
            status, node = where
            if a not in self.presence:
                return
            if status == "online" and node != self.cluster.node:
                if (a, rid) not in self.pending:
                    p = self._pending(frame, m, addr, proto, self.clock.seconds(), node)
                    self._invite_remote(p)
                return
            # An entry naming this node is one this node has already
            # forgotten (it expires by itself).
            known = status != "unknown" or self.client_key(m.peer) is not None
            self._refuse(a, rid, addr, proto, 2 if known else 1)

        def failed(failure):
            failure.trap(ClusterUnavailable)
            self._warn("locate", "request from {a} for {b} refused: cannot reach the"
                       " cluster's shared state ({error})", a=a, b=m.peer,
                       error=failure.getErrorMessage())
            self._refuse(a, rid, addr, proto, REFUSAL_CLUSTER_DOWN)

        def done(result):
            self.locating.discard((a, rid))
            return result

        d = self.cluster.locate(m.peer).addBoth(done)
        d.addCallbacks(found, failed).addErrback(self._failed, "locating a peer")

    def _refuse(self, a, request_id, addr, proto, code):
        """Refuse A's request later than as a reply (after a cluster round trip)."""
        key = self.client_key(a)
        if key is not None:
            self._send(proto, M.Refusal(request_id, code), a, key, addr)

    def _invite_remote(self, p):
        """
        Ask B's node to invite B (again, for each retransmission of A's
        request): it alone can send from the socket B's presence uses.
        """
        fields = {"t": "invite", "a": p.a, "b": p.b, "rid": p.request_id,
                  "a_addr": addr_out(p.a_addr), "a_local": addr_out(p.a_local),
                  "a_nat": nat_out(p.a_nat), "sid": p.session_id.hex(),
                  "key": self.cluster.seal_key(p.session_key, p.session_id, p.a, p.b),
                  "bind": self.cluster.seal_key(p.bind_secret, p.session_id, p.a, p.b, "bind"),
                  "cands": [addr_out(c) for c in p.a_candidates], "reads": p.a_reads,
                  "relay": addr_out(self.relay_address)}

        def sent(receivers):
            if receivers == 0 and p.answer is None:
                self._drop_pending(p, 2, "node {node} is gone")

        def failed(failure):
            failure.trap(ClusterUnavailable)
            if p.answer is None:
                self._drop_pending(p, REFUSAL_CLUSTER_DOWN, "cannot reach the cluster ({error})",
                                   error=failure.getErrorMessage())

        d = self.cluster.send(p.b_node, fields)
        d.addCallbacks(sent, failed).addErrback(self._failed, "forwarding a request")

    def _drop_pending(self, p, refusal, why, **fields):
        if self.pending.get((p.a, p.request_id)) is not p:
            return
        del self.pending[(p.a, p.request_id)]
        self._warn("forward", "request from {a} for {b} refused: " + why, a=p.a, b=p.b,
                   node=p.b_node, **fields)
        self._refuse(p.a, p.request_id, p.a_addr, p.a_socket, refusal)

    def cluster_message(self, fields):
        """
        A signed message from another node (L{p2pnat.cluster.lobby}): an
        invitation for a client of ours, the answer to a request of ours,
        or its refusal.

        @raise KeyError, TypeError, ValueError: a malformed message (the
            cluster logs it, rate-limited).
        """
        kind = fields["t"]
        if kind == "invite":
            self._remote_invite(fields)
        elif kind == "answer":
            self._remote_answer(fields)
        elif kind == "refuse":
            p = self.pending.get((str(fields["a"]), int(fields["rid"])))
            if p is not None and p.b_node == fields["from"] and p.answer is None:
                self._drop_pending(p, int(fields["code"]), "node {node} says {code}",
                                   code=M.REFUSALS.get(int(fields["code"]), fields["code"]))

    def _remote_invite(self, fields):
        a, b, rid, node = str(fields["a"]), str(fields["b"]), int(fields["rid"]), fields["from"]
        present = self.presence.get(b)
        if present is None:
            d = self.cluster.send(node, {"t": "refuse", "a": a, "rid": rid, "code": 2})
            d.addErrback(lambda f: None)  # A's node refuses at its own deadline
            return
        p = self.by_request.get((b, rid))
        if p is None:
            sid = bytes.fromhex(fields["sid"])
            if len(sid) != 16:
                raise ValueError("session ID of the wrong length")
            p = Pending(a, b, rid, addr_in(fields["a_addr"]), None, addr_in(fields["a_local"]),
                        nat_in(fields["a_nat"]), sid,
                        self.cluster.open_key(fields["key"], sid, a, b), self.clock.seconds(),
                        candidates_in(fields["cands"]), bool(fields["reads"]))
            p.a_node, p.relay = node, addr_in(fields["relay"])
            p.bind_secret = self.cluster.open_key(fields["bind"], sid, a, b, "bind")
            self.remote[(a, rid)] = p
            self.by_request[(b, rid)] = p
            self.log.info("{a} (on node {node}) asks for {b}", a=a, b=b, node=node)
        elif p.a_node != node:
            return  # another request with the same ID: the first one stands
        if p.answer is not None:
            self._introduce(p)  # A's node missed the answer
        else:
            self._invite(p, present)

    def _remote_answer(self, fields):
        a, rid = str(fields["a"]), int(fields["rid"])
        p = self.pending.get((a, rid))
        if p is None or p.b_node != fields["from"]:
            return
        if p.answer is None:
            accepted = bool(fields["accepted"])
            p.answer = (accepted, addr_in(fields["b_addr"]), addr_in(fields["b_local"]),
                        nat_in(fields["b_nat"]), candidates_in(fields["cands"]),
                        bool(fields["reads"]))
            self._answered(p, self.clock.seconds())
        self._introduce(p)

    def _failed(self, failure, doing):
        self.log.failure("lobby: {doing} failed", failure, doing=doing)

    def _warn(self, kind, text, **fields):
        held = self._throttle(("lobby", kind))
        if held is not None:
            self.log.warn(text + " ({held} more since the last such line)", held=held, **fields)

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
        secret = s.secrets.get(role)
        if secret is not None:
            # A client of another node: its bind comes from a mapping this
            # node never observed, and proves the role with its secret.
            if not m.proof or not hmac.compare_digest(
                    m.proof, M.bind_proof(secret, frame.key_id, frame.timestamp)):
                proto.drop("relay-bind-unproven", addr, f"{role} of session {s.id.hex()[:8]}")
                return None
        elif addr != s.observed[role]:
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
        tproto.send(data, taddr, "relayed")  # counted there, once
        return None

    def _on_Data(self, frame, m, addr, proto, now):
        why = self.relay(frame, frame.signed + frame.mac, addr, now)
        if why:
            proto.drop(why, addr)

    _on_PathKeepalive = _on_Data
    _on_PathClose = _on_Data

