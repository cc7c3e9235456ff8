# -*- test-case-name: tests.unit.test_config -*-
"""
Daemon configuration: TOML files checked against a declared schema.

Each daemon declares its settings as a list of :class:`Setting` (a dotted
name such as ``"udp.listen"``, a type, a default and a one-line help).  A
config file is a TOML document whose tables follow the dotted names::

    [udp]
    listen = ["0.0.0.0:3478"]

Every setting can also be given on the command line as ``--udp-listen``;
the command line wins over the file, the file over the default.

Whatever is wrong (a missing file, a TOML syntax error, an unknown key, a
value of the wrong type or out of range) raises :class:`ConfigError` whose
message names the file and the key, so that ``twistd`` prints one line and
exits non-zero instead of a traceback.
"""

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable


class ConfigError(Exception):
    """
    A configuration problem, with a message fit to show a user as is.
    """


@dataclass(frozen=True)
class Setting:
    """
    One configuration key.

    @ivar name: dotted name, e.g. ``"relay.access_check_period"``.
    @ivar kind: one of ``str``, ``int``, ``float``, ``bool``, ``list``.
    @ivar default: value used when neither file nor command line sets it.
    @ivar check: optional callable raising ``ValueError`` with a reason.
    """

    name: str
    kind: type
    default: Any
    help: str
    check: Callable[[Any], None] | None = None
    item: type | None = None  # element type for lists

    @property
    def option(self):
        """The command-line option name, without dashes: ``udp-listen``."""
        return self.name.replace(".", "-").replace("_", "-")


def _type_name(kind):
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list"}[kind]


def coerce(setting, value, where, from_cli=False):
    """
    Check C{value} (from TOML, or with C{from_cli} a string from the command
    line) against C{setting} and return it in the setting's type.
    """
    kind = setting.kind
    if from_cli and isinstance(value, str) and kind is not str:
        # From the command line.
        try:
            if kind is bool:
                low = value.lower()
                if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                value = low in ("true", "yes", "1", "on")
            elif kind is int:
                value = int(value, 0)
            elif kind is float:
                value = float(value)
            elif kind is list:
                value = [v.strip() for v in value.split(",") if v.strip()]
                if setting.item is not None and setting.item is not str:
                    value = [setting.item(v) for v in value]
        except ValueError:
            raise ConfigError(f"{where}: {setting.name}: expected {_type_name(kind)}, got {value!r}")
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: {setting.name}: expected {_type_name(kind)}, got {value!r}")
    if kind is list and setting.item is not None:
        for v in value:
            if not isinstance(v, setting.item) or isinstance(v, bool) and setting.item is not bool:
                raise ConfigError(
                    f"{where}: {setting.name}: expected a list of {_type_name(setting.item)[2:]}s,"
                    f" got {v!r}")
    if setting.check is not None:
        try:
            setting.check(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {setting.name}: {e}")
    return value


def _flatten(table, prefix=""):
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def load(path, schema, overrides=None):
    """
    Read the TOML file at C{path} (or nothing, if C{path} is None), apply
    C{overrides} (setting name -> command-line string) and return a
    L{Config}.

    @raise ConfigError: anything wrong, with the file and key named.
    """
    by_name = {s.name: s for s in schema}
    values = {s.name: s.default for s in schema}
    base = os.getcwd()
    if path is not None:
        base = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file")
        except PermissionError:
            raise ConfigError(f"{path}: permission denied")
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file")
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}")
        for name, value in _flatten(data):
            if name not in by_name:
                raise ConfigError(f"{path}: {name}: unknown key")
            values[name] = coerce(by_name[name], value, path)
    from_cli = set()
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        values[name] = coerce(by_name[name], value, f"--{by_name[name].option}", True)
        from_cli.add(name)
    return Config(values, path=path, base=base, from_cli=from_cli)


@dataclass
class Config:
    """
    Checked settings of one daemon; index it with the dotted name.

    @ivar path: the file it came from, or None.
    @ivar base: the directory relative paths in it are resolved against.
    @ivar from_cli: names of the settings given on the command line.
    """

    values: dict
    path: str | None = None
    base: str = field(default_factory=os.getcwd)
    from_cli: set = field(default_factory=set)

    def __getitem__(self, name):
        return self.values[name]

    def where(self, name):
        """
        Where setting C{name} came from, for error messages: the config
        file, or the command-line option.
        """
        if name in self.from_cli:
            return f"--{name.replace('.', '-').replace('_', '-')}"
        return self.path or "defaults"

    def error(self, name, message):
        """A L{ConfigError} naming where C{name} came from, and C{name}."""
        return ConfigError(f"{self.where(name)}: {name}: {message}")

    def path_of(self, name):
        """
        A path setting, resolved relative to the config file's directory
        (or to the working directory when given on the command line).
        """
        value = self.values[name]
        if not value:
            return value
        base = os.getcwd() if name in self.from_cli else self.base
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# Checks shared by the daemons' schemas.

def positive(value):
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")


def non_negative(value):
    if value < 0:
        raise ValueError(f"must not be negative, got {value!r}")


def port_number(value):
    if not 0 <= value <= 65535:
        raise ValueError(f"not a port number: {value!r}")


def one_of(*choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
    return check


def parse_hostport(text, default_host=None):
    """
    Parse ``"host:port"``, ``"[v6]:port"`` or (with C{default_host})
    ``":port"``/``"port"`` into ``(host, port)``; an IPv6 host comes without
    its brackets (``"[::]:7478"`` is ``("::", 7478)``).  An IPv6 address
    must be in brackets: ``2001:db8::1:7478`` could be read two ways.

    @raise ValueError: with a reason.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected host:port, got {text!r}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(f"expected [ipv6]:port, got {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = "", text
        elif ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets, as in [2001:db8::1]:7478;"
                             f" got {text!r}")
    if not host:
        if default_host is None:
            raise ValueError(f"expected host:port, got {text!r}")
        host = default_host
    try:
        portnum = int(port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}")
    if not 0 <= portnum <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, portnum


def listen_address(text):
    """
    Parse a listen address, ``"ip:port"`` or ``"[ipv6]:port"``
    (``"0.0.0.0:7478"`` and ``"[::]:7478"`` for every address of each
    family), into ``(ip, port)``.

    @raise ValueError: with a reason.
    """
    host, port = parse_hostport(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: listen address must be an IP address,"
                         f" as in 0.0.0.0:7478 or [::]:7478")
    return host, port


def udp_addresses(value):
    """Check a list of ``ip:port``/``[ipv6]:port`` UDP listen addresses."""
    if not value:
        raise ValueError("needs at least one address")
    for item in value:
        listen_address(item)


def hostport(value):
    parse_hostport(value)


def endpoint_or_empty(value):
    """Check a Twisted server endpoint string, or the empty string (off)."""
    if value and ":" not in value:
        raise ValueError(f"expected an endpoint such as tcp:9100:interface=127.0.0.1, got {value!r}")


def listen_endpoints(value):
    """
    The listeners of a TCP listen setting: its space-separated items, each
    ``("address", (ip, port))`` for a listen address (``"0.0.0.0:8443"``,
    ``"[::]:8443"``, ``"[2001:db8::1]:8443"``: TCP on that address; an IPv6
    one takes IPv6 only, so that it can stand beside an IPv4 one on the same
    port) or ``("endpoint", description)`` for a Twisted endpoint string
    (``"tcp:8443"``, ``"tcp6:8443:interface=\\:\\:"``).  Empty: none.

    @raise ValueError: with a reason.
    """
    found = []
    for item in value.split():
        if item[0].isdigit() or item[0] == "[":
            found.append(("address", listen_address(item)))
        elif ":" in item and item.partition(":")[0].isalnum():
            found.append(("endpoint", item))
        else:
            raise ValueError(f"expected listen addresses or endpoints such as 0.0.0.0:8443,"
                             f" [::]:8443 or tcp:8443:interface=127.0.0.1, got {item!r}")
    return found


def endpoints_or_empty(value):
    """Check a TCP listen setting (see L{listen_endpoints}); the empty string turns it off."""
    listen_endpoints(value)


# Settings every daemon has.
COMMON = [
    Setting("log.level", str, "info", "least severe log level written: debug, info, warn, error",
            one_of("debug", "info", "warn", "error")),
    Setting("log.json", str, "", "also write JSON log events (one per line) to this file"),
    Setting("metrics.listen", str, "",
            "endpoint serving Prometheus metrics at /metrics, e.g. tcp:9100:interface=127.0.0.1;"
            " empty turns it off", endpoint_or_empty),
]


KEY_LEN = 32  # as p2pnat.protocol.wire.KEY_LEN (config does not import the wire format)


def read_mac_key(config, name):
    """
    Read the MAC key file named by setting C{name} (see
    L{p2pnat.deployment.pki.read_mac_key}: hex, owner-only, L{KEY_LEN}
    bytes).

    @raise ConfigError: naming the config file, the setting and the problem.
    """
    from p2pnat.deployment.pki import PKIError
    from p2pnat.deployment.pki import read_mac_key as read

    try:
        return read(config.path_of(name))
    except PKIError as e:
        raise ConfigError(f"{config.where(name)}: {name}: {e}")
