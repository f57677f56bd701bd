"""One way to open the project's SQLite files (site state, privacy-budget ledger, coordinator ledger, replay
cache): autocommit connections with a busy timeout, and write transactions taken with BEGIN IMMEDIATE."""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from privdistill.errors import ConfigError


def connect(path: Path | str, *, timeout: float = 30.0, synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
            wal: bool = False, rows: bool = False, foreign_keys: bool = False,
            read_only: bool = False, check_same_thread: bool = True) -> sqlite3.Connection:
    """An autocommit connection (transactions are explicit: see ``transaction``). ``synchronous=FULL`` for
    files whose last commit must survive a power cut (the privacy budget, the site's shard register).
    ``read_only``: open an existing file with ``mode=ro`` (never creates it; FileNotFoundError when absent).
    ``check_same_thread=False``: the connection may be closed from another thread (it is still used by one)."""
    if read_only:
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        db = sqlite3.connect(uri, timeout=timeout, isolation_level=None, uri=True, check_same_thread=check_same_thread)
    else:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread)
    if rows:
        db.row_factory = sqlite3.Row
    if foreign_keys:
        db.execute("PRAGMA foreign_keys=ON")
    if read_only:
        return db
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def require_existing(path: Path, what: str, hint: str) -> None:
    """For commands that only read: ConfigError (exit 2) when the database at ``path`` is not there, so a mistyped
    directory creates nothing. ``what`` names the database, ``hint`` says what to check."""
    if not Path(path).is_file():
        raise ConfigError([f"no {what} at {path}: {hint}"])


@contextmanager
def connection(path: Path | str, **kwargs: Any) -> Iterator[sqlite3.Connection]:
    """``connect(path, **kwargs)``, closed on exit."""
    db = connect(path, **kwargs)
    try:
        yield db
    finally:
        db.close()


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front, so two writers never interleave a read-then-write), COMMIT on
    success, ROLLBACK on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class _Held:
    """A kept connection, closed when the thread that holds it ends (its thread-local storage is dropped)."""

    __slots__ = ("db", "__weakref__")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __del__(self) -> None:
        self.db.close()


class ThreadConnections:
    """One connection per thread, opened by ``open`` on first use and kept (a server's worker threads then skip the
    open and its PRAGMAs on every call); a thread's connection is closed when the thread ends (worker pools retire
    idle threads, so nothing accumulates), and ``close`` closes the rest, from any thread (before a fork, at
    shutdown). A connection is only ever used by the thread that opened it."""

    def __init__(self, open_: Callable[[], sqlite3.Connection]) -> None:
        self._open = open_
        self._local = threading.local()
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _Held(self._open())
            with self._lock:
                self._held.add(held)
        return held.db

    def open_connections(self) -> list[sqlite3.Connection]:
        with self._lock:
            return [h.db for h in self._held]

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held), weakref.WeakSet()
            self._local = threading.local()
        for h in held:
            h.db.close()


@contextmanager
def kept_or_new(threads: ThreadConnections | None, open_: Callable[[], sqlite3.Connection]) -> Iterator[sqlite3.Connection]:
    """This thread's kept connection when ``threads`` is given (left open), else a new one from ``open_``, closed
    after the block."""
    if threads is not None:
        yield threads.get()
        return
    db = open_()
    try:
        yield db
    finally:
        db.close()
