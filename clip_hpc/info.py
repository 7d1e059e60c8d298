"""`clip-hpc info`: what an EMB_DIR or INDEX_DIR holds, read from its files alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import INPUTS_FILE, SHARD_DIR, EmbDir
from clip_hpc.formats.index_dir import INFO_FILE, IndexDir

EMB_KEYS = (
    "model",
    "pretrained",
    "dim",
    "dtype",
    "n_inputs",
    "n_embedded",
    "n_captioned",
    "n_failed",
    "unit_size",
    "n_units",
    "failed_by_reason",
    "missing_units",
    "invalid_shards",
)  # n_captioned: with a caption embedding


def describe_embeddings(emb: EmbDir) -> dict[str, Any]:
    """Counts, model, dim, failures by reason and missing units, whether or not the run has finished. Shards
    without inputs.txt are no set at all (the units cannot be checked, as index and export say), not an empty one."""
    listed = emb.inputs_path.is_file() and emb.inputs_path.stat().st_size > 0
    summary = emb.summarise_found() if listed else None
    if summary is None:
        note = "no valid shard yet" if listed else f"{INPUTS_FILE} is missing or empty, so the units cannot be checked"
        return {
            "kind": "embeddings",
            "path": str(emb.root),
            "n_inputs": len(emb.read_inputs()) if listed else 0,
            "shards": len(emb.shard_files()),
            "complete": False,
            "note": note,
        }
    info: dict[str, Any] = {
        "kind": "embeddings",
        "path": str(emb.root),
        "complete": summary.complete,
        "manifest": emb.manifest_path.exists(),
    }
    info.update({key: getattr(summary, key) for key in EMB_KEYS})
    return info


def describe(path: str | Path) -> dict[str, Any]:
    """The printable description `clip-hpc info` shows (its keys are the command's output contract)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    index, emb = IndexDir(path), EmbDir(path)
    if index.looks_like_one():
        return {"kind": "index", "path": str(path), **index.load_info().to_dict()}
    if emb.looks_like_one():
        return describe_embeddings(emb)
    raise UserError(
        f"{path} is neither an embedding directory ({INPUTS_FILE}, {SHARD_DIR}/) nor an index ({INFO_FILE})"
    )
