"""The exact scan of one unit: all queries against every stored vector of its shard, and the part it leaves."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from clip_hpc.formats.shard import meta_key_url
from clip_hpc.formats.shard_columns import ScanColumns, backing_buffer, read_row_details, read_scan_columns
from clip_hpc.ingest.object_store import is_url
from clip_hpc.subsets.options import Settings
from clip_hpc.subsets.out_dir import SCHEMA
from clip_hpc.subsets.queries import QueryVectors
from clip_hpc.subsets.scoring import Scored, best_first, kept, no_direction, score_rows


def url_of(path: str, meta: str) -> str:
    """A sample's URL: img2dataset's `url` for a tar member, the input itself for an object-store input, else ""."""
    return meta_key_url(meta)[1] or (path if is_url(path) else "")


def read_ahead(
    shards: Sequence[str], buffers: tuple[np.ndarray, np.ndarray] | None = None, around_cache: bool = False
) -> Iterator[tuple[str, ScanColumns]]:
    """Each shard's scan columns, the next one read by a thread while the caller scores this one (torch's products
    release the GIL): the scan then costs about the larger of reading and scoring, not their sum. Two vector
    buffers take turns, so a shard's `embeddings` are overwritten once the caller has moved on to the next one
    (scan_unit keeps none of them). `buffers`: the two (uint8, `span_read.scratch`) to use from the first shard on
    (a GPU scan's pinned pair); by default those the first two shards were read into. `around_cache`: see
    `span_read.read_span`."""
    with ThreadPoolExecutor(1) as pool:
        turns: list[np.ndarray | None] = list(buffers) if buffers is not None else [None, None]

        def read(i: int) -> Future[ScanColumns]:
            return pool.submit(read_scan_columns, shards[i], turns[i % 2], around_cache)

        pending = read(0) if shards else None
        for i, shard in enumerate(shards):
            columns = pending.result()  # type: ignore[union-attr]  # set whenever shards is not empty
            if buffers is None:  # the buffer this shard came in is its turn's from now on
                turns[i % 2] = backing_buffer(columns.embeddings)
            pending = read(i + 1) if i + 1 < len(shards) else None
            yield shard, columns


def passing_rows(columns: ScanColumns, scored: Scored, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the rows kept (for --top the unit's best `top`), ascending, and of the rows whose vector has no
    direction (`no_direction`), which are never kept. Only the candidates' norms are computed: the rows that pass,
    and those whose score is not a number; for --top the best are re-chosen until none of them is unusable."""
    passing = np.flatnonzero(kept(scored, settings.threshold, columns.similarity, settings.min_caption_similarity))
    unusable = [np.setdiff1d(np.flatnonzero(~np.isfinite(scored.score)), passing)]  # NaN: never passes
    while True:
        chosen = passing
        if settings.top is not None:
            chosen = passing[best_first(scored.score[passing], columns.ids[passing], settings.top)]
        bad = chosen[no_direction(columns.embeddings, chosen)]
        if not len(bad):
            return np.sort(chosen), np.sort(np.concatenate(unusable))
        unusable.append(bad)
        passing = np.setdiff1d(passing, bad)


def scan_unit(
    shard: str | os.PathLike, columns: ScanColumns, queries: QueryVectors, settings: Settings, device: str | None
) -> tuple[pa.Table, int, np.ndarray]:
    """The unit's passing rows (for --top its best `top`, which is all a global top-N can need of it), described,
    in id order; how many rows were scanned; and the ids of the rows left out for having no direction."""
    scored = score_rows(columns.embeddings, queries.positives, queries.negatives, device)
    passing, unusable = passing_rows(columns, scored, settings)
    details = read_row_details(shard, passing)
    table = pa.table(
        {
            "id": columns.ids[passing],
            "path": details.paths,
            "url": [url_of(p, m) for p, m in zip(details.paths, details.meta)],
            "caption": details.captions,
            "score": scored.score[passing],
            "query": scored.query[passing],
            "offset": details.offsets,
            "size": details.sizes,
            "identity": details.identities,
        },
        schema=SCHEMA,
    )
    return table, len(columns.ids), columns.ids[unusable]
