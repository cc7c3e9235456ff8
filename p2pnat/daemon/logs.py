# -*- test-case-name: tests.process.test_daemons -*-
"""
Logging for the daemons, through L{twisted.logger}.

Text goes where twistd sends it (standard output with ``-n``, else
``twistd.log``).  JSON on request, two ways:

- ``twistd --logger p2pnat.daemon.logs.json relay`` writes JSON events, one per
  line, to standard output instead of text (for journald/Loki collectors);
- ``log.json = "/var/log/p2pnat/relay.json"`` in the config adds a JSON
  file beside the text log.

``log.level`` drops p2pnat's events below that level.  Secrets (keys,
nonces, session IDs beyond their first bytes) are never passed to a log
call: log L{redact}ed forms.
"""

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.logger import (
    Logger as _TwistedLogger,
)

_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
           "error": LogLevel.error}


class _Threshold:
    level = LogLevel.debug


_threshold = _Threshold()


class Logger(_TwistedLogger):
    """
    A L{twisted.logger.Logger} that drops events below the configured
    level before formatting them.
    """

    def emit(self, level, format=None, **kwargs):
        if level < _threshold.level:
            return
        super().emit(level, format, **kwargs)


def set_level(name):
    """Set the least severe level p2pnat's loggers emit (from ``log.level``)."""
    _threshold.level = _LEVELS[name]


def json(outFile=None):
    """
    Log observer factory for ``twistd --logger p2pnat.daemon.logs.json``: JSON
    events, one per line, on standard output.
    """
    return jsonFileLogObserver(outFile or sys.stdout, recordSeparator="")


def add_json_file(path):
    """
    Also write JSON events to C{path}; returns the observer so that it can
    be removed.
    """
    f = open(path, "a", encoding="utf-8")
    observer = jsonFileLogObserver(f, recordSeparator="")
    globalLogPublisher.addObserver(observer)
    return observer


def redact(secret, keep=4):
    """
    A loggable stand-in for a secret value (bytes or str): its first
    C{keep} hex digits or characters and its length.
    """
    if isinstance(secret, bytes):
        return f"{secret.hex()[:keep]}…({len(secret)}B)"
    return f"{secret[:keep]}…"


class Throttle:
    """
    At most one log line per key every C{interval} seconds: L{__call__}
    answers whether to log now, and how many were held back since the
    last line.  What keeps a flood of bad input from flooding the logs.
    """

    def __init__(self, clock, interval=10.0, max_keys=64):
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self._last = {}  # key -> [time of the last line, held back since]

    def __call__(self, key):
        """
        @return: None (do not log), or the number held back since the last
            line of C{key}.
        """
        now = self.clock.seconds()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        if entry is None and len(self._last) >= self.max_keys:
            self._last.clear()  # bounded: keys are few (kind x reason) anyway
        held = entry[1] if entry is not None else 0
        self._last[key] = [now, 0]
        return held


__all__ = ["Throttle", "Logger", "set_level", "json", "add_json_file", "redact", "FilteringLogObserver"]
