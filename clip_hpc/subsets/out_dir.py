"""The filter's output directory, owned in one place: the settings every part was made with, one parquet part per
scanned unit (written atomically: present means whole), the merged outputs and the tars.

    DIR/filter-settings.json   what the parts were made with (a re-run with other settings is refused)
    DIR/parts/unit-000123.parquet   the rows of unit 123 that passed (top-N: its best N), n_scanned in its metadata
    DIR/results.parquet, paths.txt, members.txt, urls.parquet, filter.json, tars/00000.tar ...
    DIR/tars/00000.skipped.json   the samples tar 0 lacks (image gone or changed since embed), with why
    DIR/skipped.parquet   every tar's skipped samples (id, path, reason), gathered by rank 0
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import TEMP_MARK, atomic_write_bytes, atomic_write_json, temp_writer_gone
from clip_hpc.subsets.options import Settings

SETTINGS_FILE = "filter-settings.json"
RESULTS_FILE = "results.parquet"
PATHS_FILE = "paths.txt"
MEMBERS_FILE = "members.txt"
URLS_FILE = "urls.parquet"
REPORT_FILE = "filter.json"
SKIPPED_FILE = "skipped.parquet"
PARTS_DIR = "parts"
TARS_DIR = "tars"
ROWS_KEY = b"n_scanned"
UNUSABLE_KEY = b"unusable_ids"  # a JSON list: the unit's rows left out for having no direction (absent: none)

# One row of a part and of results.parquet; offset/size locate a tar member's bytes (-1: a loose file or URL).
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("score", pa.float32()),
        ("query", pa.int32()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("identity", pa.string()),  # what embed read (formats/input_identity.py): --to tars skips a changed image
    ]
)


def read_parquet(path: Path) -> pa.Table:
    """A parquet file read through a Python file object: pyarrow's own path handling takes only UTF-8 names, and a
    directory name argv hands over may hold any bytes (surrogate escapes)."""
    with open(path, "rb") as f:
        return pq.read_table(f)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


class Part(NamedTuple):
    """One unit's part: its passing rows, how many rows the unit held, and the ids left out as unusable."""

    table: pa.Table
    n_scanned: int
    unusable: list[int]


class OutDir:
    """Paths, the settings check, parts in and out."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def parts(self) -> Path:
        return self.root / PARTS_DIR

    @property
    def tars(self) -> Path:
        return self.root / TARS_DIR

    def part_path(self, unit: int) -> Path:
        return self.parts / f"unit-{unit:06d}.parquet"

    def tar_path(self, number: int) -> Path:
        return self.tars / f"{number:05d}.tar"

    def claim(self, settings: Settings) -> None:
        """Record `settings` in a new directory, or check that an existing one was made with the same: parts made
        with other queries would otherwise be merged with these."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} exists and is not a directory")
        recorded_path = self.path(SETTINGS_FILE)
        if recorded_path.exists():
            try:
                recorded: dict[str, Any] = json.loads(recorded_path.read_text())
                if not isinstance(recorded, dict):
                    raise ValueError(f"a JSON {type(recorded).__name__}")
            except ValueError:
                raise UserError(f"{recorded_path} is unreadable; remove it or use a new --out") from None
            differ = settings.differences(recorded)
            if differ:
                raise UserError(
                    f"{self.root} holds a filter run with other settings ({', '.join(differ)} differ): "
                    "re-run with the same settings, or use a new --out"
                )
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded_path, settings.to_dict())

    def remove_stale_temp_files(self) -> None:
        """Half-written parts and tars of killed runs (never those of a live writer, see `temp_writer_gone`)."""
        for folder in (self.parts, self.tars):
            for stale in folder.glob(f".*{TEMP_MARK}*") if folder.is_dir() else ():
                if temp_writer_gone(stale):
                    stale.unlink(missing_ok=True)

    def write_part(self, unit: int, table: pa.Table, n_scanned: int, unusable: Sequence[int] | np.ndarray = ()) -> None:
        metadata = {ROWS_KEY: str(n_scanned).encode(), UNUSABLE_KEY: json.dumps([int(i) for i in unusable]).encode()}
        table = table.replace_schema_metadata(metadata)
        atomic_write_bytes(self.part_path(unit), parquet_bytes(table))

    def read_part(self, unit: int) -> Part:
        """A part, how many rows its unit held and its unusable ids; a part that cannot be read is a one-line error."""
        path = self.part_path(unit)
        try:
            table = read_parquet(path)
            if "identity" not in table.column_names:  # a part from before identities: nothing to check
                table = table.append_column("identity", pa.array([""] * len(table), pa.string()))
            metadata = table.schema.metadata or {}
            unusable = [int(i) for i in json.loads(metadata.get(UNUSABLE_KEY, b"[]"))]
            return Part(table.select(SCHEMA.names).cast(SCHEMA), int(metadata[ROWS_KEY]), unusable)
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:  # not parquet, a column or the count missing
            raise UserError(f"{path}: unreadable part ({exc!r}); remove it and re-run") from None

    def done_units(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.parts.glob("unit-*.parquet")} if self.parts.is_dir() else set()
