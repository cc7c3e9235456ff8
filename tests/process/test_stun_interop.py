"""
Interop evidence for p2pnat.protocol.stun against STUN implementations we did not
write, over real UDP sockets on loopback only (127.0.0.1 and ::1):

- Debian's ``stun`` client (package stun-client, Vovida stund 0.97), a
  classic RFC 3489 client: cookie-less 128-bit ids, CHANGE-REQUEST in every
  request, reads MAPPED-ADDRESS.
- aioice's STUN codec (``pip install aioice``), an RFC 5389/8489 one: it
  checks our FINGERPRINT and decodes our XOR-MAPPED-ADDRESS, over IPv4 and
  IPv6; and we check its MESSAGE-INTEGRITY and FINGERPRINT.

Each part is skipped, with the reason, when its client is not installed.
"""

import os
import re
import shutil
import socket

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from p2pnat.protocol import stun

try:
    from aioice import stun as aiostun
except ImportError:
    aiostun = None

STUN_CLIENT = shutil.which("stun")
NO_STUN_CLIENT = "Debian's stun client is not installed (apt-get install stun-client)"
NO_AIOICE = "aioice is not installed (pip install aioice)"


class BindingServer(protocol.DatagramProtocol):
    """The smallest UDP Binding service: answer_binding on each datagram."""

    def __init__(self):
        self.log = []  # (source, request bytes, answer bytes or None, error reason)

    def datagramReceived(self, data, addr):
        try:
            answer = stun.answer_binding(data, addr)
        except stun.StunError as e:
            self.log.append((addr, data, None, e.reason))
            return
        self.log.append((addr, data, answer, None))
        if answer is not None:
            self.transport.write(answer, addr)


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done):
        self.done = done
        self.output = []

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.done.callback((b"".join(self.output).decode("utf-8", "replace"), reason.value.exitCode))


def run_process(argv, timeout):
    """Run argv, fire with (stdout+stderr, exit code); kill it after timeout."""
    done = defer.Deferred()
    proc = reactor.spawnProcess(_Collect(done), argv[0], argv, env=os.environ)
    killer = reactor.callLater(timeout, proc.signalProcess, "KILL")

    def stop(result):
        if killer.active():
            killer.cancel()
        return result

    return done.addBoth(stop)


class DebianStunClientTests(TestCase):
    """`stun 127.0.0.1:PORT -v` against answer_binding."""

    timeout = 30

    def setUp(self):
        if STUN_CLIENT is None:
            raise SkipTest(NO_STUN_CLIENT)
        self.server = BindingServer()
        self.port = reactor.listenUDP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_reports_mapped_address(self):
        server_port = self.port.getHost().port
        # Usage is "stun HOST[:PORT] [testNumber] [-v]": a bare PORT argument
        # would be taken as a test number (and abort on an assertion).
        output, code = yield run_process([STUN_CLIENT, f"127.0.0.1:{server_port}", "-v"], 20)
        context = f"exit code {code}, output:\n{output}\nserver log: {self.server.log!r}"

        opened = re.findall(r"Opened port (\d+) with fd", output)
        self.assertTrue(opened, context)
        client_port = int(opened[0])
        # The first answer (test I, CHANGE-REQUEST 0) carries the client's own
        # address: on loopback there is no NAT, so it is 127.0.0.1:its port.
        self.assertIn(f"MappedAddress = 127.0.0.1:{client_port}", output, context)
        self.assertIn(f"to 127.0.0.1:{server_port}", output, context)
        self.assertIn("test I = 1", output, context)
        self.assertIn("Primary: Open", output, context)
        # The exit code is the client's NAT-type bitmask, not success: 0x00
        # "Open", | 0x01 port preserved, | 0x10 no hairpin; 0x0C "Blocked",
        # 255 "stun error". Open is what loopback must give.
        self.assertEqual(code & 0x0E, 0, context)

        # What our side did: every request classic (no cookie), answered with
        # MAPPED-ADDRESS; those asking to change IP or port got a 420.
        answered = [(req, ans) for _, req, ans, err in self.server.log if ans is not None]
        self.assertGreaterEqual(len(answered), 3, context)
        for req, ans in answered:
            msg = stun.parse_message(req)
            self.assertTrue(msg.classic, context)
            self.assertEqual(len(req), 28)
            reply = stun.parse_message(ans)
            change = stun.decode_change_request(msg.get(stun.Attr.CHANGE_REQUEST))
            if any(change):
                self.assertEqual(reply.msg_class, stun.MessageClass.ERROR)
                self.assertEqual(len(ans), 36)
            else:
                self.assertEqual(reply.types(), [stun.Attr.MAPPED_ADDRESS])
                self.assertEqual(len(ans), 32)
        self.assertEqual([err for *_, err in self.server.log if err], [], context)


class _Client(protocol.DatagramProtocol):
    """Send datagrams, hand each answer to whoever waits for the next one."""

    def __init__(self):
        self.waiting = []

    def datagramReceived(self, data, addr):
        if self.waiting:
            self.waiting.pop(0).callback((data, addr))

    def ask(self, data, dest):
        d = defer.Deferred()
        self.waiting.append(d)
        self.transport.write(data, dest)
        return d.addTimeout(5, reactor)


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class AioiceOverUDPTests(TestCase):
    """aioice-encoded requests to our server, aioice-decoded answers."""

    timeout = 20

    def setUp(self):
        if aiostun is None:
            raise SkipTest(NO_AIOICE)

    def listen(self, proto, host):
        port = reactor.listenUDP(0, proto, interface=host)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def exchange(self, host):
        server = BindingServer()
        server_port = self.listen(server, host)
        client = _Client()
        client_port = self.listen(client, host)

        # Plain Binding request with FINGERPRINT.
        req = aiostun.Message(aiostun.Method.BINDING, aiostun.Class.REQUEST)
        req.add_fingerprint()
        data, addr = yield client.ask(bytes(req), (host, server_port))
        self.assertEqual(addr[:2], (host, server_port))
        res = aiostun.parse_message(data)  # checks our FINGERPRINT
        self.assertEqual(res.message_class, aiostun.Class.RESPONSE)
        self.assertEqual(res.transaction_id, req.transaction_id)
        self.assertEqual(res.attributes["XOR-MAPPED-ADDRESS"], (host, client_port))
        self.assertIn("FINGERPRINT", res.attributes)
        self.assertEqual(len(data), 40 if host == "127.0.0.1" else 52)

        # USERNAME + MESSAGE-INTEGRITY: understood, ignored, answered.
        req = aiostun.Message(aiostun.Method.BINDING, aiostun.Class.REQUEST,
                              attributes={"USERNAME": "peer:me"})
        req.add_message_integrity(b"secret")
        data, _ = yield client.ask(bytes(req), (host, server_port))
        res = aiostun.parse_message(data)
        self.assertEqual(res.attributes["XOR-MAPPED-ADDRESS"], (host, client_port))

        # CHANGE-REQUEST with a flag: 420, which aioice reads as such.
        req = aiostun.Message(aiostun.Method.BINDING, aiostun.Class.REQUEST,
                              attributes={"CHANGE-REQUEST": stun.CHANGE_PORT})
        data, _ = yield client.ask(bytes(req), (host, server_port))
        res = aiostun.parse_message(data)
        self.assertEqual(res.message_class, aiostun.Class.ERROR)
        self.assertEqual(res.attributes["ERROR-CODE"][0], 420)

        # Our own client request, answered by our server, read by us.
        tid, data = stun.binding_request()
        answer, _ = yield client.ask(data, (host, server_port))
        self.assertEqual(stun.parse_binding_response(answer, tid).mapped, (host, client_port))

    def test_ipv4(self):
        return self.exchange("127.0.0.1")

    def test_ipv6(self):
        if not _ipv6_loopback():
            raise SkipTest("no IPv6 loopback (::1) here")
        return self.exchange("::1")


class AioiceCodecTests(SynchronousTestCase):
    """Each codec reads what the other wrote, integrity included."""

    def setUp(self):
        if aiostun is None:
            raise SkipTest(NO_AIOICE)

    def test_aioice_reads_ours(self):
        tid, data = stun.binding_request(change_ip=True, padding=0)
        msg = aiostun.parse_message(data)  # checks our FINGERPRINT
        self.assertEqual(msg.transaction_id, tid)
        self.assertEqual(msg.attributes["CHANGE-REQUEST"], stun.CHANGE_IP)
        ours = stun.Message(stun.Method.BINDING, stun.MessageClass.SUCCESS, tid, [
            (stun.Attr.XOR_MAPPED_ADDRESS, stun.encode_xor_address("2001:db8::5", 5000, stun.MAGIC_COOKIE.to_bytes(4, "big") + tid)),
            (stun.Attr.USERNAME, b"a:b"),
        ])
        data = stun.encode_message(ours, integrity_key=b"pw", fingerprint=True)
        msg = aiostun.parse_message(data)
        self.assertEqual(msg.attributes["XOR-MAPPED-ADDRESS"], ("2001:db8::5", 5000))
        self.assertTrue(msg.check_message_integrity(b"pw"))
        self.assertFalse(msg.check_message_integrity(b"other"))

    def test_we_read_aioice(self):
        res = aiostun.Message(aiostun.Method.BINDING, aiostun.Class.RESPONSE, attributes={
            "XOR-MAPPED-ADDRESS": ("192.0.2.44", 4444),
            "OTHER-ADDRESS": ("192.0.2.45", 3479),
            "RESPONSE-ORIGIN": ("192.0.2.45", 3478),
        })
        res.add_message_integrity(b"pw")
        data = bytes(res)
        result = stun.parse_binding_response(data, res.transaction_id)
        self.assertEqual(result, stun.BindingResult(("192.0.2.44", 4444), ("192.0.2.45", 3478), ("192.0.2.45", 3479)))
        msg = stun.parse_message(data)
        self.assertTrue(msg.has_fingerprint)
        self.assertTrue(stun.verify_integrity(msg, b"pw"))
        self.assertFalse(stun.verify_integrity(msg, b"other"))
