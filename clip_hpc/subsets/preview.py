"""The fast preview: candidates from an INDEX_DIR's FAISS index (range_search for a threshold, search for --top),
re-scored exactly from its vectors.npy and judged by the same rule as the exact scan. Approximate all the same: an
image the index does not return as a candidate is missed, so the outputs say `"exact": false`. Runs on rank 0."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from clip_hpc.cluster.collective import from_root
from clip_hpc.cluster.world import World
from clip_hpc.errors import UserError
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.subsets.options import FilterOptions, FilterResult, Settings
from clip_hpc.subsets.out_dir import SCHEMA, OutDir
from clip_hpc.subsets.outputs import select_results, write_outputs
from clip_hpc.subsets.queries import QueryVectors, encode_queries
from clip_hpc.subsets.scan import url_of
from clip_hpc.subsets.scoring import best_first, kept, score_rows

CANDIDATE_SLACK = 0.1  # the index's compressed scores err by a few hundredths: gather below the threshold
TOP_FACTOR = 4  # --top N asks the index for 4N candidates per query


def candidates(index: object, queries: QueryVectors, threshold: float | None, top: int | None) -> np.ndarray:
    """Pure on a FAISS index: the ids the index returns near any positive query."""
    positives = np.ascontiguousarray(queries.positives, np.float32)
    ntotal = int(index.ntotal)  # type: ignore[attr-defined]  # faiss has no stubs
    if threshold is not None:
        try:
            _, _, ids = index.range_search(positives, float(threshold) - CANDIDATE_SLACK)  # type: ignore[attr-defined]  # faiss has no stubs
        except RuntimeError:  # an index type without range search: its best candidates instead
            _, ids = index.search(positives, min(ntotal, 10_000))  # type: ignore[attr-defined]  # faiss has no stubs
    else:
        _, ids = index.search(positives, min(ntotal, TOP_FACTOR * int(top or 1)))  # type: ignore[attr-defined]  # faiss has no stubs
    found = np.unique(np.asarray(ids, np.int64).ravel())
    return found[found >= 0]


def preview_table(files: IndexDir, queries: QueryVectors, settings: Settings) -> tuple[pa.Table, int]:
    """The candidates that pass the exact rule on their stored vectors, described from meta.sqlite."""
    from clip_hpc.ann.core import set_nprobe

    info = files.load_info()
    index = files.open_index()
    set_nprobe(index, int(info.nprobe or 1))
    ids = candidates(index, queries, settings.threshold, settings.top)
    vectors = files.open_vectors()
    scored = score_rows(np.asarray(vectors[ids]), queries.positives, queries.negatives)
    with files.open_metadata() as store:
        similarity = store.similarities_of(ids.tolist()) if settings.min_caption_similarity is not None else {}
        sims = np.array([similarity.get(int(i), np.nan) for i in ids], np.float32)
        passing = np.flatnonzero(kept(scored, settings.threshold, sims, settings.min_caption_similarity))
        if settings.top is not None:
            passing = passing[best_first(scored.score[passing], ids[passing], settings.top)]
        records = [store.full_record(int(i)) or {} for i in ids[passing]]
    paths = [str(r.get("path") or "") for r in records]
    table = pa.table(
        {
            "id": ids[passing],
            "path": paths,
            "url": [str(r.get("url") or "") or url_of(p, "") for p, r in zip(paths, records)],
            "caption": [str(r.get("caption") or "") for r in records],
            "score": scored.score[passing],
            "query": scored.query[passing],
            "offset": [int(r["offset"]) if r.get("offset") is not None else -1 for r in records],
            "size": [int(r["size"]) if r.get("size") is not None else -1 for r in records],
            "identity": [str(r.get("identity") or "") for r in records],
        },
        schema=SCHEMA,
    )
    return table, int(index.ntotal)


def preview_subset(options: FilterOptions, w: World) -> FilterResult:
    """The whole preview on rank 0, then the common finish (tars on every rank, filter.json)."""
    from clip_hpc.subsets.run import finish

    t0 = time.perf_counter()

    def run() -> tuple[Settings, FilterResult]:
        files = IndexDir(options.source)
        info = files.load_info()
        if info.vectors != "images" or info.model is None:
            raise UserError(f"{files.root}: filter previews need an index of image vectors with a recorded model")
        settings = Settings.of(options, str(info.created), info.model, str(info.pretrained), exact=False)
        out = OutDir(options.out)
        out.claim(settings)
        out.remove_stale_temp_files()
        queries = encode_queries(
            info.model,
            str(info.pretrained),
            options.texts,
            options.images,
            options.negatives,
            options.device,
            info.dim,
        )
        table, n_scanned = preview_table(files, queries, settings)
        results = select_results([table], settings.top)
        files_written = write_outputs(out, results, options.to)
        return settings, FilterResult(options.out, False, n_scanned, len(results), 0, 0, files=files_written)

    settings, result = from_root(w, run)
    finish(options, settings, result, w, t0, {"search_s": time.perf_counter() - t0})
    return result
