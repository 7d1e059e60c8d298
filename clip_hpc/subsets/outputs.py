"""What a finished scan leaves for its users: the merged table, a file list `embed --file-list` takes, the URL
list img2dataset reads, and the run's record. Written on rank 0, each file atomically."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_hpc.formats.atomic import atomic_write_bytes, atomic_write_json
from clip_hpc.subsets.out_dir import (
    MEMBERS_FILE,
    PATHS_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    SCHEMA,
    URLS_FILE,
    OutDir,
    parquet_bytes,
)
from clip_hpc.subsets.scoring import best_first

RESULT_COLUMNS = ("id", "path", "url", "caption", "score", "query")


def select_results(tables: Sequence[pa.Table], top: int | None) -> pa.Table:
    """Pure: the parts joined; for --top only the `top` best (equal scores: the lower id); always in id order."""
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    if top is not None and len(table):
        ids = table.column("id").to_numpy()
        table = table.take(pa.array(best_first(table.column("score").to_numpy(), ids, top)))
    return table.sort_by("id")


def lines_bytes(lines: Sequence[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode("utf-8", "surrogateescape")


def write_outputs(out: OutDir, results: pa.Table, to: Sequence[str]) -> list[str]:
    """results.parquet (with the offsets `--to tars` reads), paths.txt (loose files and URLs: what `embed
    --file-list` takes), members.txt (tar members as `TARPATH::MEMBER`, which a file list cannot take: embed the
    subset's tars instead), and with --to urls, urls.parquet. Returns the names written."""
    atomic_write_bytes(out.path(RESULTS_FILE), parquet_bytes(results))
    members = pc.greater_equal(results.column("offset"), 0)
    paths = results.column("path").to_pylist()
    is_member = members.to_numpy(zero_copy_only=False).astype(bool) if len(results) else np.zeros(0, bool)
    atomic_write_bytes(out.path(PATHS_FILE), lines_bytes([p for p, m in zip(paths, is_member) if not m]))
    written = [RESULTS_FILE, PATHS_FILE]
    out.path(MEMBERS_FILE).unlink(missing_ok=True)
    if is_member.any():
        atomic_write_bytes(out.path(MEMBERS_FILE), lines_bytes([p for p, m in zip(paths, is_member) if m]))
        written.append(MEMBERS_FILE)
    if "urls" in to:
        with_url = results.filter(pc.not_equal(results.column("url"), ""))
        atomic_write_bytes(out.path(URLS_FILE), parquet_bytes(with_url.select(["url", "caption"])))
        written.append(URLS_FILE)
    return written


def write_report(out: OutDir, report: dict[str, Any]) -> None:
    atomic_write_json(out.path(REPORT_FILE), report)
