# -*- test-case-name: tests.unit.test_registry -*-
"""
The embedded store of a small deployment: which devices and lobby clients
exist, their MAC keys, the certificate each device may present, and (for
devices) where and when they were last heard from.

It is one SQLite file (``registry.sqlite3`` in the relay's state
directory), created with mode 0600, in WAL mode with a busy timeout so that
a running daemon and the ``p2pnat`` command can use it at the same time.
The daemon notices the command's changes by polling L{Registry.data_version}
(one cheap pragma) and reloading with L{Registry.load_all} when it moved.

This is a plain blocking class: calls are short (one indexed statement), and
the only one a daemon makes in its hot path is L{Registry.record_access},
once per device per access-check period.  L{Registry.check_credential}
costs a deliberate ~50 ms of scrypt; a daemon should run it in a thread.

Revoking keeps the row (with its revocation time), so that the certificate
fingerprint stays known and refused and the ID is not silently reused.
"""

import base64
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from p2pnat.protocol import wire

#: The schema this code writes; L{_MIGRATIONS} takes a file up to it.
SCHEMA_VERSION = 1

#: The registry's file name in a state directory.
REGISTRY_FILE = "registry.sqlite3"

ACCESS_MODES = ("device", "relay")

# _MIGRATIONS[n] holds the statements that take a file from version n-1 to
# n.  Append; never edit a released step.
_MIGRATIONS = {
    1: [
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "INSERT INTO schema_version (version) VALUES (0)",
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY NOT NULL,
            mac_key BLOB NOT NULL CHECK (length(mac_key) = 32),
            cert_fingerprint TEXT NOT NULL,
            access_mode TEXT NOT NULL DEFAULT 'device'
                CHECK (access_mode IN ('device', 'relay')),
            access_credential_hash TEXT,
            created REAL NOT NULL,
            revoked REAL,
            last_access REAL,
            addr_host TEXT,
            addr_port INTEGER
        )""",
        "CREATE INDEX devices_cert_fingerprint ON devices (cert_fingerprint)",
        """CREATE TABLE clients (
            id TEXT PRIMARY KEY NOT NULL,
            mac_key BLOB NOT NULL CHECK (length(mac_key) = 32),
            created REAL NOT NULL,
            revoked REAL
        )""",
    ],
}


class RegistryError(Exception):
    """
    A registry problem (bad ID, duplicate, unreadable or too new a file),
    with a message fit for a user.
    """


# -- access credentials ------------------------------------------------------

_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
_SCRYPT_LEN = 32


def _b64(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _encode(credential):
    if isinstance(credential, str):
        credential = credential.encode("utf-8")
    if not isinstance(credential, bytes):
        raise TypeError("a credential is str or bytes")
    return credential


def hash_credential(credential, *, salt=None):
    """
    Hash an access credential for storage:
    ``scrypt$n=16384,r=8,p=1$<salt>$<hash>`` (base64, 16-byte random salt).

    @raise RegistryError: for an empty credential.
    """
    credential = _encode(credential)
    if not credential:
        raise RegistryError("an access credential must not be empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(credential, salt=salt, dklen=_SCRYPT_LEN, **_SCRYPT)
    params = ",".join(f"{k}={v}" for k, v in _SCRYPT.items())
    return f"scrypt${params}${_b64(salt)}${_b64(digest)}"


def verify_credential(stored, given):
    """
    Whether C{given} matches the hash C{stored} (from L{hash_credential});
    the final comparison is constant-time.  A malformed C{stored} never
    matches.
    """
    given = _encode(given)
    try:
        scheme, params, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        kw = {k: int(v) for k, v in (item.split("=") for item in params.split(","))}
        if set(kw) != {"n", "r", "p"} or kw["n"] > 2 ** 20 or kw["r"] > 32 or kw["p"] > 16:
            return False
        salt, digest = _unb64(salt), _unb64(digest)
        computed = hashlib.scrypt(given, salt=salt, dklen=len(digest), **kw)
    except (ValueError, AttributeError):
        return False
    return hmac.compare_digest(computed, digest)


@functools.cache
def _dummy_hash():
    """
    Checked against when there is nothing to check against, so that "no such
    device" and "wrong credential" take the same time.  Made on first use:
    it is a scrypt hash, ~75 ms that every command and daemon importing this
    module paid at import.
    """
    return hash_credential(b"\0", salt=bytes(16))


def verify_stored(stored, given):
    """
    L{verify_credential} of C{given} against C{stored}, which may be None
    (no such device, or one without a credential): then false, after as
    long as a real check, so that the time taken tells nothing.
    """
    ok = verify_credential(stored or _dummy_hash(), given)
    return ok and bool(stored)


# -- records -----------------------------------------------------------------

@dataclass(frozen=True)
class DeviceRecord:
    """
    One row of the devices table.  C{mac_key} and the credential hash are
    left out of C{repr}, so that logging a record never logs a secret.

    @ivar access_mode: ``"device"`` (the device's own web UI handles login)
        or ``"relay"`` (the relay asks the terminal for the credential).
    @ivar created: POSIX time.
    @ivar revoked: POSIX time of revocation, or None while active.
    @ivar last_access: POSIX time of the last notify A, or None.
    @ivar addr_host: source address of the last notify A, or None.
    """

    id: str
    mac_key: bytes = field(repr=False)
    cert_fingerprint: str
    access_mode: str
    access_credential_hash: str | None = field(repr=False)
    created: float
    revoked: float | None
    last_access: float | None
    addr_host: str | None
    addr_port: int | None

    @property
    def active(self):
        """Not revoked."""
        return self.revoked is None

    @property
    def address(self):
        """C{(host, port)} of the last notify A, or None."""
        if self.addr_host is None:
            return None
        return (self.addr_host, self.addr_port)

    def accepts(self, cert_fingerprint):
        """
        Whether this device may authenticate with a certificate of this
        fingerprint: it is active and the fingerprint is the one issued.
        """
        return self.active and hmac.compare_digest(
            self.cert_fingerprint.encode("ascii"), cert_fingerprint.lower().encode("ascii"))


@dataclass(frozen=True)
class ClientRecord:
    """One row of the lobby clients table (C{mac_key} left out of C{repr})."""

    id: str
    mac_key: bytes = field(repr=False)
    created: float
    revoked: float | None

    @property
    def active(self):
        return self.revoked is None


_DEVICE_COLUMNS = ("id, mac_key, cert_fingerprint, access_mode, access_credential_hash,"
                   " created, revoked, last_access, addr_host, addr_port")
_CLIENT_COLUMNS = "id, mac_key, created, revoked"


def _device(row):
    return DeviceRecord(row[0], bytes(row[1]), *row[2:])


def _client(row):
    return ClientRecord(row[0], bytes(row[1]), *row[2:])


# Table name -> (its columns, the record made of a row).  Table names come
# only from here, never from input, so they may be put in SQL text.
_TABLES = {"devices": (_DEVICE_COLUMNS, _device), "clients": (_CLIENT_COLUMNS, _client)}


# -- the store ---------------------------------------------------------------

def check_id(kind, key_id):
    """
    Check a device or client ID (C{kind} names which, for the message)
    against the wire's rule: every ID a registry may hold.  New device IDs
    follow a narrower rule too (L{check_new_device_id}).

    @raise RegistryError: not 1-L{wire.MAX_KEY_ID} characters of A-Z a-z
        0-9 . _ -, starting with a letter or digit.
    """
    if not isinstance(key_id, str) or not wire.valid_key_id(key_id):
        raise RegistryError(
            f"invalid {kind} ID {key_id!r}: 1-{wire.MAX_KEY_ID} characters of"
            " A-Z a-z 0-9 . _ -, starting with a letter or digit")


#: What a new device ID may be, as messages say it.
DEVICE_ID_RULE = ("one DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending"
                  " with a letter or digit")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def device_id_problem(device_id):
    """
    Why terminals cannot reach device C{device_id} by name
    (``https://ID.RELAYHOST/``, ``/connect?ID=``), or None when it is a
    lower-case DNS label, as every new ID is (L{check_new_device_id}).
    Registries made before that rule may hold others.
    """
    if _DNS_LABEL.match(device_id):
        return None
    if _DNS_LABEL.match(device_id.lower()):
        return ("it has upper-case letters, and host names are case-insensitive: the relay"
                " looks every name up in lower case")
    if "." in device_id:
        return ("it has a dot: ID.RELAYHOST is then two labels, which the relay's wildcard"
                " certificate does not cover")
    return f"it is not {DEVICE_ID_RULE}"


def check_new_device_id(device_id):
    """
    Check the ID of a device being added: a lower-case DNS label, since
    terminals reach the device at ``ID.RELAYHOST`` and host names are
    case-insensitive.  (Lobby client IDs are never host names: they keep
    the wire's rule, L{check_id}.)

    @raise RegistryError: with what is allowed.
    """
    if not isinstance(device_id, str):
        raise RegistryError(f"invalid device ID {device_id!r}: not a string")
    if _DNS_LABEL.match(device_id.lower()) and not _DNS_LABEL.match(device_id):
        raise RegistryError(f"invalid device ID {device_id!r}: device IDs are lower case,"
                            f" as host names are case-insensitive; use {device_id.lower()!r}")
    if not _DNS_LABEL.match(device_id):
        raise RegistryError(f"invalid device ID {device_id!r}: a device ID is {DEVICE_ID_RULE}"
                            " (terminals reach the device at ID.RELAYHOST)")


def _check_mac_key(mac_key):
    if not isinstance(mac_key, bytes) or len(mac_key) != wire.KEY_LEN:
        raise RegistryError(f"a MAC key is {wire.KEY_LEN} bytes")


def _check_access_mode(mode):
    if mode not in ACCESS_MODES:
        raise RegistryError(f"access mode must be one of {', '.join(ACCESS_MODES)}, got {mode!r}")


def _check_fingerprint(fp):
    if (not isinstance(fp, str) or len(fp) != 64
            or any(c not in "0123456789abcdef" for c in fp.lower())):
        raise RegistryError("a certificate fingerprint is 64 hex digits (SHA-256)")
    return fp.lower()


class Registry:
    """
    The registry file at C{path} (or C{":memory:"}), created and brought up
    to L{SCHEMA_VERSION} on open.

    @param create: if false, a missing file is an error instead of being
        created.
    @param timeout: seconds to wait for another process's write lock.
    @raise RegistryError: missing file (with C{create=False}), not a
        registry, or written by a newer version.
    """

    def __init__(self, path, *, create=True, timeout=5.0):
        self.path = path
        if path != ":memory:":
            if create:
                try:
                    # Make the file ourselves so that it is 0600 from the
                    # start; SQLite gives its -wal and -shm files the same mode.
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    pass
                except OSError as e:
                    raise RegistryError(f"{path}: cannot create: {e.strerror}")
            elif not os.path.exists(path):
                raise RegistryError(f"{path}: no such registry")
        try:
            self._db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise RegistryError(f"{path}: cannot open: {e}")
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    self._db.execute("PRAGMA journal_mode = WAL")
                # Durable at checkpoints; a crash loses at most the last
                # few record_access updates, never corrupts.
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._upgrade()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise RegistryError(f"{path}: not a usable registry: {e}")
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open_state_dir(cls, state_dir, *, create=True, timeout=5.0):
        """
        Open L{REGISTRY_FILE} in C{state_dir}.

        @param create: make the directory (mode 0700) and an empty registry
            if they are missing; if false, a missing registry is an error.
        @raise RegistryError: as for the constructor, or if the directory
            cannot be made.
        """
        if create:
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise RegistryError(f"{state_dir}: cannot create state directory: {e}")
        return cls(os.path.join(state_dir, REGISTRY_FILE), create=create, timeout=timeout)

    # -- plumbing

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _version(self):
        exists = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if not exists:
            if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise RegistryError(f"{self.path}: an SQLite file, but not a p2pnat registry")
            return 0
        row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
        return row[0] or 0

    def _upgrade(self):
        if self._version() == SCHEMA_VERSION:
            return
        # Check again under the write lock: another process may be
        # upgrading the same file right now.
        with self._transaction() as db:
            version = self._version()
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.path}: registry schema version {version} is newer than this"
                    f" p2pnat understands ({SCHEMA_VERSION}); upgrade p2pnat")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (step,))

    def schema_version(self):
        """The schema version of the file."""
        return self._version()

    def data_version(self):
        """
        A number that changes whenever another connection (another
        process, such as the ``p2pnat`` command) commits a change to the
        file; compare it with the last value seen to know when to reload.
        Changes made through this object do not move it.
        """
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # -- the two tables' common rows: id, ..., revoked

    def _insert(self, table, kind, values, replace):
        """
        Add a row: C{values} for its first columns (the ID first), NULL for
        the rest (revocation, history).  With C{replace}, an existing row
        of that ID is overwritten the same way.

        @return: the new row's record.
        @raise RegistryError: the ID exists (and not C{replace}).
        """
        columns, _ = _TABLES[table]
        names = [name.strip() for name in columns.split(",")]
        cells = ", ".join(["?"] * len(values) + ["NULL"] * (len(names) - len(values)))
        sql = f"INSERT INTO {table} ({columns}) VALUES ({cells})"
        if replace:
            sql += " ON CONFLICT (id) DO UPDATE SET " + ", ".join(
                f"{name} = excluded.{name}" for name in names[1:])
        with self._transaction() as db:
            try:
                db.execute(sql, values)
            except sqlite3.IntegrityError:
                if replace:
                    raise  # not a duplicate: a constraint the checks above missed
                raise RegistryError(f"{kind} {values[0]!r} already exists")
        return self._one(table, values[0])

    def _one(self, table, key_id):
        columns, record = _TABLES[table]
        row = self._db.execute(f"SELECT {columns} FROM {table} WHERE id = ?",
                               (key_id,)).fetchone()
        return None if row is None else record(row)

    def _all(self, table, include_revoked):
        columns, record = _TABLES[table]
        where = "" if include_revoked else " WHERE revoked IS NULL"
        return [record(row) for row in self._db.execute(
            f"SELECT {columns} FROM {table}{where} ORDER BY id")]

    def _revoke(self, table, key_id, when):
        when = time.time() if when is None else float(when)
        cur = self._db.execute(
            f"UPDATE {table} SET revoked = ? WHERE id = ? AND revoked IS NULL", (when, key_id))
        return cur.rowcount == 1

    # -- devices

    def add_device(self, device_id, mac_key, cert_fingerprint, access_mode="device",
                   credential=None, *, created=None, replace=False):
        """
        Register a device.

        @param credential: the access credential (str or bytes) for
            C{access_mode="relay"}; stored only as a salted scrypt hash.
        @param created: POSIX time; default: now.
        @param replace: re-provision an existing (possibly revoked) device:
            its key, fingerprint, mode and credential are replaced, it is no
            longer revoked and its last access is forgotten.
        An existing device may be replaced under its old ID even if it
        breaks the rule new IDs follow (L{check_new_device_id}).

        @raise RegistryError: invalid ID, key, fingerprint or mode; a
            credential missing for mode ``relay`` or given for ``device``;
            the device exists (and not C{replace}).
        """
        if not (replace and isinstance(device_id, str) and self.device(device_id) is not None):
            check_new_device_id(device_id)
        _check_mac_key(mac_key)
        cert_fingerprint = _check_fingerprint(cert_fingerprint)
        _check_access_mode(access_mode)
        if access_mode == "relay" and credential is None:
            raise RegistryError("access mode 'relay' needs an access credential")
        if access_mode == "device" and credential is not None:
            raise RegistryError("an access credential is only used with access mode 'relay'")
        cred_hash = None if credential is None else hash_credential(credential)
        created = time.time() if created is None else float(created)
        return self._insert("devices", "device", (
            device_id, mac_key, cert_fingerprint, access_mode, cred_hash, created), replace)

    def device(self, device_id):
        """The L{DeviceRecord} of C{device_id} (revoked or not), or None."""
        return self._one("devices", device_id)

    def devices(self, include_revoked=False):
        """Device records, ordered by ID."""
        return self._all("devices", include_revoked)

    def load_all(self):
        """Every device, revoked ones included, as a dict by ID (for a reload)."""
        return {d.id: d for d in self.devices(include_revoked=True)}

    def revoke_device(self, device_id, *, when=None):
        """
        Mark a device revoked at C{when} (POSIX time; default now).

        @return: True if it was active; False if unknown or already revoked.
        """
        return self._revoke("devices", device_id, when)

    def import_device(self, record):
        """
        Keep a device record made in another node's registry, as the
        shared registry of a cluster holds it (L{DeviceRecord}: key,
        fingerprint, access policy, ``created`` and ``revoked`` as they
        are).  For a device provisioned on another node and revoked on
        this one: this node has no row to mark, and must still refuse the
        device after a restart while the shared registry is away.

        The record replaces a row of the same ID only if it is newer, by
        the cluster's rule (L{p2pnat.cluster.state.newer}): a later
        ``created`` (provisioned again), or a revocation at the same
        ``created``; so an import never brings a revoked device back nor
        undoes a later provisioning.  Last access and address are kept at
        the same ``created``, else forgotten.

        @return: whether the row was added or replaced.
        @raise RegistryError: an invalid ID, key, fingerprint, mode or time.
        """
        check_id("device", record.id)
        _check_mac_key(record.mac_key)
        fingerprint = _check_fingerprint(record.cert_fingerprint)
        _check_access_mode(record.access_mode)
        try:
            created = float(record.created)
            revoked = None if record.revoked is None else float(record.revoked)
        except (TypeError, ValueError):
            created = revoked = math.nan
        if not math.isfinite(created) or not (revoked is None or math.isfinite(revoked)):
            raise RegistryError("created and revoked are POSIX times")
        cred = record.access_credential_hash
        if cred is not None and not isinstance(cred, str):
            raise RegistryError("a credential hash is text")
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO devices (id, mac_key, cert_fingerprint, access_mode,"
                " access_credential_hash, created, revoked) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET mac_key = excluded.mac_key,"
                " cert_fingerprint = excluded.cert_fingerprint,"
                " access_mode = excluded.access_mode,"
                " access_credential_hash = excluded.access_credential_hash,"
                " revoked = excluded.revoked,"
                " last_access = CASE WHEN created = excluded.created THEN last_access END,"
                " addr_host = CASE WHEN created = excluded.created THEN addr_host END,"
                " addr_port = CASE WHEN created = excluded.created THEN addr_port END,"
                " created = excluded.created"
                " WHERE excluded.created > created OR (excluded.created = created"
                " AND excluded.revoked IS NOT NULL AND revoked IS NULL)",
                (record.id, record.mac_key, fingerprint, record.access_mode, cred, created,
                 revoked))
            return cur.rowcount == 1

    def record_access(self, device_id, when, host, port):
        """
        Store a notify A: last access time C{when} (POSIX seconds) and the
        packet's source address.  One UPDATE.

        @return: whether an active device was updated.
        """
        cur = self._db.execute(
            "UPDATE devices SET last_access = ?, addr_host = ?, addr_port = ?"
            " WHERE id = ? AND revoked IS NULL", (float(when), host, port, device_id))
        return cur.rowcount == 1

    def record_accesses(self, accesses):
        """
        L{record_access} for many devices in one transaction (one fsync):
        C{accesses} is an iterable of C{(device_id, when, host, port)}.
        Unknown and revoked devices are skipped.

        @return: how many devices were updated.
        """
        rows = [(float(when), host, port, device_id) for device_id, when, host, port in accesses]
        if not rows:
            return 0
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE devices SET last_access = ?, addr_host = ?, addr_port = ?"
                " WHERE id = ? AND revoked IS NULL", rows)
            return db.total_changes - before

    def check_credential(self, device_id, given):
        """
        Whether C{given} is the access credential of active device
        C{device_id}.  Takes the same (scrypt) time whether or not the
        device exists or has a credential; the comparison is constant-time.
        """
        row = self._db.execute(
            "SELECT access_credential_hash FROM devices WHERE id = ? AND revoked IS NULL",
            (device_id,)).fetchone()
        return verify_stored(row[0] if row is not None else None, given)

    # -- lobby clients

    def add_client(self, client_id, mac_key, *, created=None, replace=False):
        """
        Register a lobby client.

        @param replace: re-provision an existing (possibly revoked) client.
        @raise RegistryError: invalid ID or key; the client exists (and not
            C{replace}).
        """
        check_id("client", client_id)
        _check_mac_key(mac_key)
        created = time.time() if created is None else float(created)
        return self._insert("clients", "client", (client_id, mac_key, created), replace)

    def client(self, client_id):
        """The L{ClientRecord} of C{client_id} (revoked or not), or None."""
        return self._one("clients", client_id)

    def clients(self, include_revoked=False):
        """Client records, ordered by ID."""
        return self._all("clients", include_revoked)

    def load_all_clients(self):
        """Every client, revoked ones included, as a dict by ID."""
        return {c.id: c for c in self.clients(include_revoked=True)}

    def revoke_client(self, client_id, *, when=None):
        """
        Mark a client revoked.

        @return: True if it was active; False if unknown or already revoked.
        """
        return self._revoke("clients", client_id, when)
