"""The id -> path store of an INDEX_DIR, in SQLite: one file, no server, safe to read from many processes.

FAISS only knows integer ids; everything a user sees (paths, captions, prefix and caption filters, exports) goes
through this table. Captions are also in an FTS5 table (`captions`, rowid = id) for the full-text filter.
"""

from __future__ import annotations

import errno
import math
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clip_hpc.errors import UserError
from clip_hpc.formats.index_integrity import DamagedIndex

COLUMN_TYPES = (  # the `images` table, in order; every other spelling of its columns is derived from this one
    ("id", "INTEGER PRIMARY KEY"),
    ("path", "TEXT NOT NULL"),
    ("size", "INTEGER"),
    ("mtime", "REAL"),
    ("caption", "TEXT"),
    ("key", "TEXT"),
    ("url", "TEXT"),
    ("offset", "INTEGER"),
    ("similarity", "REAL"),  # image-caption cosine (`embed --captions`); NULL where none was computed
    ("identity", "TEXT"),  # what the server checks before sending the bytes (formats/input_identity.py); NULL: none
)
COLUMNS = tuple(name for name, _ in COLUMN_TYPES)
FIRST_COLUMNS = COLUMNS[:4]  # what the first meta.sqlite held; an older file gains the rest, empty
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS images (
    {", ".join(f"{name} {kind}" for name, kind in COLUMN_TYPES)}
);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
CREATE INDEX IF NOT EXISTS images_similarity ON images(similarity);
CREATE VIRTUAL TABLE IF NOT EXISTS captions USING fts5(caption);
"""
INSERT = f"INSERT OR REPLACE INTO images({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def fts_query(text: str) -> str:
    """Free text -> an FTS5 query matching rows holding every word (each quoted, so no FTS syntax leaks in)."""
    words = re.findall(r"\w+", text)
    if not words:
        raise UserError("the caption filter holds no words")
    return " ".join(f'"{w}"' for w in words)


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix`, for an indexed range scan; None when
    there is none (only U+10FFFF). SQLite orders TEXT by its UTF-8 bytes, i.e. by code point, so the next code
    point bounds the range; the surrogates U+D800-U+DFFF have no UTF-8 form and are stepped over."""
    while prefix:
        last = ord(prefix[-1])
        if last < sys.maxunicode:
            return prefix[:-1] + chr(0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1)
        prefix = prefix[:-1]
    return None


def checked_text(name: str, value: str) -> str:
    """A filter string SQLite can bind: one holding a lone surrogate (valid JSON, not valid Unicode) is a user
    error naming the filter, not an encoding error from deep inside the query."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{name} holds {value[exc.start]!a} at position {exc.start}, a lone surrogate: not valid Unicode text"
        ) from None
    return value


class MetadataStore:
    """The `images` table (`COLUMN_TYPES`); all but the path may be NULL. For a tar member, `path` is
    `TARPATH::MEMBER` (formats/tar_member.py) and `offset`/`size` locate its bytes."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection shared by the server's threads
        with self._errors(opening=readonly):  # reading one that exists: an error means it is damaged
            if readonly:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.conn = sqlite3.connect(str(self.path), check_same_thread=False)
                self._add_new_columns()
                self.conn.executescript(SCHEMA)
            have = {row[1] for row in self.conn.execute("PRAGMA table_info(images)")}
            self.has_fts = bool(
                self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'captions' AND type = 'table'").fetchall()
            )
        if not have:
            self.conn.close()
            raise DamagedIndex(self.path, "has no images table")
        self.columns = tuple(c for c in COLUMNS if c in have)

    @contextmanager
    def _errors(self, *, opening: bool) -> Iterator[None]:
        """SQLite's "database or disk is full" as the OSError (ENOSPC) Python's own writes raise, so a full disk
        reads the same in every stage; while `opening` to read, any other SQLite error means a damaged file."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if "disk is full" in str(exc):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path)) from None
            if not opening:
                raise
            raise DamagedIndex(self.path, f"is unreadable ({exc})") from None

    def _add_new_columns(self) -> None:
        """An older meta.sqlite (copied by `index --update`) gains the caption columns, empty."""
        have = {row[1] for row in self.conn.execute("PRAGMA table_info(images)")}
        if have:
            for name, kind in COLUMN_TYPES:
                if name not in have and name not in FIRST_COLUMNS:
                    self.conn.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        ids: Sequence[int],
        paths: Sequence[str],
        sizes: Sequence[int | None] | None = None,
        mtimes: Sequence[float | None] | None = None,
        *,
        captions: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
        urls: Sequence[str] | None = None,
        offsets: Sequence[int | None] | None = None,
        similarities: Sequence[float] | None = None,
        identities: Sequence[str] | None = None,
    ) -> None:
        """Insert one batch in one transaction (a shard at a time keeps memory flat); "" and -1 are stored as NULL,
        and so is a NaN similarity (a row without a caption embedding)."""

        def column(values: Sequence | None, empty: object) -> list:
            if values is None:
                return [None] * len(ids)
            return [None if v == empty else (int(v) if empty == -1 else v) for v in values]

        ids = [int(i) for i in ids]
        caps = column(captions, "")
        sims = [float(v) if v == v else None for v in similarities] if similarities is not None else [None] * len(ids)
        rows = zip(
            ids,
            paths,
            column(sizes, -1),
            mtimes if mtimes is not None else [None] * len(ids),
            caps,
            column(keys, ""),
            column(urls, ""),
            column(offsets, -1),
            sims,
            column(identities, ""),
        )
        with self._errors(opening=False), self.conn:
            self.conn.executemany(INSERT, rows)
            self.conn.executemany("DELETE FROM captions WHERE rowid = ?", ((i,) for i in ids))
            self.conn.executemany(
                "INSERT INTO captions(rowid, caption) VALUES (?, ?)", ((i, c) for i, c in zip(ids, caps) if c)
            )

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
        return self._column_of("path", ids)

    def _column_of(self, column: str, ids: Iterable[int]) -> dict[int, Any]:
        """id -> `column` for the `ids` present where it is not NULL, one query per 500 ids."""
        return dict(self._rows_of_ids(f"id, {column}", ids, f"AND {column} IS NOT NULL"))  # SQLite's values, typed

    def _rows_of_ids(self, columns: str, ids: Iterable[int], where: str = "") -> list[tuple]:
        """`SELECT columns FROM images` for the `ids` present, one query per 500 ids (SQLite's parameter limit)."""
        ids = [int(i) for i in ids]
        rows: list[tuple] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self._rows(f"SELECT {columns} FROM images WHERE id IN ({marks}) {where}", chunk)
        return rows

    def record(self, id: int) -> dict | None:
        """The columns every meta.sqlite has (`FIRST_COLUMNS`), cheaper than `full_record`."""
        rows = self._rows(f"SELECT {', '.join(FIRST_COLUMNS)} FROM images WHERE id = ?", (int(id),))
        return dict(zip(FIRST_COLUMNS, rows[0])) if rows else None

    def full_record(self, id: int) -> dict | None:
        """Every column of one row, caption, key, url and offset too (None in a meta.sqlite from before them)."""
        select = ", ".join(c if c in self.columns else f"NULL AS {c}" for c in COLUMNS)
        rows = self._rows(f"SELECT {select} FROM images WHERE id = ?", (int(id),))
        return dict(zip(COLUMNS, rows[0])) if rows else None

    def captions_of(self, ids: Iterable[int]) -> dict[int, str]:
        """The non-empty captions of `ids` ({} for a meta.sqlite written before captions)."""
        return self._column_of("caption", ids) if "caption" in self.columns else {}

    def paths_and_captions(self, ids: Iterable[int]) -> tuple[dict[int, str], dict[int, str]]:
        """`paths_of` and `captions_of` in one query per 500 ids: a search's hits cost one round trip, not two."""
        if "caption" not in self.columns:
            return self.paths_of(ids), {}
        rows = self._rows_of_ids("id, path, caption", ids)
        return {i: p for i, p, _ in rows if p is not None}, {i: c for i, _, c in rows if c}

    def ids_with_prefix(self, prefix: str, limit: int | None = None) -> list[int]:
        """Ids whose path starts with `prefix`, by a range scan on the path index (no LIKE escaping issues)."""
        return self.ids_matching(path_prefix=prefix, limit=limit)

    def similarities_of(self, ids: Iterable[int]) -> dict[int, float]:
        """The image-caption similarities of `ids` that have one ({} for a meta.sqlite written before them)."""
        return self._column_of("similarity", ids) if "similarity" in self.columns else {}

    def ids_matching(
        self,
        *,
        path_prefix: str | None = None,
        caption: str | None = None,
        min_similarity: float | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Ids passing every filter given: a path prefix (range scan on the path index), a caption full-text
        match (FTS5: every word of `caption`, any order) and an image-caption similarity of at least
        `min_similarity` (rows without one never pass)."""
        sql = "SELECT id FROM images WHERE path >= ?"
        params: list[object] = [checked_text("path_prefix", path_prefix or "")]
        upper = prefix_upper_bound(path_prefix or "")
        if upper is not None:
            sql += " AND path < ?"
            params.append(upper)
        if caption is not None:
            if not self.has_fts:
                raise UserError("this index has no caption table (built before captions); rebuild it to filter")
            sql += " AND id IN (SELECT rowid FROM captions WHERE captions MATCH ?)"
            params.append(fts_query(caption))
        if min_similarity is not None:
            if not math.isfinite(min_similarity):  # SQLite binds NaN as NULL: it would match nothing, silently
                raise UserError(f"--min-similarity must be a finite number, not {min_similarity}")
            if "similarity" not in self.columns:
                raise UserError("this index has no similarity column (built before captions); rebuild it to filter")
            sql += " AND similarity >= ?"
            params.append(float(min_similarity))
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [r[0] for r in self._rows(sql, params)]

    def path_bounds(self, *, local_only: bool = False) -> tuple[str, str] | None:
        """The lowest and highest path (two index lookups): their common prefix is every path's. `local_only`: of
        the absolute paths only (those in ['/', '0')), for an index that also holds URLs."""
        where = " WHERE path >= '/' AND path < '0'" if local_only else ""
        row = self._rows(f"SELECT MIN(path), MAX(path) FROM images{where}")[0]
        return None if row[0] is None else (row[0], row[1])

    def ids_between(self, lo: int, hi: int) -> list[int]:
        """The ids in [lo, hi), ascending, by a primary-key range scan: one unit's rows (`index --update`)."""
        return [r[0] for r in self._rows("SELECT id FROM images WHERE id >= ? AND id < ? ORDER BY id", (lo, hi))]

    def id_paths_between(self, lo: int, hi: int) -> list[tuple[int, str]]:
        """(id, path) for the ids in [lo, hi), ascending, by a primary-key range scan: one unit's rows, which
        `index --update` compares with the unit's shard and with inputs.txt in one pass."""
        rows = self._rows("SELECT id, path FROM images WHERE id >= ? AND id < ? ORDER BY id", (lo, hi))
        return [(int(id), str(path)) for id, path in rows]

    def remove(self, ids: Iterable[int]) -> None:
        """Drop rows and their captions: images a re-embedded unit no longer holds (`index --update`)."""
        rows = [(int(i),) for i in ids]
        with self._errors(opening=False), self.conn:
            self.conn.executemany("DELETE FROM images WHERE id = ?", rows)
            self.conn.executemany("DELETE FROM captions WHERE rowid = ?", rows)

    def all_ids(self) -> list[int]:
        return [r[0] for r in self._rows("SELECT id FROM images ORDER BY id")]

    def random_ids(self, k: int, seed: int | None = None) -> list[int]:
        """Uniform sample without reading the whole table: random rowids probed by the primary key."""
        import random

        rng = random.Random(seed)
        ((lo, hi),) = self._rows("SELECT MIN(id), MAX(id) FROM images")
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
