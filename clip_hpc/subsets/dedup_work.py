"""DIR/work of a running `clip-hpc dedup`: what the ranks hand each other through the shared file system, and what
lets a killed job resume (per EMB_DIR unit for the assignment, per partition for the pairs).

    work/settings.json          the run's settings; a re-run with others is refused
    work/partitions.npz         the k-means centroids (spherical) and the border margin, written once by rank 0
    work/assign/unit-U-C.vec    chunk C of unit U: its memberships' rows as stored (float16 or float32), sorted
                                by partition, primaries first in each (a chunk bounds the memory at any replication)
    work/assign/unit-U-C.npz    their ids and the partition offsets
    work/assign/unit-U.json     written after every chunk of unit U: the unit is done, with this many chunks
    work/pairs/forest-P.npz     partition P's spanning forest of pairs >= the threshold and its count of them
                                (`joining_pairs`); the partition is done once it exists

Every file is written under a temporary name and renamed (`atomic_write_bytes`). The files depend on the EMB_DIR and
the settings only, not on the number of ranks, so a resumed job may have another size.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes, atomic_write_json
from clip_hpc.subsets.dedup_core import Assignment, Pairs, PartitionPairs
from clip_hpc.subsets.dedup_margin import Calibration

ASSIGN_CHUNK = 16384  # rows assigned and written at a time: the similarity matrices and copies stay small
Piece = tuple[int, int]  # (unit, chunk)


class UnitRows(NamedTuple):
    """One chunk's memberships: row i of its .vec file is id `ids[i]`; partition p spans rows
    `starts[p]:starts[p+1]`, of which the first `n_primary[p]` are its primaries."""

    ids: np.ndarray
    starts: np.ndarray
    n_primary: np.ndarray


class Members(NamedTuple):
    """One partition's members, primaries first."""

    ids: np.ndarray
    vectors: np.ndarray  # as stored in the EMB_DIR
    n_primary: int


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types the keyword arrays too narrowly
    return buffer.getvalue()


def sort_unit(ids: np.ndarray, vectors: np.ndarray, assignment: Assignment, k: int) -> tuple[UnitRows, np.ndarray]:
    """Pure: a chunk's memberships ordered by (partition, primaries first, id), with the offsets `UnitRows` needs."""
    order = np.lexsort((ids[assignment.rows], ~assignment.primary, assignment.partitions))
    parts, rows = assignment.partitions[order], assignment.rows[order]
    starts = np.searchsorted(parts, np.arange(k + 1)).astype(np.int64)
    n_primary = np.bincount(assignment.partitions[assignment.primary], minlength=k).astype(np.int64)
    return UnitRows(ids[rows], starts, n_primary), vectors[rows]


class WorkDir:
    """The paths of DIR/work and the reading and writing of its files."""

    def __init__(self, out: Path) -> None:
        self.root = out / "work"

    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def centroids_path(self) -> Path:
        return self.root / "partitions.npz"

    def piece_paths(self, piece: Piece) -> tuple[Path, Path]:
        name = self.root / "assign" / f"unit-{piece[0]:06d}-{piece[1]:04d}"
        return name.with_suffix(".vec"), name.with_suffix(".npz")

    def unit_marker(self, unit: int) -> Path:
        return self.root / "assign" / f"unit-{unit:06d}.json"

    def pairs_path(self, partition: int) -> Path:
        return self.root / "pairs" / f"forest-{partition:06d}.npz"

    def read_settings(self) -> dict[str, Any] | None:
        """The unfinished run's settings, or None; UserError for work files this version cannot resume: damaged, or
        written before --border (work/centroids.npy, pairs/part-P.npz: other centroids and pair files, which a
        resume would mix with new ones)."""
        if not self.settings_path.exists():
            return None
        try:
            settings = json.loads(self.settings_path.read_text())
        except (ValueError, OSError):
            settings = None  # damaged: refused below, as an older version's are
        if not isinstance(settings, dict) or "border" not in settings or (self.root / "centroids.npy").exists():
            raise UserError(
                f"{self.root} holds work files this clip-hpc dedup cannot resume (damaged, or from an older "
                "version): remove it and re-run, or use a new --out"
            )
        return settings

    def start(self, settings: dict[str, Any]) -> None:
        for sub in ("assign", "pairs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.settings_path, settings)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # --- centroids ---
    def read_centroids(self) -> tuple[np.ndarray, Calibration] | None:
        if not self.centroids_path.exists():
            return None
        with np.load(self.centroids_path) as f:
            border = Calibration(float(f["margin"]), int(f["pairs"]), float(f["floor"]))
            return f["centroids"], border

    def write_centroids(self, centroids: np.ndarray, border: Calibration) -> None:
        numbers = {name: np.array(value) for name, value in border._asdict().items()}
        atomic_write_bytes(self.centroids_path, npz_bytes(centroids=centroids.astype(np.float32), **numbers))

    # --- per unit, in chunks ---
    def unit_done(self, unit: int) -> bool:
        return self.unit_marker(unit).exists()

    def write_piece(self, piece: Piece, rows: UnitRows, vectors: np.ndarray) -> None:
        """One chunk's vectors (raw rows, as stored) and index."""
        vec_path, idx_path = self.piece_paths(piece)
        atomic_write_bytes(vec_path, np.ascontiguousarray(vectors).tobytes())
        atomic_write_bytes(idx_path, npz_bytes(ids=rows.ids, starts=rows.starts, n_primary=rows.n_primary))

    def finish_unit(self, unit: int, chunks: int) -> None:
        atomic_write_json(self.unit_marker(unit), {"chunks": chunks})

    def pieces(self, units: list[int]) -> list[Piece]:
        """Every chunk of the (finished) `units`, in order."""
        return [
            (unit, chunk)
            for unit in units
            for chunk in range(int(json.loads(self.unit_marker(unit).read_text())["chunks"]))
        ]

    def read_piece(self, piece: Piece) -> UnitRows:
        with np.load(self.piece_paths(piece)[1]) as f:
            return UnitRows(f["ids"], f["starts"], f["n_primary"])

    # --- per partition ---
    def pairs_done(self, partition: int) -> bool:
        return self.pairs_path(partition).exists()

    def write_pairs(self, partition: int, found: PartitionPairs) -> None:
        pairs, count = found.pairs, np.array(found.found, np.int64)
        atomic_write_bytes(
            self.pairs_path(partition),
            npz_bytes(left=pairs.left, right=pairs.right, similarity=pairs.similarity, found=count),
        )

    def iter_pairs(self, partitions: int) -> Iterator[PartitionPairs]:
        for p in range(partitions):
            with np.load(self.pairs_path(p)) as f:
                yield PartitionPairs(Pairs(f["left"], f["right"], f["similarity"]), int(f["found"]))


class PartitionReader:
    """Gathers a partition's members from every chunk's files: the index arrays are held (8 bytes a membership),
    the vectors read slice by slice with plain file reads, so memory holds one partition at a time."""

    def __init__(self, work: WorkDir, units: list[int], dim: int, dtype: str) -> None:
        self.work, self.dim, self.dtype = work, dim, np.dtype(dtype)
        self.pieces = work.pieces(units)
        self.rows = [work.read_piece(piece) for piece in self.pieces]

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Primaries and all members of every partition, summed over the units."""
        primary = np.sum([r.n_primary for r in self.rows], axis=0)
        total = np.sum([np.diff(r.starts) for r in self.rows], axis=0)
        return primary, total

    def members(self, partition: int) -> Members:
        ids: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        n_primary = 0
        for primaries in (True, False):
            for piece, rows in zip(self.pieces, self.rows):
                start, split = int(rows.starts[partition]), int(rows.starts[partition] + rows.n_primary[partition])
                lo, hi = (start, split) if primaries else (split, int(rows.starts[partition + 1]))
                if hi > lo:
                    ids.append(rows.ids[lo:hi])
                    vectors.append(self._read(piece, lo, hi))
                    n_primary += (hi - lo) if primaries else 0
        if not ids:
            return Members(np.zeros(0, np.int64), np.zeros((0, self.dim), self.dtype), 0)
        return Members(np.concatenate(ids), np.concatenate(vectors), n_primary)

    def _read(self, piece: Piece, lo: int, hi: int) -> np.ndarray:
        row_bytes = self.dim * self.dtype.itemsize
        with open(self.work.piece_paths(piece)[0], "rb") as f:
            f.seek(lo * row_bytes)
            data = f.read((hi - lo) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(hi - lo, self.dim)
