"""EMB_DIR -> the embedding folder clip-retrieval writes (its layout: formats/embedding_folder.py), so
embedding_reader, autofaiss and clip-retrieval's other tools read our embeddings unchanged.

One pair of files per shard that holds embeddings, numbered from 0 in unit order, hence in id order; parquet row i
describes npy row i (clip-retrieval's columns plus our global `id`). Written into a temporary directory beside
`out` and renamed at the end, so `out` is whole or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from clip_hpc.errors import UserError, full_disk_is_a_user_error
from clip_hpc.formats.atomic import atomic_write_bytes, temp_path
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.embedding_folder import (
    EMB_SUBDIR,
    ID_COLUMN,
    META_SUBDIR,
    SIMILARITY_COLUMN,
    TEXT_EMB_SUBDIR,
    emb_file,
    metadata_columns,
    metadata_file,
    require_pyarrow,
    text_emb_file,
)
from clip_hpc.formats.shard import meta_key_url

FORMATS = ("embedding-reader",)


def _npy_bytes(array: np.ndarray, dtype: np.dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype))
    return buf.getvalue()


def export_embeddings(
    emb_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "embedding-reader"
) -> dict[str, int]:
    """Write the export of a complete EMB_DIR; returns how many files and rows were written. Shards embedded with
    `--captions` also give `text_emb/` and a `similarity` column (all shards or none: a mix is an error)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    pa = require_pyarrow()

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    emb = EmbDir(emb_dir)
    summary = emb.check_set()
    if not summary.n_embedded:  # embedding_reader refuses a folder without embeddings ("No embeddings found")
        raise UserError(
            f"{emb.root}: the shards hold no embedded images ({summary.n_failed} failed); nothing to export"
        )
    units = [entry.unit for entry in summary.shards]  # never a shard file outside the unit plan
    with_text = _all_or_no_captions(emb, units)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EMB_SUBDIR).mkdir(parents=True)
    (tmp / META_SUBDIR).mkdir()
    if with_text:
        (tmp / TEXT_EMB_SUBDIR).mkdir()
    n_files = n_rows = 0
    dtype: np.dtype | None = None  # the first file's: embedding_reader sizes every file's rows by the first one
    try:
        with full_disk_is_a_user_error(out, "clip-hpc export"):  # the temporary directory is removed below
            for shard in emb.iter_shards(units=units):
                if not len(shard.ids):
                    continue  # a unit where every image failed: embedding_reader wants no empty files
                keys, urls = zip(*map(meta_key_url, shard.meta))
                columns = {
                    **metadata_columns(shard.paths, shard.captions, list(urls), list(keys)),
                    ID_COLUMN: pa.array(shard.ids, pa.int64()),
                }
                dtype = dtype or shard.embeddings.dtype
                if with_text and shard.caption_embeddings is not None:  # with_text: every shard has them
                    columns[SIMILARITY_COLUMN] = pa.array(shard.similarity, pa.float32(), from_pandas=True)  # NaN: null
                    atomic_write_bytes(text_emb_file(tmp, n_files), _npy_bytes(shard.caption_embeddings, dtype))
                table = pa.table(columns)
                atomic_write_bytes(emb_file(tmp, n_files), _npy_bytes(shard.embeddings, dtype))
                pa.parquet.write_table(table, metadata_file(tmp, n_files))
                n_files += 1
                n_rows += len(shard.ids)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": n_files, "rows": n_rows}


def _all_or_no_captions(emb: EmbDir, units: list[int]) -> bool:
    """Whether the shards carry caption embeddings: all of them (True) or none (False); a mix cannot be exported
    row for row, so it is an error naming the remedy."""
    flags = {shard.has_captions for shard in emb.iter_shards(with_embeddings=False, units=units)}
    if len(flags) > 1:
        raise UserError(
            f"{emb.root}: some shards were embedded with --captions, some without; re-run clip-hpc "
            "embed --captions (it redoes only the units without) or export from an EMB_DIR of one kind"
        )
    return flags == {True}
