"""EMB_DIR -> the layout clip-retrieval writes (`img_emb/img_emb_{n}.npy`, `metadata/metadata_{n}.parquet`), so
embedding_reader, autofaiss and clip-retrieval's other tools read our embeddings unchanged.

One pair of files per shard that holds embeddings, numbered from 0 in unit order, hence in id order; parquet row i
describes npy row i (`image_path`, `caption`, `url`, `key`, plus our global `id`). Written into a temporary
directory beside `out` and renamed at the end, so `out` is whole or absent.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from clip_hpc.errors import UserError, full_disk_is_a_user_error
from clip_hpc.formats.atomic import atomic_write_bytes
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest.tars import meta_key_url

FORMATS = ("embedding-reader",)
EMB_SUBDIR, META_SUBDIR = "img_emb", "metadata"


def require_pyarrow():  # type: ignore[no-untyped-def]
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError("writing parquet needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def export_embeddings(emb_dir: str | os.PathLike, out: str | os.PathLike,
                      fmt: str = "embedding-reader") -> dict[str, int]:
    """Write the export of a complete EMB_DIR; returns how many files and rows were written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    emb = EmbDir(emb_dir)
    emb.check_set()
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EMB_SUBDIR).mkdir(parents=True)
    (tmp / META_SUBDIR).mkdir()
    n_files = n_rows = 0
    try:
        with full_disk_is_a_user_error(out, "clip-hpc export"):  # the temporary directory is removed below
            for shard in emb.iter_shards():
                if not len(shard.ids):
                    continue  # a unit where every image failed: embedding_reader wants no empty files
                keys, urls = zip(*map(meta_key_url, shard.meta))
                table = pa.table({"image_path": shard.paths, "caption": shard.captions, "url": list(urls),
                                  "key": list(keys), "id": pa.array(shard.ids, pa.int64())})
                atomic_write_bytes(tmp / EMB_SUBDIR / f"img_emb_{n_files}.npy", _npy_bytes(shard.embeddings))
                pq.write_table(table, tmp / META_SUBDIR / f"metadata_{n_files}.parquet")
                n_files += 1
                n_rows += len(shard.ids)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": n_files, "rows": n_rows}
