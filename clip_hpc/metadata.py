"""The id -> path store of an INDEX_DIR, in SQLite: one file, no server, safe to read from many processes.

FAISS only knows integer ids; everything a user sees (paths, prefix filters, exports) goes through this table.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER,
    mtime REAL
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
"""


def prefix_upper_bound(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix`, for an indexed range scan."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""


class MetadataStore:
    """`images(id INTEGER PRIMARY KEY, path TEXT, size INTEGER, mtime REAL)`; size and mtime may be NULL."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection shared by the server's threads
        if readonly:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "MetadataStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, ids: Sequence[int], paths: Sequence[str], sizes: Sequence[int | None] | None = None,
            mtimes: Sequence[float | None] | None = None) -> None:
        """Insert one batch in one transaction (a shard at a time keeps memory flat)."""
        sizes = sizes if sizes is not None else [None] * len(ids)
        mtimes = mtimes if mtimes is not None else [None] * len(ids)
        rows = zip((int(i) for i in ids), paths, sizes, mtimes)
        with self.conn:
            self.conn.executemany("INSERT OR REPLACE INTO images(id, path, size, mtime) VALUES (?, ?, ?, ?)", rows)

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, list(params)).fetchall()

    def count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM images")[0][0])

    def path_of(self, id: int) -> str | None:
        rows = self._rows("SELECT path FROM images WHERE id = ?", (int(id),))
        return rows[0][0] if rows else None

    def paths_of(self, ids: Iterable[int]) -> dict[int, str]:
        """One query per 500 ids (SQLite's parameter limit), so a page of results costs one round trip."""
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            out.update(self._rows(f"SELECT id, path FROM images WHERE id IN ({marks})", chunk))
        return out

    def record(self, id: int) -> dict | None:
        rows = self._rows("SELECT id, path, size, mtime FROM images WHERE id = ?", (int(id),))
        return dict(zip(("id", "path", "size", "mtime"), rows[0])) if rows else None

    def ids_with_prefix(self, prefix: str, limit: int | None = None) -> list[int]:
        """Ids whose path starts with `prefix`, by a range scan on the path index (no LIKE escaping issues)."""
        sql = "SELECT id FROM images WHERE path >= ?"
        params: list[object] = [prefix]
        if prefix:
            sql += " AND path < ?"
            params.append(prefix_upper_bound(prefix))
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [r[0] for r in self._rows(sql, params)]

    def path_bounds(self) -> tuple[str, str] | None:
        """The lowest and highest path (two index lookups): their common prefix is every path's."""
        row = self._rows("SELECT MIN(path), MAX(path) FROM images")[0]
        return None if row[0] is None else (row[0], row[1])

    def all_ids(self) -> list[int]:
        return [r[0] for r in self._rows("SELECT id FROM images ORDER BY id")]

    def random_ids(self, k: int, seed: int | None = None) -> list[int]:
        """Uniform sample without reading the whole table: random rowids probed by the primary key."""
        import random

        rng = random.Random(seed)
        (lo, hi), = self._rows("SELECT MIN(id), MAX(id) FROM images")
        if lo is None:
            return []
        n = self.count()
        if n <= 4 * k:
            ids = self.all_ids()
            rng.shuffle(ids)
            return ids[:k]
        picked: set[int] = set()
        while len(picked) < k:
            candidate = rng.randint(lo, hi)
            picked.add(self._rows("SELECT id FROM images WHERE id >= ? ORDER BY id LIMIT 1", (candidate,))[0][0])
        ids = sorted(picked)
        rng.shuffle(ids)
        return ids
