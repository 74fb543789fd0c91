"""Relational SQLite store for the tau-bench worlds, one isolated in-memory copy per episode.

Each entity kind (users, orders, products, flights, reservations) is one table: the record id
(primary key), the exact record as JSON text, a `dirty` flag, and a few scalar columns derived
from the record (foreign keys, status, lookup fields) with indexes for the tools' queries.
The JSON text is kept verbatim because tau-bench answers with `json.dumps(record)` and key order
shows in those strings; rowid order is the source dict's insertion order, which tau-bench's
"first match" lookups depend on.

A `World` is a loaded template; `World.fork()` copies it with SQLite's backup API into a fresh
in-memory connection (well under a millisecond per MB). Writes set `dirty`, so the reward
compares only the records an episode (or its gold replay) touched.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import sqlite3
import threading
from typing import Any, Iterator

from tarl_jax.sandbox import domains
from tarl_jax.sandbox.domains import Extractor
from tarl_jax.sandbox.tasks import find_data_dir


def _scalar(value: Any) -> Any:
    """A value SQLite can bind: agent-written records may hold lists where strings belong."""
    if value is None or isinstance(value, (int, float)) or _is_utf8(value):
        return value
    return json.dumps(value)


def _is_utf8(value: Any) -> bool:
    """A str SQLite can store (JSON may carry lone surrogates, which UTF-8 cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Db:
    """One episode's database: `tables` maps table name -> {column: extractor(record)}."""

    def __init__(self, conn: sqlite3.Connection, tables: dict[str, dict[str, Extractor]]):
        self.conn = conn
        self.tables = tables
        self._depth = 0

    def text(self, table: str, key: Any) -> str | None:
        """The record's JSON text or None; like `key in dict` it rejects unhashable keys."""
        hash(key)
        if not _is_utf8(key):
            return None
        row = self.conn.execute(f"SELECT record FROM {table} WHERE id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get(self, table: str, key: Any) -> dict | None:
        """The record as a fresh dict, or None."""
        text = self.text(table, key)
        return None if text is None else json.loads(text)

    def require(self, table: str, key: Any) -> dict:
        """The record; a missing one raises KeyError as `dict[key]` would."""
        record = self.get(table, key)
        if record is None:
            raise KeyError(key)
        return record

    def put(self, table: str, key: str, record: dict) -> None:
        """Insert (appended last, as a new dict key would be) or replace in place."""
        cols = self.tables[table]
        names = ["id", "record", "dirty", *cols]
        values = [key, json.dumps(record), 1, *(_scalar(f(record)) for f in cols.values())]
        updates = ", ".join(f"{n} = excluded.{n}" for n in names[1:])
        self.conn.execute(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates}", values)

    def scan(self, table: str, **where: Any) -> Iterator[tuple[str, dict]]:
        """(id, record) in insertion order, filtered on derived columns by equality."""
        for col in where:
            if col not in self.tables[table]:
                raise KeyError(f"{table} has no column {col}")
        cond = " AND ".join(f"{c} = ?" for c in where) or "1"
        sql = f"SELECT id, record FROM {table} WHERE {cond} ORDER BY rowid"
        for key, text in self.conn.execute(sql, [_scalar(v) for v in where.values()]):
            yield key, json.loads(text)

    def dirty(self) -> dict[tuple[str, str], str]:
        """(table, id) -> record JSON text for every record written in this episode."""
        out = {}
        for table in self.tables:
            for key, text in self.conn.execute(f"SELECT id, record FROM {table} WHERE dirty = 1"):
                out[table, key] = text
        return out

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """All writes inside happen, or (on an exception) none do."""
        name = f"sp{self._depth}"
        self._depth += 1
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            raise
        finally:
            self.conn.execute(f"RELEASE {name}")
            self._depth -= 1

    def export(self) -> dict[str, dict[str, Any]]:
        """tau-bench's JSON structure: {table: {id: record}} in insertion order."""
        return {t: {k: json.loads(s) for k, s in
                    self.conn.execute(f"SELECT id, record FROM {t} ORDER BY rowid")}
                for t in self.tables}


def _connect() -> sqlite3.Connection:
    # isolation_level=None: we issue SAVEPOINTs ourselves; a large page size makes backups cheap.
    conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA page_size = 65536")
    return conn


def load_tables(conn: sqlite3.Connection, tables: dict[str, dict[str, Extractor]],
                data: dict[str, dict[str, dict]]) -> Db:
    db = Db(conn, tables)
    for table, cols in tables.items():
        defs = "".join(f", {c}" for c in cols)
        conn.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, record TEXT NOT NULL, "
                     f"dirty INTEGER NOT NULL DEFAULT 0{defs})")
        conn.execute(f"CREATE INDEX {table}_dirty ON {table} (dirty) WHERE dirty = 1")
        for c in cols:
            conn.execute(f"CREATE INDEX {table}_{c} ON {table} ({c})")
        for key, record in data.get(table, {}).items():
            db.put(table, key, record)
        conn.execute(f"UPDATE {table} SET dirty = 0")
    return db


class World:
    """A loaded template database plus what an episode needs to act in it.

    `flavor` is "v1" (tau-bench) or "tau2" (tau2-bench): same records, different tools.
    """

    def __init__(self, domain: str, flavor: str, data: dict[str, dict[str, dict]],
                 policy: str = ""):
        self.domain, self.flavor, self.policy = domain, flavor, policy
        self.spec = domains.get(domain, flavor)
        if self.spec.normalize:
            data = {t: {k: self.spec.normalize[t](r) for k, r in data.get(t, {}).items()}
                    for t in self.spec.tables}
        self._template = load_tables(_connect(), self.spec.tables, data)
        self._lock = threading.Lock()
        self.gold_cache: dict[str, Any] = {}

    @classmethod
    def from_dir(cls, domain: str, data_dir: str | pathlib.Path) -> "World":
        """The template database of a tau-bench v1 or tau2 domain directory, or of a root
        holding one (`sandbox.tasks.find_data_dir` says which)."""
        found = find_data_dir(data_dir, domain)
        path = found.path
        if found.flavor == "tau2":
            data = json.loads((path / "db.json").read_text())
            return cls(domain, "tau2", data, (path / "policy.md").read_text())
        tables = domains.get(domain, "v1").tables
        data = {t: json.loads((path / f"{t}.json").read_text()) for t in tables}
        return cls(domain, "v1", data, (path / "wiki.md").read_text())

    @classmethod
    def from_tables(cls, domain: str, tables: dict, policy: str = "",
                    flavor: str = "v1") -> "World":
        return cls(domain, flavor, tables, policy)

    def fork(self) -> Db:
        conn = _connect()
        with self._lock:
            self._template.conn.backup(conn)
        return Db(conn, self.spec.tables)

    def initial_text(self, table: str, key: str) -> str | None:
        with self._lock:
            return self._template.text(table, key)
