"""clip-retrieval's embedding folder (`img_emb/img_emb_{n}.npy` + `metadata/metadata_{n}.parquet`, parquet row i
describing npy row i), owned here: its layout and column names for `clip-hpc export`, which writes one, and the
reading of one into an EMB_DIR, so `clip-hpc index` builds from it with the same checks, sampling and metadata as
from our shards.

Row i of the folder (files in numeric order) becomes global id i; the parquet's `image_path`, `caption`, `url` and
`key` become the shard's paths, captions and meta, and `text_emb/` (where present) the caption embeddings, so
`--vectors captions` builds from it too. One unit of rows is in memory at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.shard import ShardBatch, embedding_problem

EMB_SUBDIR, META_SUBDIR = "img_emb", "metadata"
EMB_STEM, META_STEM = "img_emb_", "metadata_"
TEXT_EMB_SUBDIR, TEXT_EMB_STEM = "text_emb", "text_emb_"  # clip-retrieval's caption embeddings, row for row
SIMILARITY_COLUMN = "similarity"  # LAION's image-caption cosine; null where a row has no caption
META_COLUMNS = ("image_path", "caption", "url", "key")  # what clip-retrieval's tools read, row for row
ID_COLUMN = "id"  # ours: the global id, beside clip-retrieval's columns
UNIT_SIZE = 10_000


def emb_file(folder: Path, n: int | str) -> Path:
    """File `n` of the embeddings; `n` as the digits of a file found (a zero-padded number keeps its zeros)."""
    return folder / EMB_SUBDIR / f"{EMB_STEM}{n}.npy"


def text_emb_file(folder: Path, n: int | str) -> Path:
    """The caption embeddings of `emb_file(folder, n)`'s rows (zero rows where an image has no caption)."""
    return folder / TEXT_EMB_SUBDIR / f"{TEXT_EMB_STEM}{n}.npy"


def metadata_file(folder: Path, n: int | str) -> Path:
    """The parquet file describing `emb_file(folder, n)` row for row."""
    return folder / META_SUBDIR / f"{META_STEM}{n}.parquet"


def metadata_columns(
    paths: Sequence[str], captions: Sequence[str], urls: Sequence[str], keys: Sequence[str]
) -> dict[str, Sequence[Any]]:
    """One parquet file's columns, by name, in clip-retrieval's order."""
    return dict(zip(META_COLUMNS, (paths, captions, urls, keys)))


def require_pyarrow() -> Any:  # pyarrow ships no types
    """pyarrow, or the one-line error naming the install: parquet is optional for everything else."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow


def is_embedding_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / EMB_SUBDIR).is_dir() and not EmbDir(path).looks_like_one()


def _numbered_emb_files(folder: Path) -> list[tuple[str, Path]]:
    """(number as written, file) of every embeddings file, in numeric order."""
    pattern = re.escape(EMB_STEM) + r"(\d+)\.npy"
    found = [(m.group(1), p) for p in (folder / EMB_SUBDIR).glob("*") if (m := re.fullmatch(pattern, p.name))]
    return sorted(found, key=lambda item: int(item[0]))


def _load_vectors(path: Path) -> np.ndarray:
    """A 2-d array of floats, memory-mapped, or one line naming the file: a folder from elsewhere may hold any
    bytes (numpy raises ValueError for a bad header or pickled objects), and complex or integer rows would be
    indexed as something they are not."""
    try:
        rows = np.load(path, mmap_mode="r")
    except (ValueError, EOFError):  # numpy's own words ("pickled data") mislead for a file of random bytes
        raise UserError(f"{path}: not a .npy array of vectors") from None
    if rows.ndim != 2:
        raise UserError(f"{path}: expected a 2-d array, found shape {rows.shape}")
    if rows.dtype.kind != "f":
        raise UserError(f"{path}: expected floating-point vectors, found {rows.dtype}")
    return rows


def _checked(path: Path, rows: np.ndarray, *, zero_rows: bool = False) -> np.ndarray:
    """`rows` loaded, if the index can take them (finite, unit norm; `zero_rows`: but for rows of zeros, which in
    text_emb/ mean "no caption"); else the error names the file of this folder, not the temporary shard the check
    would otherwise meet (nor embed, which never made them)."""
    rows = np.asarray(rows)
    problem = embedding_problem(rows[rows.any(axis=1)] if zero_rows else rows)
    if problem:
        raise UserError(f"{path}: {problem}; clip-hpc indexes L2-normalised rows: divide each by its norm and re-run")
    return rows


def _caption_rows(
    folder: Path, number: str, emb: np.ndarray, similarity: list | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """`text_emb_{number}.npy` with each row's image-caption cosine, or None where the folder has no text_emb/. A
    zero row has no caption (our export writes one there, with a null similarity): NaN, so it stays out of a
    caption index. Without a `similarity` column (clip-retrieval writes none) the cosine is computed."""
    path = text_emb_file(folder, number)
    if not path.exists():
        if (folder / TEXT_EMB_SUBDIR).is_dir():  # a shard without caption embeddings among ones with them
            raise UserError(f"{path} is missing: text_emb/ must hold one file for each {EMB_STEM}N.npy")
        return None
    text = _load_vectors(path)
    if text.shape != emb.shape:
        raise UserError(f"{path}: shape {text.shape}, but {emb_file(folder, number).name} is {emb.shape}")
    text = _checked(path, text, zero_rows=True)
    if similarity is None:
        sims = np.einsum("ij,ij->i", np.asarray(emb, np.float32), text.astype(np.float32))
    else:
        sims = np.array([np.nan if v is None else v for v in similarity], dtype=np.float32)
    sims[~text.any(axis=1)] = np.nan
    return text, sims


def _rows(
    folder: Path,
) -> Iterator[tuple[np.ndarray, list[str], list[str], list[str], tuple[np.ndarray, np.ndarray] | None]]:
    """(embeddings, paths, captions, meta JSON, caption rows or None) per npy file, its parquet's columns row for
    row."""
    npys = _numbered_emb_files(folder)
    if not npys:
        raise UserError(f"{folder}/{EMB_SUBDIR} holds no {EMB_STEM}N.npy files")
    first: tuple[str, int] | None = None  # (file name, width) of the first file: one width for the whole folder
    for number, npy in npys:
        emb = _load_vectors(npy)
        first = first or (npy.name, emb.shape[1])
        if emb.shape[1] != first[1]:  # rows of two widths cannot share a shard (nor an index)
            raise UserError(f"{npy}: {emb.shape[1]}-d vectors, but {first[0]} holds {first[1]}-d ones")
        n = len(emb)
        parquet = metadata_file(folder, number)
        columns: dict[str, list] = {}
        if parquet.exists():
            pa = require_pyarrow()
            try:
                table = pa.parquet.read_table(parquet)
            except pa.ArrowException as exc:  # a cut or foreign file: pyarrow says why in its first line
                raise UserError(f"{parquet}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
            if table.num_rows != n:
                raise UserError(f"{parquet}: {table.num_rows} rows for the {n} vectors of {npy.name}")
            columns = {
                c: table.column(c).to_pylist() for c in (*META_COLUMNS, SIMILARITY_COLUMN) if c in table.column_names
            }
        path_col, caption_col, url_col, key_col = META_COLUMNS
        paths = [str(p) if p else f"{npy.name}#{i}" for i, p in enumerate(columns.get(path_col, [None] * n))]
        captions = [str(c or "") for c in columns.get(caption_col, [None] * n)]
        meta = [
            json.dumps({k: columns[k][i] for k in (key_col, url_col) if k in columns and columns[k][i]})
            for i in range(n)
        ]
        emb = _checked(npy, emb)
        yield emb, paths, captions, meta, _caption_rows(folder, number, emb, columns.get(SIMILARITY_COLUMN))


def import_embedding_folder(
    folder: str | os.PathLike, emb_dir: str | os.PathLike, *, model: str, pretrained: str, unit_size: int = UNIT_SIZE
) -> EmbDir:
    """Write `folder` as an EMB_DIR (inputs.txt, shards, manifest) at `emb_dir`."""
    folder, out = Path(folder), EmbDir(emb_dir)
    buf: dict[str, list] = {"emb": [], "paths": [], "captions": [], "meta": [], "text": [], "sims": []}
    lines: list[str] = []
    unit = 0

    def flush(count: int) -> None:
        nonlocal unit
        emb = np.concatenate(buf["emb"])
        text = np.concatenate(buf["text"]) if buf["text"] else None
        sims = np.concatenate(buf["sims"]) if buf["sims"] else None
        start = unit * unit_size
        out.write_shard(
            unit,
            ShardBatch(
                embeddings=emb[:count],
                ids=range(start, start + count),
                paths=buf["paths"][:count],
                captions=buf["captions"][:count],
                meta=buf["meta"][:count],
                caption_embeddings=None if text is None else text[:count],
                similarity=None if sims is None else sims[:count],
                attrs={"model": model, "pretrained": pretrained, "unit_size": unit_size, "dtype": str(emb.dtype)},
            ),
        )
        buf["emb"] = [emb[count:]]
        buf["text"], buf["sims"] = ([] if text is None else [text[count:]]), ([] if sims is None else [sims[count:]])
        for key in ("paths", "captions", "meta"):
            buf[key] = buf[key][count:]
        unit += 1

    for emb, paths, captions, meta, caption_rows in _rows(folder):
        buf["emb"].append(emb)
        if caption_rows is not None:
            buf["text"].append(caption_rows[0])
            buf["sims"].append(caption_rows[1])
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
