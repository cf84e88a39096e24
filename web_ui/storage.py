"""Where votes and conversation logs go: SQLite (the default, one file) or Redis.

One small interface, `ArenaStore`, two implementations passing one test suite. Writes are
all-or-nothing and idempotent by id: `add_votes` stores a whole batch or none of it, and a
battle id that is already stored is skipped (so a double click, a retry or a second import
never counts a vote twice). The methods are synchronous; the web app calls them in a thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from pagedserve.web_ui.battle_log import Battle, ChatLog


class StoreError(RuntimeError):
    """The store could not be read or written (disk, database or Redis failure)."""


class ArenaStore(ABC):
    @abstractmethod
    def add_votes(self, battles: Sequence[Battle]) -> int:
        """Store the battles not stored yet, all in one transaction; returns how many."""

    def add_vote(self, battle: Battle) -> bool:
        """Store one vote; False when its battle id was already stored."""
        return self.add_votes([battle]) == 1

    @abstractmethod
    def votes(self) -> list[Battle]:
        """Every stored vote, oldest first."""

    @abstractmethod
    def add_chat(self, log: ChatLog) -> None: ...

    @abstractmethod
    def chats(self) -> list[ChatLog]:
        """Every conversation log, oldest first."""

    def rated_votes(self) -> list[Battle]:
        """The votes the leaderboard counts: anonymous, no identity given away."""
        return [b for b in self.votes() if b.rated]

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        pass


def _dump(record: Battle | ChatLog) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False)


class SQLiteStore(ArenaStore):
    """Two tables: `votes` (one row per battle, the searchable fields as columns and the whole
    record as JSON) and `chats`. One connection, guarded by a lock, shared by threads."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS votes (
        battle_id TEXT PRIMARY KEY,
        tstamp REAL NOT NULL,
        model_a TEXT NOT NULL,
        model_b TEXT NOT NULL,
        winner TEXT NOT NULL,
        anony INTEGER NOT NULL,
        leaked_identity INTEGER NOT NULL,
        judge TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS votes_by_time ON votes (tstamp);
    CREATE TABLE IF NOT EXISTS chats (
        log_id TEXT PRIMARY KEY,
        tstamp REAL NOT NULL,
        session_id TEXT NOT NULL,
        mode TEXT NOT NULL,
        model TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS chats_by_time ON chats (tstamp);
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != ":memory:":
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(self.SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the SQLite database {self.path}: {e}") from e

    def add_votes(self, battles: Sequence[Battle]) -> int:
        rows = [
            (
                b.battle_id, b.tstamp, b.model_a, b.model_b, b.winner, int(b.anony),
                int(b.leaked_identity), b.judge, _dump(b),
            )
            for b in battles
        ]  # fmt: skip
        with self._lock:
            try:
                with self._db:  # one transaction: all rows or none
                    before = self._db.total_changes
                    self._db.executemany(
                        "INSERT OR IGNORE INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                    )
                    return self._db.total_changes - before
            except sqlite3.Error as e:
                raise StoreError(f"could not store votes in {self.path}: {e}") from e

    def votes(self) -> list[Battle]:
        return [Battle.from_dict(d) for d in self._records("votes")]

    def add_chat(self, log: ChatLog) -> None:
        row = (log.log_id, log.tstamp, log.session_id, log.mode, log.model, _dump(log))
        with self._lock:
            try:
                with self._db:
                    self._db.execute("INSERT OR IGNORE INTO chats VALUES (?, ?, ?, ?, ?, ?)", row)
            except sqlite3.Error as e:
                raise StoreError(f"could not store a chat log in {self.path}: {e}") from e

    def chats(self) -> list[ChatLog]:
        return [ChatLog.from_dict(d) for d in self._records("chats")]

    def _records(self, table: str) -> list[dict]:
        with self._lock:
            try:
                rows = self._db.execute(
                    f"SELECT record FROM {table} ORDER BY tstamp, rowid"
                ).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"could not read {table} from {self.path}: {e}") from e
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Store a record unless its id is there already, and index it by time, in one step.
_ADD_IF_NEW = """
local added = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
    added = added + 1
  end
end
return added
"""


class RedisStore(ArenaStore):
    """Layout under `prefix`: {prefix}:votes (hash id -> JSON), {prefix}:votes:order (sorted
    set by timestamp), and the same two keys for chats. A batch is one Lua script call, which
    Redis runs atomically."""

    def __init__(self, url: str, prefix: str = "pagedserve:arena", timeout: float = 5.0) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self._errors = redis.RedisError
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._add = self._redis.register_script(_ADD_IF_NEW)
        try:
            self._redis.ping()  # refuse to start on a Redis that is not there
        except self._errors as e:
            self._redis.close()
            raise StoreError(f"cannot reach Redis at {url}: {e}") from e

    def _keys(self, kind: str) -> list[str]:
        return [f"{self.prefix}:{kind}", f"{self.prefix}:{kind}:order"]

    def _put(self, kind: str, items: list[tuple[str, float, str]]) -> int:
        argv: list[str | float] = []
        for key, tstamp, record in items:
            argv += [key, tstamp, record]
        try:
            return int(self._add(keys=self._keys(kind), args=argv)) if argv else 0
        except self._errors as e:
            raise StoreError(f"Redis at {self.url} failed: {e}") from e

    def _get(self, kind: str) -> list[dict]:
        records_key, order_key = self._keys(kind)
        try:
            ids = self._redis.zrange(order_key, 0, -1)
            raw = self._redis.hmget(records_key, ids) if ids else []
        except self._errors as e:
            raise StoreError(f"Redis at {self.url} failed: {e}") from e
        return [json.loads(r) for r in raw if r is not None]

    def add_votes(self, battles: Sequence[Battle]) -> int:
        return self._put("votes", [(b.battle_id, b.tstamp, _dump(b)) for b in battles])

    def votes(self) -> list[Battle]:
        return [Battle.from_dict(d) for d in self._get("votes")]

    def add_chat(self, log: ChatLog) -> None:
        self._put("chats", [(log.log_id, log.tstamp, _dump(log))])

    def chats(self) -> list[ChatLog]:
        return [ChatLog.from_dict(d) for d in self._get("chats")]

    def close(self) -> None:
        self._redis.close()


def open_store(
    db_path: str | Path | None = None, redis_url: str | None = None, prefix: str | None = None
) -> ArenaStore:
    """Redis when a URL is given, else SQLite at `db_path`."""
    if redis_url:
        return RedisStore(redis_url, prefix or "pagedserve:arena")
    if db_path is None:
        raise ValueError("give a SQLite path (--db) or a Redis URL (--redis-url)")
    return SQLiteStore(db_path)
