"""The HDF5 shard format: one file per work unit, written atomically, validated before it is trusted.

A shard is the unit of resume: if `validate_shard` passes, the unit is done and never recomputed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)

FORMAT = "clip-hpc-shard"
VERSION = 1
SHARD_DIR = "shards"
INPUTS_FILE = "inputs.txt"
MANIFEST_FILE = "manifest.json"
_STR = h5py.string_dtype(encoding="utf-8")


class ShardError(UserError):
    """A shard or shard set that cannot be trusted; the message says which file and why."""


@dataclass
class Shard:
    """One unit's results, as read back from disk."""

    unit: int
    embeddings: np.ndarray
    ids: np.ndarray
    paths: list[str]
    failed_ids: np.ndarray
    failed_paths: list[str]
    failed_reasons: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def shard_path(emb_dir: str | os.PathLike, unit: int) -> Path:
    return Path(emb_dir) / SHARD_DIR / f"shard-{unit:06d}.h5"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("clip-hpc", "torch", "open_clip_torch", "h5py", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_shard(
    path: str | os.PathLike,
    *,
    embeddings: np.ndarray,
    ids: Sequence[int],
    paths: Sequence[str],
    failed_ids: Sequence[int] = (),
    failed_paths: Sequence[str] = (),
    failed_reasons: Sequence[str] = (),
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write one shard under a temporary name and rename it, so a killed writer leaves no valid-looking file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids) or len(ids) != len(paths):
        raise ShardError(f"{path}: embeddings {embeddings.shape}, {len(ids)} ids and {len(paths)} paths disagree")
    if not (len(failed_ids) == len(failed_paths) == len(failed_reasons)):
        raise ShardError(f"{path}: failed_ids, failed_paths and failed_reasons differ in length")
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dim": int(embeddings.shape[1]),
        "n": int(len(ids)),
        "n_failed": int(len(failed_ids)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "library_versions": json.dumps(library_versions()),
    }
    meta.update(attrs or {})
    with h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=embeddings[order])
        f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64)[order])
        f.create_dataset("paths", data=np.asarray([paths[i] for i in order], dtype=object), dtype=_STR)
        f.create_dataset("failed_ids", data=np.asarray(failed_ids, dtype=np.int64))
        f.create_dataset("failed_paths", data=np.asarray(list(failed_paths), dtype=object), dtype=_STR)
        f.create_dataset("failed_reasons", data=np.asarray(list(failed_reasons), dtype=object), dtype=_STR)
        for key, value in meta.items():
            f.attrs[key] = value
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_shard(path: str | os.PathLike, *, with_embeddings: bool = True) -> Shard:
    """Read and validate a shard; raises ShardError with the reason when it cannot be trusted."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise ShardError(f"{path}: not a clip-hpc shard (format={attrs.get('format')!r})")
            if int(attrs.get("version", -1)) != VERSION:
                raise ShardError(f"{path}: unsupported shard version {attrs.get('version')!r}")
            for name in ("embeddings", "ids", "paths", "failed_ids", "failed_paths", "failed_reasons"):
                if name not in f:
                    raise ShardError(f"{path}: dataset {name!r} is missing")
            emb = f["embeddings"][...] if with_embeddings else np.empty((f["embeddings"].shape[0], 0), np.float16)
            ids = f["ids"][...]
            shard = Shard(
                unit=int(attrs.get("unit", -1)),
                embeddings=emb,
                ids=ids,
                paths=_decode(f["paths"][...]),
                failed_ids=f["failed_ids"][...],
                failed_paths=_decode(f["failed_paths"][...]),
                failed_reasons=_decode(f["failed_reasons"][...]),
                attrs=attrs,
            )
            n, dim = f["embeddings"].shape
    except ShardError:
        raise
    except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on truncated files
        raise ShardError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from None
    if n != len(ids) or n != len(shard.paths) or n != int(attrs.get("n", n)):
        raise ShardError(f"{path}: {n} embeddings but {len(ids)} ids and {len(shard.paths)} paths")
    if dim != int(attrs.get("dim", dim)):
        raise ShardError(f"{path}: embeddings have dim {dim}, attrs say {attrs.get('dim')}")
    if len(ids) and np.any(np.diff(ids) <= 0):
        raise ShardError(f"{path}: ids are not strictly ascending")
    if not (len(shard.failed_ids) == len(shard.failed_paths) == len(shard.failed_reasons)):
        raise ShardError(f"{path}: failed_* datasets differ in length")
    return shard


def unit_coverage_problem(shard: Shard, path: str | os.PathLike, *, unit: int | None = None,
                          unit_size: int | None = None, n_ids: int | None = None) -> str | None:
    """Pure check that a shard holds unit `unit` and, with `n_ids`, exactly its whole id range.

    Exactness matters: a shard written before an `--append` grew its unit must be redone, not trusted.
    """
    if unit is not None and shard.unit != unit:
        return f"{path}: holds unit {shard.unit}, expected {unit}"
    if unit is not None and unit_size is not None:
        lo = unit * unit_size
        hi = lo + (unit_size if n_ids is None else n_ids)
        all_ids = np.sort(np.concatenate([shard.ids, shard.failed_ids]))
        if len(all_ids) and (all_ids[0] < lo or all_ids[-1] >= hi):
            return f"{path}: ids outside unit {unit} range [{lo}, {hi})"
        if n_ids is not None and not np.array_equal(all_ids, np.arange(lo, hi)):
            return f"{path}: covers {len(all_ids)} of the {n_ids} ids of unit {unit}"
    return None


def read_unit_shard(path: str | os.PathLike, *, unit: int | None = None, unit_size: int | None = None,
                    n_ids: int | None = None) -> Shard:
    """Read a shard (without embeddings) that must be whole and cover its unit; ShardError says why not."""
    shard = read_shard(path, with_embeddings=False)
    problem = unit_coverage_problem(shard, path, unit=unit, unit_size=unit_size, n_ids=n_ids)
    if problem:
        raise ShardError(problem)
    return shard


def validate_shard(path: str | os.PathLike, *, unit: int | None = None, unit_size: int | None = None,
                   n_ids: int | None = None) -> str | None:
    """None if `read_unit_shard` accepts the file, else the reason it does not."""
    try:
        read_unit_shard(path, unit=unit, unit_size=unit_size, n_ids=n_ids)
    except ShardError as exc:
        return str(exc)
    return None


def list_shard_files(emb_dir: str | os.PathLike) -> list[Path]:
    return sorted((Path(emb_dir) / SHARD_DIR).glob("shard-*.h5"))


def iter_shards(emb_dir: str | os.PathLike, *, with_embeddings: bool = True) -> Iterator[Shard]:
    """Stream shards in unit order, hence in id order, one file in memory at a time."""
    for path in list_shard_files(emb_dir):
        yield read_shard(path, with_embeddings=with_embeddings)


def read_inputs(emb_dir: str | os.PathLike) -> list[str]:
    path = Path(emb_dir) / INPUTS_FILE
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(emb_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(emb_dir) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def detect_unit_size(emb_dir: str | os.PathLike) -> int | None:
    """The unit size recorded in the first readable shard; every shard of an EMB_DIR shares it."""
    for path in list_shard_files(emb_dir):
        try:
            return int(read_shard(path, with_embeddings=False).attrs["unit_size"])
        except (ShardError, KeyError, ValueError):
            continue
    return None


def check_shard_set(emb_dir: str | os.PathLike) -> dict[str, Any]:
    """Validate a whole EMB_DIR before indexing: one model, one dim, every unit present and whole.

    Returns the summary plus `n` and the shard `files` in unit order; raises ShardError naming the first problem.
    """
    emb_dir = Path(emb_dir)
    if not emb_dir.is_dir():
        raise ShardError(f"{emb_dir}: no such embedding directory")
    unit_size = detect_unit_size(emb_dir)
    if unit_size is None:
        raise ShardError(f"{emb_dir}: holds no readable shards (run clip-hpc embed first)")
    n_inputs = len(read_inputs(emb_dir))
    if not n_inputs:
        raise ShardError(f"{emb_dir}: {INPUTS_FILE} is missing or empty, so the units cannot be checked")
    n_units = -(-n_inputs // unit_size)
    summary = summarise_shards(emb_dir, n_units, unit_size)
    if len(summary["models"]) > 1:
        raise ShardError(f"{emb_dir}: shards mix models {summary['models']}")
    if len(summary["dims"]) > 1:
        raise ShardError(f"{emb_dir}: shards mix embedding dims {summary['dims']}")
    if summary["invalid_shards"]:
        raise ShardError(summary["invalid_shards"][0])
    missing = summary["missing_units"]
    if missing:
        raise ShardError(f"{emb_dir}: missing units {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    files = [str(shard_path(emb_dir, e["unit"])) for e in summary["shards"]]
    return {**summary, "n": summary["n_embedded"], "units": n_units, "files": files}


def summarise_shards(emb_dir: str | os.PathLike, n_units: int, unit_size: int) -> dict[str, Any]:
    """Counts, failures by reason and missing units, from the shards alone (for the manifest and `info`)."""
    emb_dir = Path(emb_dir)
    n_inputs = len(read_inputs(emb_dir))
    entries, missing, invalid = [], [], []
    reasons: dict[str, int] = {}
    models: set[tuple[str, str]] = set()
    dims: set[int] = set()
    model = pretrained = dtype = None
    dim = None
    for unit in range(n_units):
        path = shard_path(emb_dir, unit)
        n_ids = min(unit_size, n_inputs - unit * unit_size)
        if not path.exists():
            missing.append(unit)
            continue
        try:
            shard = read_shard(path, with_embeddings=False)
        except ShardError as exc:
            invalid.append(str(exc))
            continue
        model, pretrained = shard.attrs.get("model"), shard.attrs.get("pretrained")
        dim, dtype = int(shard.attrs["dim"]), shard.attrs.get("dtype")
        models.add((str(model), str(pretrained)))
        dims.add(dim)
        problem = unit_coverage_problem(shard, path, unit=unit, unit_size=unit_size, n_ids=n_ids)
        if problem is None and int(shard.attrs.get("unit_size", unit_size)) != unit_size:
            problem = f"{path}: unit_size {shard.attrs.get('unit_size')} differs from {unit_size}"
        if problem:
            invalid.append(problem)
            continue
        for r in shard.failed_reasons:
            key = r.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        entries.append({"file": path.name, "unit": unit, "n": len(shard.ids), "n_failed": len(shard.failed_ids)})
    return {
        "model": model, "pretrained": pretrained, "dim": dim, "dtype": dtype, "n_inputs": n_inputs,
        "unit_size": unit_size, "n_units": n_units,
        "n_embedded": sum(e["n"] for e in entries), "n_failed": sum(e["n_failed"] for e in entries),
        "failed_by_reason": reasons, "shards": entries, "missing_units": missing, "invalid_shards": invalid,
        "models": sorted(models), "dims": sorted(dims),
    }


def write_manifest(emb_dir: str | os.PathLike, n_units: int, unit_size: int) -> dict[str, Any] | None:
    """Write manifest.json when, and only when, every unit has a valid shard; else remove a stale one."""
    emb_dir = Path(emb_dir)
    summary = summarise_shards(emb_dir, n_units, unit_size)
    manifest_path = emb_dir / MANIFEST_FILE
    if summary["missing_units"] or summary["invalid_shards"]:
        manifest_path.unlink(missing_ok=True)
        return None
    for stale in (emb_dir / SHARD_DIR).glob(".shard-*.tmp.*"):  # left by killed writers; all units are done
        stale.unlink(missing_ok=True)
    manifest = {k: v for k, v in summary.items() if k not in ("missing_units", "invalid_shards", "models", "dims")}
    manifest.update(format=FORMAT + "-manifest", version=VERSION,
                    inputs_sha256=file_sha256(emb_dir / INPUTS_FILE),
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(manifest_path, manifest)
    return manifest
