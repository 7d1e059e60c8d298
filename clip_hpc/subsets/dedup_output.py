"""What `clip-hpc dedup` leaves in DIR: `duplicates.parquet` and `dedup.json` (written last, so it marks a finished
run), the typed settings a re-run is compared with, and the typed result both the CLI and the tests read."""

from __future__ import annotations

import datetime as _dt
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes, atomic_write_json
from clip_hpc.subsets.dedup_core import Groups

FORMAT = "clip-hpc-dedup"
VERSION = 1
DUPLICATES_FILE = "duplicates.parquet"
RECORD_FILE = "dedup.json"
# The settings a re-run must share with the run that made DIR, and the flag that sets each.
COMPARED = {
    "threshold": "--threshold",
    "partitions": "--partitions",
    "seed": "--seed",
    "border": "--border",
    "inputs_sha256": "EMB_DIR",
}
BEFORE_BORDER = {"border": "exact"}  # what a run recorded before --border existed did


@dataclass(frozen=True)
class DedupSettings:
    """What decides the result (and the work files): the threshold, the partitioning and the data."""

    threshold: float
    partitions: int | None  # None: chosen by the run (`partition_candidates`); the count is in `PartitionStats`
    seed: int
    border: str  # "auto" or "exact" (`dedup.borders_for`)
    sample: int
    emb_dir: str
    inputs_sha256: str

    def refuse_other(self, recorded: dict[str, Any], what: str) -> None:
        """UserError when `recorded` (a finished or unfinished run's settings) differs from these."""
        mine = asdict(self)
        recorded = {**BEFORE_BORDER, **recorded}
        differ = [key for key in COMPARED if recorded.get(key) != mine[key]]
        if not differ:
            return
        if "inputs_sha256" in differ:
            raise UserError(
                f"{what} was made from another EMB_DIR ({recorded.get('emb_dir')}, or it changed since): "
                "use a new --out"
            )
        made = " ".join(f"{COMPARED[k]} {_shown(recorded.get(k))}" for k in differ)
        asked = " ".join(f"{COMPARED[k]} {_shown(mine[k])}" for k in differ)
        raise UserError(
            f"{what} was made with {made}; this run asks for {asked}: re-run with those, or use a new --out"
        )


def _shown(value: Any) -> str:
    return "auto" if value is None else str(value)


@dataclass(frozen=True)
class DedupCounts:
    vectors: int
    duplicates: int
    groups: int
    pairs: int


@dataclass(frozen=True)
class PartitionStats:
    """How the k-means partitioning came out: `memberships / vectors` is the price of the border guarantee."""

    count: int
    memberships: int
    largest: int
    margin: float  # the border margin used: `exact_margin`, or less with --border auto
    exact_margin: float = 0.0  # sqrt(2 - 2S), the margin that loses no pair
    calibration_pairs: int = 0  # the sample pairs an auto margin rests on (0: exact)


@dataclass(frozen=True)
class Resumed:
    """What this run found done by an interrupted one and did not redo."""

    units: int = 0
    partitions: int = 0


@dataclass
class DedupResult:
    """A finished dedup: exactly dedup.json (`to_json`), plus where it is and whether this call did the work."""

    out: Path
    settings: DedupSettings
    counts: DedupCounts
    partitions: PartitionStats
    ranks: int
    timings: dict[str, float] = field(default_factory=dict)
    resumed: Resumed = field(default_factory=Resumed)
    created: str = ""
    already_done: bool = False

    @property
    def replication(self) -> float:
        """Memberships per vector: 1.0 when no vector lies near a partition border."""
        return self.partitions.memberships / max(1, self.counts.vectors)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            **asdict(self.settings),
            "counts": asdict(self.counts),
            "partitioning": {**asdict(self.partitions), "replication": round(self.replication, 4)},
            "ranks": self.ranks,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "resumed": asdict(self.resumed),
            "created": self.created,
            "outputs": [DUPLICATES_FILE, RECORD_FILE],
        }

    @classmethod
    def from_json(cls, out: Path, data: dict[str, Any]) -> DedupResult:
        recorded = {**BEFORE_BORDER, **data}
        settings = DedupSettings(**{k: recorded[k] for k in DedupSettings.__dataclass_fields__})
        partitions = {k: v for k, v in data["partitioning"].items() if k in PartitionStats.__dataclass_fields__}
        return cls(
            out=out,
            settings=settings,
            counts=DedupCounts(**data["counts"]),
            partitions=PartitionStats(**partitions),
            ranks=int(data["ranks"]),
            timings=dict(data["timings"]),
            resumed=Resumed(**data.get("resumed", {})),
            created=str(data["created"]),
            already_done=True,
        )


def read_record(out: Path) -> DedupResult | None:
    """The result dedup.json records (a finished run), or None; one that cannot be read is a one-line error."""
    path = out / RECORD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return DedupResult.from_json(out, data)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable dedup record ({exc!r}); remove it or use a new --out") from None


def duplicates_table(groups: Groups, similarity: np.ndarray, paths: dict[int, str]) -> Any:
    """The rows of duplicates.parquet, ascending by id (a pyarrow Table)."""
    import pyarrow as pa

    return pa.table(
        {
            "id": pa.array(groups.ids, pa.int64()),
            "duplicate_of": pa.array(groups.kept, pa.int64()),
            "similarity": pa.array(similarity, pa.float32()),
            "path": pa.array([paths.get(int(i), "") for i in groups.ids], pa.string()),
            "duplicate_of_path": pa.array([paths.get(int(k), "") for k in groups.kept], pa.string()),
        }
    )


def write_outputs(result: DedupResult, groups: Groups, similarity: np.ndarray, paths: dict[int, str]) -> None:
    """duplicates.parquet, then dedup.json: each renamed into place whole, the record last."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(duplicates_table(groups, similarity, paths), buffer)
    atomic_write_bytes(result.out / DUPLICATES_FILE, buffer.getvalue())
    result.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(result.out / RECORD_FILE, result.to_json())
