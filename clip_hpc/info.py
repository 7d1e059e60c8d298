"""`clip-hpc info`: what an EMB_DIR or INDEX_DIR holds, read from its files alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clip_hpc import shards
from clip_hpc.errors import UserError


def describe_embeddings(emb_dir: Path) -> dict[str, Any]:
    """Counts, model, dim, failures by reason and missing units, whether or not the run has finished."""
    n_inputs = len(shards.read_inputs(emb_dir))
    unit_size = shards.detect_unit_size(emb_dir)
    if unit_size is None:
        return {"kind": "embeddings", "path": str(emb_dir), "n_inputs": n_inputs,
                "shards": len(shards.list_shard_files(emb_dir)), "complete": False, "note": "no valid shard yet"}
    n_units = -(-n_inputs // unit_size)
    summary = shards.summarise_shards(emb_dir, n_units, unit_size)
    info = {"kind": "embeddings", "path": str(emb_dir), "complete": not summary["missing_units"]
            and not summary["invalid_shards"], "manifest": (emb_dir / shards.MANIFEST_FILE).exists()}
    info.update({k: summary[k] for k in ("model", "pretrained", "dim", "dtype", "n_inputs", "n_embedded", "n_failed",
                                         "unit_size", "n_units", "failed_by_reason", "missing_units",
                                         "invalid_shards")})
    return info


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    if (path / "index.json").exists():
        info = json.loads((path / "index.json").read_text())
        return {"kind": "index", "path": str(path), **info}
    if (path / shards.INPUTS_FILE).exists() or (path / shards.SHARD_DIR).is_dir():
        return describe_embeddings(path)
    raise UserError(f"{path} is neither an embedding directory (inputs.txt, shards/) nor an index (index.json)")
