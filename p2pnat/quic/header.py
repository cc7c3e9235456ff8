# -*- test-case-name: tests.unit.test_quic_connection -*-
"""
The header that opens every p2pnat QUIC stream: which service it is for.

The opener's first bytes on a new stream are::

    length(1) service(length)

``service`` is 1 to L{MAX_SERVICE} bytes of ASCII ``a-z 0-9 - _ .``,
starting with a letter or digit (``ssh``, ``http``, ``files.v2``).  The
application's bytes follow at once: there is no answer.  The acceptor
routes the stream to the factory registered under that name; a stream for
a name nobody serves is refused (L{SERVICE_REFUSED}).

Pure: bytes in, a name out.
"""

import re

MAX_SERVICE = 63
#: Application error code on RESET_STREAM / STOP_SENDING for a stream whose
#: service is unknown or whose header is malformed or late.
SERVICE_REFUSED = 0x5001
#: Application error code when the application aborts a stream.
STREAM_ABORTED = 0x5002
#: Application error code on STOP_SENDING after the application closed a
#: stream while the peer was still sending.
STREAM_CLOSED = 0x5003

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}\Z")


class HeaderError(ValueError):
    """A stream header that is malformed, or a service name that is invalid."""


def valid_service(name):
    """Whether C{name} (str) may be used as a service name."""
    return isinstance(name, str) and _NAME.match(name) is not None


def encode(service):
    """
    The header for C{service}.

    @raise HeaderError: if the name is not valid.
    """
    if not valid_service(service):
        raise HeaderError(f"not a valid service name: {service!r} (1-{MAX_SERVICE} "
                          f"characters of a-z, 0-9, '-', '_', '.')")
    return bytes([len(service)]) + service.encode("ascii")


def decode(data):
    """
    Read a header at the start of C{data}.

    @return: C{None} if more bytes are needed, else C{(service, rest)}.
    @raise HeaderError: if the header can never be valid.
    """
    if not data:
        return None
    length = data[0]
    if not 1 <= length <= MAX_SERVICE:
        raise HeaderError(f"service name length {length}")
    if len(data) < 1 + length:
        return None
    raw = data[1:1 + length]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError("service name is not ASCII") from None
    if not valid_service(name):
        raise HeaderError(f"not a valid service name: {name!r}")
    return name, data[1 + length:]
