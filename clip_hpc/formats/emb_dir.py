"""EMB_DIR, owned in one place: inputs.txt, shards/shard-{u:06d}.h5 (one per work unit) and manifest.json.

Every question about a shard (resume, `info`, the manifest, indexing) goes through `EmbDir.check_unit`, so the
whole project agrees on what a good unit is. Summaries are typed (`EmbSummary`, `Manifest`), not loose dicts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes, atomic_write_json, temp_writer_gone
from clip_hpc.formats.inputs_list import decode_inputs, encode_inputs
from clip_hpc.formats.shard import (
    FORMAT,
    VERSION,
    Shard,
    ShardBatch,
    ShardCheck,
    ShardError,
    read_shard,
    read_shard_for_index,
    read_shard_ids,
    shard_check,
    write_shard,
)

INPUTS_FILE = "inputs.txt"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
MANIFEST_FORMAT = FORMAT + "-manifest"
RunSetting = str | int | None  # a value of `RUN_SETTINGS` (None: not known, not compared)
# What every shard of one EMB_DIR shares, as the shard attrs name it -> the `embed` flag that sets it.
RUN_SETTINGS = {
    "model": "--model",
    "pretrained": "--pretrained",
    "unit_size": "--shard-size",
    "dtype": "--dtype",
    "precision": "--precision",
}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unit_length(unit: int, unit_size: int, n_inputs: int) -> int:
    """How many ids unit `unit` spans: `unit_size`, except for a shorter last unit."""
    return min(unit_size, n_inputs - unit * unit_size)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardEntry:
    """One whole unit as the manifest lists it."""

    file: str
    unit: int
    n: int
    n_failed: int


@dataclass
class UnitCounts:
    """What the shards hold, counted; the part of a summary the manifest records."""

    model: str | None
    pretrained: str | None
    dim: int | None
    dtype: str | None
    n_inputs: int
    unit_size: int
    n_units: int
    n_embedded: int
    n_failed: int
    failed_by_reason: dict[str, int]
    shards: list[ShardEntry]
    n_captioned: int = 0  # rows with a caption embedding (`embed --captions`); 0 in manifests from before them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EmbSummary(UnitCounts):
    """The counts plus what is not (yet) right: for `info`, the manifest and the index's refusal messages."""

    missing_units: list[int] = field(default_factory=list)
    invalid_shards: list[str] = field(default_factory=list)
    models: list[tuple[str, str]] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing_units and not self.invalid_shards

    def counts(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(UnitCounts)}


@dataclass
class Manifest(UnitCounts):
    """manifest.json: written once every unit is whole; `to_dict` is exactly the file's JSON."""

    format: str = MANIFEST_FORMAT
    version: int = VERSION
    inputs_sha256: str = ""
    created: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["shards"] = [ShardEntry(**entry) for entry in data.get("shards", [])]
        return cls(**values)


class EmbDir:
    """An embedding directory: its paths, its shards and their one validity check, its summary and manifest."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"EmbDir({str(self.root)!r})"

    # --- paths ---
    @property
    def inputs_path(self) -> Path:
        return self.root / INPUTS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def shard_dir(self) -> Path:
        return self.root / SHARD_DIR

    def shard_path(self, unit: int) -> Path:
        return self.shard_dir / f"shard-{unit:06d}.h5"

    @staticmethod
    def unit_of(path: str | os.PathLike) -> int:
        """The unit a shard file name stands for (`shard-000012.h5` -> 12)."""
        return int(Path(path).stem.split("-")[-1])

    def looks_like_one(self) -> bool:
        """Whether `root` has the layout of an EMB_DIR (for `info`, which must tell the two directory kinds apart)."""
        return self.inputs_path.exists() or self.shard_dir.is_dir()

    def shard_files(self) -> list[Path]:
        return sorted(self.shard_dir.glob("shard-*.h5"))

    # --- inputs.txt ---
    def read_inputs(self) -> list[str]:
        return decode_inputs(self.inputs_path.read_bytes()) if self.inputs_path.exists() else []

    def write_inputs(self, paths: Sequence[str]) -> None:
        """Atomically: a reader (another rank, `info`) sees the old list or the new one."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.inputs_path, encode_inputs(paths))

    def inputs_sha256(self) -> str:
        return file_sha256(self.inputs_path)

    # --- shards ---
    def write_shard(self, unit: int, batch: ShardBatch) -> Path:
        """`shard.write_shard` at the unit's path; the unit is recorded in the attrs unless they say otherwise."""
        return write_shard(self.shard_path(unit), replace(batch, attrs={"unit": unit, **batch.attrs}))

    def read_shard(self, unit: int, *, with_embeddings: bool = True) -> Shard:
        """With embeddings (what indexing reads) they are checked too: finite, unit norm (`embedding_problem`)."""
        if with_embeddings:
            return read_shard_for_index(self.shard_path(unit))
        return read_shard(self.shard_path(unit), with_embeddings=False)

    def iter_shards(self, *, with_embeddings: bool = True, units: Sequence[int] | None = None) -> Iterator[Shard]:
        """Stream shards in unit order, hence in id order, one file in memory at a time: those of `units` (what
        `check_set` accepted), else every shard file, including any outside the unit plan."""
        paths = self.shard_files() if units is None else [self.shard_path(u) for u in units]
        for path in paths:
            yield read_shard(path, with_embeddings=with_embeddings)

    def check_unit(self, unit: int, unit_size: int, n_ids: int) -> ShardCheck:
        """The one judgement of a unit's shard; see `shard.shard_check`."""
        return shard_check(self.shard_path(unit), unit, unit_size, n_ids)

    def recorded_settings(self) -> dict[str, str]:
        """The `RUN_SETTINGS` the first readable shard with a unit size records (as text); empty before any."""
        for path in self.shard_files():
            try:
                attrs = read_shard(path, with_embeddings=False).attrs
                int(attrs["unit_size"])
            except (ShardError, KeyError, ValueError):
                continue
            return {key: str(attrs[key]) for key in RUN_SETTINGS if key in attrs}
        return {}

    def detect_unit_size(self) -> int | None:
        """The unit size recorded in the first readable shard; every shard of an EMB_DIR shares it."""
        recorded = self.recorded_settings()
        return int(recorded["unit_size"]) if recorded else None

    def refuse_other_settings(self, wanted: Mapping[str, RunSetting]) -> None:
        """UserError when a run's settings (`RUN_SETTINGS` keys) differ from those the shards were made with.

        Resume judges shards one unit at a time, so a re-run with another --shard-size or --model redid every unit
        (hours of work, and with another unit size the old shards stayed beside the new ones), and another --dtype
        or --precision mixed two kinds of vectors under one manifest. Settings a shard does not record (older
        shards: precision) and `None` in `wanted` are not compared."""
        recorded = self.recorded_settings()
        differ = [
            key
            for key, flag in RUN_SETTINGS.items()
            if key in recorded and wanted.get(key) is not None and str(wanted[key]) != recorded[key]
        ]
        if not differ:
            return
        made = " ".join(
            f"{RUN_SETTINGS[k]} {recorded[k]}"
            for k in RUN_SETTINGS
            if k in recorded and (k in differ or (k == "pretrained" and "model" in differ))
        )
        asked = " ".join(f"{RUN_SETTINGS[k]} {wanted[k]}" for k in differ)
        raise UserError(
            f"{self.root} was made with {made}; this run asks for {asked}: re-run with the same "
            "settings, or use a new --out"
        )

    def remove_stale_temp_files(self) -> None:
        """Temporary shards left by killed writers, never one a live process (another run on this EMB_DIR, a
        requeued job's predecessor) is about to rename (see `atomic.temp_writer_gone`)."""
        for stale in self.shard_dir.glob(".shard-*.tmp.*"):
            if temp_writer_gone(stale):
                stale.unlink(missing_ok=True)

    # --- what the index build reads ---
    @staticmethod
    def rows_of(shard: Shard) -> int:
        """The rows of `shard` this view indexes: every embedded image (a caption view: those with a caption)."""
        return len(shard.ids)

    def shard_ids(self, unit: int) -> np.ndarray:
        return read_shard_ids(self.shard_path(unit))

    def sample_ids(self, entries: Sequence[ShardEntry], size: int, rng: np.random.Generator) -> np.ndarray:
        """A uniform random sample of the embedded ids, drawn shard by shard so no id list is ever whole."""
        counts = [e.n for e in entries]
        picks = np.sort(rng.choice(sum(counts), size=min(size, sum(counts)), replace=False))
        chosen, offset = [], 0
        for entry, count in zip(entries, counts):
            mine = picks[(picks >= offset) & (picks < offset + count)] - offset
            if len(mine):
                chosen.append(self.shard_ids(entry.unit)[mine])
            offset += count
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    # --- summaries ---
    def summarise(self, n_units: int, unit_size: int) -> EmbSummary:
        """Counts, failures by reason and missing or invalid units, from the shards alone."""
        n_inputs = len(self.read_inputs())
        entries: list[ShardEntry] = []
        missing: list[int] = []
        invalid: list[str] = []
        reasons: dict[str, int] = {}
        models: set[tuple[str, str]] = set()
        dims: set[int] = set()
        model = pretrained = dtype = None
        dim = None
        n_captioned = 0
        for unit in range(n_units):
            check = self.check_unit(unit, unit_size, unit_length(unit, unit_size, n_inputs))
            if check.missing:
                missing.append(unit)
                continue
            if check.shard is not None:  # sound, even if it misses its unit: its model still counts
                attrs = check.shard.attrs
                model, pretrained = attrs.get("model"), attrs.get("pretrained")
                dim, dtype = int(attrs["dim"]), attrs.get("dtype")
                models.add((str(model), str(pretrained)))
                dims.add(dim)
            shard = check.shard
            if not check.ok or shard is None:  # (an ok check always holds its shard)
                invalid.append(str(check.problem))
                continue
            for r in shard.failed_reasons:
                key = r.split(":")[0]
                reasons[key] = reasons.get(key, 0) + 1
            entries.append(ShardEntry(check.path.name, unit, self.rows_of(shard), len(shard.failed_ids)))
            n_captioned += int(shard.caption_embedded.sum())
        return EmbSummary(
            model=model,
            pretrained=pretrained,
            dim=dim,
            dtype=dtype,
            n_inputs=n_inputs,
            unit_size=unit_size,
            n_units=n_units,
            n_embedded=sum(e.n for e in entries),
            n_failed=sum(e.n_failed for e in entries),
            failed_by_reason=reasons,
            shards=entries,
            n_captioned=n_captioned,
            missing_units=missing,
            invalid_shards=invalid,
            models=sorted(models),
            dims=sorted(dims),
        )

    def summarise_found(self) -> EmbSummary | None:
        """The summary for the unit size the shards record; None before any shard is readable."""
        unit_size = self.detect_unit_size()
        if unit_size is None:
            return None
        return self.summarise(-(-len(self.read_inputs()) // unit_size), unit_size)

    def check_set(self) -> EmbSummary:
        """Validate the whole EMB_DIR before indexing: one model, one dim, every unit present and whole.

        Raises ShardError naming the first problem."""
        if not self.root.is_dir():
            raise ShardError(f"{self.root}: no such embedding directory")
        unit_size = self.detect_unit_size()
        if unit_size is None:
            raise ShardError(f"{self.root}: holds no readable shards (run clip-hpc embed first)")
        n_inputs = len(self.read_inputs())
        if not n_inputs:
            raise ShardError(f"{self.root}: {INPUTS_FILE} is missing or empty, so the units cannot be checked")
        summary = self.summarise(-(-n_inputs // unit_size), unit_size)
        if len(summary.models) > 1:
            raise ShardError(f"{self.root}: shards mix models {summary.models}")
        if len(summary.dims) > 1:
            raise ShardError(f"{self.root}: shards mix embedding dims {summary.dims}")
        if summary.invalid_shards:
            raise ShardError(summary.invalid_shards[0])
        missing = summary.missing_units
        if missing:
            raise ShardError(f"{self.root}: missing units {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return summary

    # --- manifest.json ---
    def write_manifest(self, n_units: int, unit_size: int) -> Manifest | None:
        """Write manifest.json when, and only when, every unit has a valid shard; else remove a stale one."""
        summary = self.summarise(n_units, unit_size)
        if not summary.complete:
            self.manifest_path.unlink(missing_ok=True)
            return None
        self.remove_stale_temp_files()
        manifest = Manifest(**summary.counts(), inputs_sha256=self.inputs_sha256(), created=_now())
        atomic_write_json(self.manifest_path, manifest.to_dict())
        return manifest

    def load_manifest(self) -> Manifest | None:
        """The manifest, or None before one is written; a damaged one (bit-rot, a hand edit) is a one-line error,
        not a traceback: embed rewrites it once every unit checks whole."""
        if not self.manifest_path.exists():
            return None
        try:
            data = json.loads(self.manifest_path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            return Manifest.from_dict(data)
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise UserError(
                f"{self.manifest_path}: unreadable manifest ({exc}); re-run clip-hpc embed with the same arguments "
                "to rewrite it"
            ) from None
