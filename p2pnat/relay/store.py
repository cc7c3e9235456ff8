# -*- test-case-name: tests.unit.test_relay_core -*-
"""
The relay's rounds with its store (the SQLite device registry): write the
queued notify-A times, and pick up registry changes (devices added,
revoked or re-provisioned by ``p2pnat device ...``).

A periodic round runs its SQLite work off the reactor thread, through
C{run(f, *args) -> Deferred} (one worker thread in the daemon), on the
worker's own connection: an sqlite3 connection belongs to the thread that
opened it.  What the round read is applied on the reactor thread.
"""

import threading

from twisted.python.failure import Failure

from p2pnat.daemon.logs import Logger


class StoreSync:
    """
    @param table: the L{p2pnat.relay.devices.DeviceTable} whose queued
        notify-A times are written.
    @param open_registry: opens a new L{p2pnat.deployment.registry.Registry}
        connection (called on the worker thread).
    @param run: C{run(f, *args)} runs C{f} on the worker thread, one call at
        a time, and returns a Deferred of its result.
    @param apply: C{apply(records)} on the reactor thread after each round:
        the registry's records if they changed since last read, else None.
    """

    log = Logger(namespace="p2pnat.relay.store")

    def __init__(self, table, open_registry, run, apply):
        self.table = table
        self._open_registry = open_registry
        self._run = run
        self._apply = apply
        self._worker_db = None
        self._worker_thread = None
        self._seen = {}  # connection -> the data_version its records were loaded at
        self._unwritten = {}  # a failed round's writes, retried with the next

    def round(self):
        """
        One round, its SQLite work on the worker.  The Deferred fires when it
        is over and never fails (a failure is logged and its writes are
        retried next round): give it to a LoopingCall, whose next round then
        waits for this one, so that writes stay in order.
        """
        batch = self._take()
        d = self._run(self._work_on_worker, batch)
        d.addCallbacks(self._applied, self._failed, errbackArgs=(batch,))
        return d

    def sync_now(self, registry):
        """The same round at once, on the calling thread, through C{registry}."""
        batch = self._take()
        try:
            records = self._work(registry, batch)
        except Exception:
            return self._failed(Failure(), batch)
        self._applied(records)

    def close(self):
        """
        Stopping: a last round, so that no queued write is lost, then the
        worker's connection is closed (on the worker).

        @return: Deferred firing when done.
        """
        d = self.round()
        d.addCallback(lambda _: self._run(self._close_worker))
        d.addErrback(lambda f: self.log.failure("closing the relay store failed", f))
        return d

    # -- on the reactor thread ----------------------------------------------------

    def _take(self):
        # Newer times (in the table's queue) win over a failed round's.
        batch = {**self._unwritten, **self.table.take_pending()}
        self._unwritten = {}
        return batch

    def _applied(self, records):
        try:
            self._apply(records)
        except Exception:
            self.log.failure("applying registry changes failed; retrying next round")
            self._seen.clear()  # read everything again next round

    def _failed(self, failure, batch):
        self.log.failure("relay store sync failed; retrying next round", failure)
        for device_id, access in batch.items():
            self._unwritten.setdefault(device_id, access)

    # -- on the worker ------------------------------------------------------------

    def _work_on_worker(self, batch):
        if self._worker_db is None or self._worker_thread != threading.get_ident():
            # A (re)started worker thread cannot use another thread's connection.
            self._seen.pop(self._worker_db, None)
            self._worker_db = self._open_registry()
            self._worker_thread = threading.get_ident()
        return self._work(self._worker_db, batch)

    def _work(self, db, batch):
        if batch:
            db.record_accesses([(device_id, when, host, port)
                                for device_id, (when, host, port) in batch.items()])
        # A connection's own writes do not move its data_version: a change
        # is someone else's (the p2pnat command).
        version = db.data_version()
        if self._seen.get(db) == version:
            return None
        records = db.load_all()
        self._seen[db] = version
        return records

    def _close_worker(self):
        db, self._worker_db = self._worker_db, None
        if db is not None and self._worker_thread == threading.get_ident():
            self._seen.pop(db, None)
            db.close()
