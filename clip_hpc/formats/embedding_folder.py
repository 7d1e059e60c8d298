"""Reading an embedding-reader folder (clip-retrieval's `img_emb/img_emb_{n}.npy` + `metadata/metadata_{n}.parquet`)
into an EMB_DIR, so `clip-hpc index` builds from it with the same checks, sampling and metadata as from our shards.

Row i of the folder (files in numeric order) becomes global id i; the parquet's `image_path`, `caption`, `url` and
`key` become the shard's paths, captions and meta. One unit of rows is in memory at a time.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir

EMB_SUBDIR, META_SUBDIR = "img_emb", "metadata"
UNIT_SIZE = 10_000


def is_embedding_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / EMB_SUBDIR).is_dir() and not EmbDir(path).looks_like_one()


def _numbered(folder: Path, pattern: str) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.glob("*") if (m := re.fullmatch(pattern, p.name))]
    return [p for _, p in sorted(found)]


def _rows(folder: Path) -> Iterator[tuple[np.ndarray, list[str], list[str], list[str]]]:
    """(embeddings, paths, captions, meta JSON) per npy file, its parquet's columns row for row."""
    npys = _numbered(folder / EMB_SUBDIR, r"img_emb_(\d+)\.npy")
    if not npys:
        raise UserError(f"{folder}/{EMB_SUBDIR} holds no img_emb_N.npy files")
    for npy in npys:
        emb = np.load(npy, mmap_mode="r")
        if emb.ndim != 2:
            raise UserError(f"{npy}: expected a 2-d array, found shape {emb.shape}")
        n = len(emb)
        parquet = folder / META_SUBDIR / npy.name.replace("img_emb_", "metadata_").replace(".npy", ".parquet")
        columns: dict[str, list] = {}
        if parquet.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(parquet)
            if table.num_rows != n:
                raise UserError(f"{parquet}: {table.num_rows} rows for the {n} vectors of {npy.name}")
            columns = {c: table.column(c).to_pylist() for c in ("image_path", "caption", "url", "key")
                       if c in table.column_names}
        paths = [str(p) if p else f"{npy.name}#{i}" for i, p in enumerate(columns.get("image_path", [None] * n))]
        captions = [str(c or "") for c in columns.get("caption", [None] * n)]
        meta = [json.dumps({k: columns[k][i] for k in ("key", "url") if k in columns and columns[k][i]})
                for i in range(n)]
        yield emb, paths, captions, meta


def import_embedding_folder(folder: str | os.PathLike, emb_dir: str | os.PathLike, *, model: str,
                            pretrained: str, unit_size: int = UNIT_SIZE) -> EmbDir:
    """Write `folder` as an EMB_DIR (inputs.txt, shards, manifest) at `emb_dir`."""
    folder, out = Path(folder), EmbDir(emb_dir)
    buf: dict[str, list] = {"emb": [], "paths": [], "captions": [], "meta": []}
    lines: list[str] = []
    unit = 0

    def flush(count: int) -> None:
        nonlocal unit
        emb = np.concatenate(buf["emb"])
        start = unit * unit_size
        out.write_shard(unit, embeddings=emb[:count], ids=range(start, start + count), paths=buf["paths"][:count],
                        captions=buf["captions"][:count], meta=buf["meta"][:count],
                        attrs={"model": model, "pretrained": pretrained, "unit_size": unit_size,
                               "dtype": str(emb.dtype)})
        buf["emb"] = [emb[count:]]
        for key in ("paths", "captions", "meta"):
            buf[key] = buf[key][count:]
        unit += 1

    for emb, paths, captions, meta in _rows(folder):
        buf["emb"].append(np.asarray(emb))
        buf["paths"] += paths
        buf["captions"] += captions
        buf["meta"] += meta
        lines += paths
        while len(buf["paths"]) >= unit_size:
            flush(unit_size)
    if buf["paths"]:
        flush(len(buf["paths"]))
    out.write_inputs(lines)
    if out.write_manifest(unit, unit_size) is None:
        raise UserError(f"{folder}: could not be read into a complete set of shards")
    return out
