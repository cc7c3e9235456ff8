"""
Tests for p2pnat.protocol.portmap: NAT-PMP and PCP requests byte for byte
(from the RFCs' layouts), responses decoded, and malformed input (fuzzed)
rejected with PortmapError and nothing else.
"""

import random
import struct

from twisted.trial.unittest import SynchronousTestCase

from p2pnat.protocol import portmap as P
from p2pnat.protocol.portmap import PortmapError

NONCE = bytes(range(1, 13))


def pcp_map_response(result=0, lifetime=7200, epoch=100, nonce=NONCE, protocol=17,
                     internal=4000, external=4000, ip="198.18.2.1", options=b""):
    header = struct.pack("!BBBBII", 2, 0x81, 0, result, lifetime, epoch) + bytes(12)
    payload = nonce + struct.pack("!B3xHH", protocol, internal, external) + P._mapped(ip)
    return header + payload + options


def natpmp_map_response(result=0, opcode=1, epoch=50, internal=4000, external=4001,
                        lifetime=3600):
    return struct.pack("!BBHIHHI", 0, 128 + opcode, result, epoch, internal, external, lifetime)


class RequestTests(SynchronousTestCase):
    def test_natpmp_external(self):
        self.assertEqual(P.natpmp_external_request(), b"\x00\x00")

    def test_natpmp_map(self):
        self.assertEqual(
            P.natpmp_map_request("udp", 4000, 4001, 7200),
            bytes.fromhex("0001 0000 0fa0 0fa1 00001c20"),
        )
        self.assertEqual(P.natpmp_map_request("tcp", 80, 0, 0)[:2], b"\x00\x02")

    def test_pcp_map(self):
        req = P.pcp_map_request("10.0.1.2", NONCE, "udp", 4000, 7200, external_port=4000)
        self.assertEqual(len(req), 60)
        self.assertEqual(req[:8], bytes.fromhex("02 01 0000 00001c20"))
        self.assertEqual(req[8:24], bytes(10) + b"\xff\xff" + bytes([10, 0, 1, 2]))
        self.assertEqual(req[24:36], NONCE)
        self.assertEqual(req[36:44], bytes.fromhex("11 000000 0fa0 0fa0"))
        # No suggested address: the IPv4-mapped all-zeros address.
        self.assertEqual(req[44:60], bytes(10) + b"\xff\xff" + bytes(4))

    def test_pcp_map_suggested_ip(self):
        req = P.pcp_map_request("10.0.1.2", NONCE, "tcp", 1, 0, 5, "198.18.2.1")
        self.assertEqual(req[36], 6)
        self.assertEqual(req[56:60], bytes([198, 18, 2, 1]))

    def test_pcp_announce(self):
        req = P.pcp_announce_request("10.0.1.2")
        self.assertEqual(len(req), 24)
        self.assertEqual(req[:2], b"\x02\x00")

    def test_bad_arguments(self):
        for call in (
            lambda: P.natpmp_map_request("sctp", 1, 1, 1),
            lambda: P.natpmp_map_request("udp", 0, 1, 1),
            lambda: P.natpmp_map_request("udp", 70000, 1, 1),
            lambda: P.natpmp_map_request("udp", 1, 1, -1),
            lambda: P.natpmp_map_request("udp", 1, 1, 2**32),
            lambda: P.pcp_map_request("10.0.0.1", b"short", "udp", 1, 1),
        ):
            self.assertRaises(PortmapError, call)


class DecodeTests(SynchronousTestCase):
    def test_natpmp_external(self):
        r = P.decode_response(bytes.fromhex("0080 0000 00000010 c6120201"))
        self.assertEqual((r.opcode, r.result, r.epoch, r.external_ip), (0, 0, 16, "198.18.2.1"))
        self.assertIsNone(r.transport)

    def test_natpmp_map(self):
        r = P.decode_response(natpmp_map_response())
        self.assertEqual(r.transport, "udp")
        self.assertEqual((r.internal_port, r.external_port, r.lifetime, r.epoch),
                         (4000, 4001, 3600, 50))
        self.assertEqual(r.result_name, "success")

    def test_natpmp_error_is_short(self):
        # RFC 6886 3.5: "unsupported version" is 8 bytes (e.g. to a PCP request).
        r = P.decode_response(struct.pack("!BBHI", 0, 129, 1, 77))
        self.assertEqual((r.result_name, r.epoch, r.external_port), ("unsupported-version", 77, None))

    def test_pcp_map(self):
        r = P.decode_response(pcp_map_response())
        self.assertEqual(r.opcode_name, "map")
        self.assertEqual((r.result, r.lifetime, r.epoch, r.nonce, r.transport),
                         (0, 7200, 100, NONCE, "udp"))
        self.assertEqual((r.internal_port, r.external_port, r.external_ip),
                         (4000, 4000, "198.18.2.1"))
        self.assertTrue(P.check_pcp_map(r, NONCE, "udp", 4000))

    def test_pcp_map_with_options(self):
        # A THIRD_PARTY-like option of 5 bytes, padded to 8.
        option = bytes([1, 0, 0, 5]) + b"abcde" + bytes(3)
        r = P.decode_response(pcp_map_response(options=option))
        self.assertEqual(r.external_port, 4000)

    def test_pcp_nonce_check(self):
        r = P.decode_response(pcp_map_response(nonce=bytes(12)))
        self.assertFalse(P.check_pcp_map(r, NONCE, "udp", 4000))
        r = P.decode_response(pcp_map_response())
        self.assertFalse(P.check_pcp_map(r, NONCE, "tcp", 4000))
        self.assertFalse(P.check_pcp_map(r, NONCE, "udp", 4001))

    def test_pcp_error_without_payload(self):
        data = struct.pack("!BBBBII", 2, 0x81, 0, 8, 30, 5) + bytes(12)
        r = P.decode_response(data)
        self.assertEqual(r.result_name, "no-resources")
        self.assertIsNone(r.nonce)
        self.assertTrue(P.check_pcp_map(r, NONCE, "udp", 4000))

    def test_pcp_success_without_payload_rejected(self):
        data = struct.pack("!BBBBII", 2, 0x81, 0, 0, 30, 5) + bytes(12)
        self.assertRaises(PortmapError, P.decode_response, data)

    def test_pcp_announce_is_not_a_map(self):
        data = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, 3) + bytes(12)
        r = P.decode_response(data)
        self.assertEqual(r.opcode_name, "announce")
        self.assertFalse(P.check_pcp_map(r, NONCE, "udp", 4000))

    def test_pcp_ipv6_external(self):
        r = P.decode_response(pcp_map_response(ip="2001:db8::1"))
        self.assertEqual(r.external_ip, "2001:db8::1")

    def test_malformed(self):
        cases = {
            b"": "short",
            b"\x01\x80": "version",
            b"\x00\x80\x00": "short",
            bytes.fromhex("0000 0000 00000000 00000000"): "request",
            bytes.fromhex("0080 0000 00000010"): "short",
            natpmp_map_response()[:12]: "short",
            natpmp_map_response(opcode=9): "opcode",
            pcp_map_response()[:20]: "short",
            pcp_map_response() + b"\x00": "length",
            pcp_map_response() + bytes(1100): "length",
            b"\x02\x01" + bytes(58): "request",
            pcp_map_response(options=bytes([1, 0, 0, 40])): "option",
            pcp_map_response(options=bytes([1, 0, 0, 0, 2, 0, 0, 9])): "option",
        }
        for data, reason in cases.items():
            with self.subTest(data=data.hex()):
                e = self.assertRaises(PortmapError, P.decode_response, data)
                self.assertEqual(e.reason, reason)
        self.assertRaises(PortmapError, P.decode_response, "text")

    def test_fuzz(self):
        """Random bytes and mutated valid responses: a response or PortmapError."""
        rng = random.Random(6887)
        seeds = [pcp_map_response(), natpmp_map_response(),
                 bytes.fromhex("0080 0000 00000010 c6120201")]
        for _ in range(3000):
            if rng.random() < 0.3:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
            else:
                data = bytearray(rng.choice(seeds))
                for _ in range(rng.randrange(1, 4)):
                    choice = rng.random()
                    if choice < 0.4 and data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                    elif choice < 0.7:
                        del data[rng.randrange(len(data) + 1):]
                    else:
                        data += bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
                data = bytes(data)
            try:
                r = P.decode_response(data)
            except PortmapError:
                continue
            self.assertIsInstance(r, P.NatPmpResponse | P.PcpResponse)


class EpochTests(SynchronousTestCase):
    def test_steady(self):
        e = P.EpochCheck()
        self.assertTrue(e.observe(1000.0, 50))
        self.assertTrue(e.observe(1060.0, 110))
        self.assertTrue(e.observe(1061.0, 110))  # one-second granularity

    def test_went_back(self):
        e = P.EpochCheck()
        e.observe(1000.0, 500)
        self.assertFalse(e.observe(1010.0, 3))

    def test_too_slow_or_fast(self):
        e = P.EpochCheck()
        e.observe(0.0, 100)
        self.assertFalse(e.observe(1000.0, 200))  # rebooted ~100 s ago
        e = P.EpochCheck()
        e.observe(0.0, 100)
        self.assertFalse(e.observe(10.0, 1000))


class RetransmitTests(SynchronousTestCase):
    def test_schedule(self):
        self.assertEqual(P.retransmit_times(1.0), [0.0, 0.25, 0.75])
        self.assertEqual(P.retransmit_times(0.2), [0.0])
        self.assertEqual(len(P.retransmit_times(10000)), 9)


SSDP_ANSWER = (
    b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:x::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
    b"SERVER: Debian UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.0.1.1:5000/rootDesc.xml\r\n\r\n"
)


class SsdpTests(SynchronousTestCase):
    def test_search(self):
        req = P.ssdp_search(P.IGD_TYPES[0])
        self.assertTrue(req.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"))
        self.assertIn(b"\r\nMX: 1\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n",
                      req)
        self.assertTrue(req.endswith(b"\r\n\r\n"))
        self.assertRaises(PortmapError, P.ssdp_search, "x", 0)

    def test_answer(self):
        self.assertEqual(P.parse_ssdp_response(SSDP_ANSWER),
                         (P.IGD_TYPES[0], "http://10.0.1.1:5000/rootDesc.xml"))

    def test_not_answers(self):
        cases = {
            P.ssdp_search("ssdp:all"): "status",
            b"NOTIFY * HTTP/1.1\r\nLOCATION: http://x/\r\nNT: a\r\n\r\n": "status",
            SSDP_ANSWER.replace(b"LOCATION", b"X-LOC"): "header",
            SSDP_ANSWER.replace(b"http://", b"file://"): "location",
            SSDP_ANSWER.replace(b"OK", b"\xff"): "encoding",
            SSDP_ANSWER + bytes(3000): "length",
            b"": "status",
        }
        for data, reason in cases.items():
            with self.subTest(data=data[:30]):
                self.assertEqual(self.assertRaises(PortmapError, P.parse_ssdp_response,
                                                   data).reason, reason)

    def test_fuzz(self):
        rng = random.Random(1900)
        for _ in range(2000):
            data = bytearray(SSDP_ANSWER)
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(data))
                if rng.random() < 0.5:
                    data[i] = rng.randrange(256)
                else:
                    del data[i:]
                    if not data:
                        break
            try:
                _, location = P.parse_ssdp_response(bytes(data))
            except PortmapError:
                continue
            self.assertTrue(location.startswith("http://"))
