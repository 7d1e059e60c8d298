"""The serving engine: loads an INDEX_DIR (index, vectors, metadata, model) and answers queries by text, image,
id, raw vector, or a weighted combination of them, through the pure core in `ann.core`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.core import (
    DEFAULT_WEIGHTS,
    combine_parts,
    mmr,
    normalise_rows,
    rerank,
    search_index,
    search_index_rows,
    set_nprobe,
    unit_vector,
)
from clip_hpc.ann.refine import check_refine_factor
from clip_hpc.ann.tier import TierScorer
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.errors import UserError
from clip_hpc.formats.index_dir import IndexDir, IndexInfo
from clip_hpc.ingest.images import as_query_image
from clip_hpc.model.encoders import Encoder, ModelEncoder
from clip_hpc.search.records import MAX_K, PREFILTER_LIMIT, Filters, Hit, MetaFilters, UnknownIdError


# --- the engine: I/O at the edges ------------------------------------------------------------------------------
def default_encoder(
    info: IndexInfo, model_name: str | None = None, pretrained: str | None = None, device: str = "auto"
) -> ModelEncoder:
    """The model index.json records (unless overridden), loaded on first use and checked against the index's dim."""
    return ModelEncoder(model_name or info.model, pretrained or info.pretrained, device, dim=int(info.dim))


class SearchEngine:
    """One INDEX_DIR ready for queries; thread-safe for concurrent searches (the model loads once, lazily)."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        info: IndexInfo | None = None,
        encoder: Encoder | None = None,
        model_name: str | None = None,
        pretrained: str | None = None,
        device: str = "auto",
        nprobe: int | None = None,
        refine: bool | None = None,
        refine_factor: int | None = None,
        tier_threads: int | None = None,
    ) -> None:
        """`info`: index.json as `IndexDir.check_integrity` returned it, if the caller checked already (`serve` does,
        for the model), else checked and read here.
        `encoder` defaults to the model recorded in index.json (or `model_name`/`pretrained`), loaded lazily."""
        self.index_dir = Path(index_dir)
        files = IndexDir(self.index_dir)
        # a damaged file is one line here, not a SIGBUS at the first query (`serve` checked it already)
        self.info: IndexInfo = info if info is not None else files.check_integrity()
        self.n, self.dim = int(self.info.n), int(self.info.dim)
        self.index = files.open_index()
        self.vectors = files.open_vectors()
        self.meta = files.open_metadata()
        self.nprobe = int(nprobe or self.info.nprobe or 1)
        if nprobe is not None and nprobe < 1:
            raise UserError("--nprobe must be at least 1")
        set_nprobe(self.index, self.nprobe)
        self.refine = bool(self.info.refine) if refine is None else bool(refine)
        recorded_factor = self.info.refine_factor
        self.refine_factor = (10 if recorded_factor is None else int(recorded_factor)) if self.refine else 0
        if refine_factor is not None:  # another point of the recall/latency trade than the self-check chose
            check_refine_factor(refine_factor)
            self.refine_factor = int(refine_factor) if self.refine else 0
        self.tier, self.exact_factor = self._open_tier(files, tier_threads)
        self.encoder = encoder or default_encoder(self.info, model_name, pretrained, device)
        if int(self.encoder.dim) != self.dim:
            raise UserError(f"the encoder gives {self.encoder.dim}-d vectors, the index holds {self.dim}-d")

    def _open_tier(self, files: IndexDir, threads: int | None) -> tuple[TierScorer | None, int]:
        """The re-rank tier (in RAM), when index.json records one that pays and refine is on; it scores a query's
        candidates on `threads` threads (default: this job's CPUs)."""
        factor = int((self.info.tier or {}).get("exact_factor") or 0)
        if not (self.refine and factor and files.has_tier()):
            return None, 0
        threads = threads if threads is not None else job_env().cpus
        return TierScorer.load(files.tier_path, files.tier_codes_path, threads), factor

    def close(self) -> None:
        self.meta.close()
        if self.tier is not None:
            self.tier.close()

    # --- ids ---
    def path_of(self, id: int) -> str | None:
        return self.meta.path_of(int(id))

    def contains(self, id: int) -> bool:
        return self.path_of(id) is not None

    def record(self, id: int) -> dict | None:
        """The id's meta.sqlite row (path, caption, key, url, and a tar member's offset and size)."""
        return self.meta.full_record(int(id))

    def hits_for_ids(self, ids: Sequence[int]) -> list[Hit]:
        """Unranked hits (a random sample), with their paths and captions."""
        paths, captions = self.meta.paths_of(ids), self.meta.captions_of(ids)
        return [Hit(int(i), None, paths.get(int(i), ""), captions.get(int(i), "")) for i in ids]

    def random_ids(self, k: int) -> list[int]:
        return self.meta.random_ids(max(0, int(k)))

    def vectors_for_ids(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        known = self.meta.paths_of(ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise UnknownIdError(f"unknown image id{'s' if len(unknown) > 1 else ''} {unknown[:10]}")
        return np.asarray(self.vectors[ids], dtype=np.float32)

    # --- searches ---
    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        path_prefix: str | None = None,
        min_score: float | None = None,
        caption: str | None = None,
        min_similarity: float | None = None,
    ) -> list[list[Hit]]:
        """`path_prefix`, `caption` (full text: every word) and `min_similarity` (the stored image-caption cosine)
        restrict the results to the rows matching all three."""
        queries = self._check_queries(queries)
        k = self._check_k(k)
        if path_prefix or caption or min_similarity is not None:
            scores, ids = self._search_filtered(queries, k, path_prefix or None, caption or None, min_similarity)
        else:
            scores, ids = search_index(
                self.index,
                self.vectors,
                queries,
                k,
                refine_factor=self.refine_factor,
                widen=True,
                tier=self.tier,
                exact_factor=self.exact_factor,
            )
        return self._hits(scores, ids, min_score)

    def search_batch(
        self, queries: np.ndarray, ks: Sequence[int], min_scores: Sequence[float | None] | None = None
    ) -> list[list[Hit]]:
        """Several unfiltered queries (the server's micro-batches): one code search per distinct k, one tier call for
        them all, and row i gets exactly what `search_vectors(queries[i], ks[i], min_score=min_scores[i])` gives."""
        queries = self._check_queries(queries)
        ks = [self._check_k(k) for k in ks]
        min_scores = list(min_scores) if min_scores is not None else [None] * len(ks)
        if not len(ks) == len(min_scores) == len(queries):
            raise ValueError("search_batch needs one k and one min_score per query")
        found = search_index_rows(
            self.index,
            self.vectors,
            queries,
            ks,
            refine_factor=self.refine_factor,
            tier=self.tier,
            exact_factor=self.exact_factor,
        )
        scores = [row_scores for row_scores, _ in found]
        ids = [row_ids for _, row_ids in found]
        hits = self._hits(scores, ids, None)
        return [
            [hit for hit in row if floor is None or (hit.score is not None and hit.score >= floor)]
            for row, floor in zip(hits, min_scores)
        ]

    def search_text(self, text: str, k: int = 10, **filters: Any) -> list[Hit]:
        if not text or not text.strip():
            raise UserError("the text query is empty")
        return self.search_vectors(self.encoder.encode_text([text]), k, **filters)[0]

    def search_image(self, image: Any, k: int = 10, **filters: Any) -> list[Hit]:
        return self.search_vectors(self.encoder.encode_images([self.query_image(image)]), k, **filters)[0]

    def query_image(self, image: Any) -> Any:
        """A decoded RGB image as is; a path or bytes decoded as `clip-hpc embed` decodes (same draft size)."""
        return as_query_image(image, min_size=self.encoder.image_size)

    def search_ids(self, ids: Sequence[int], k: int = 10, **filters: Any) -> list[Hit]:
        if not len(ids):
            raise UserError("no image ids given")
        query = normalise_rows(self.vectors_for_ids(ids).mean(axis=0, keepdims=True))
        return self.search_vectors(query, k, **filters)[0]

    def query(
        self,
        *,
        text: str | None = None,
        image_ids: Sequence[int] = (),
        images: Sequence[Any] = (),
        vector: Sequence[float] | None = None,
        positive_ids: Sequence[int] = (),
        negative_ids: Sequence[int] = (),
        weights: dict[str, float] | None = None,
        k: int = 10,
        min_score: float | None = None,
        diversity: float = 0.0,
        path_prefix: str | None = None,
        caption: str | None = None,
        min_similarity: float | None = None,
    ) -> list[Hit]:
        """Any combination of parts; see `combine_parts`. `diversity` in [0, 1] re-orders the results by MMR."""
        combined = self.query_vector(
            text=text,
            image_ids=image_ids,
            images=images,
            vector=vector,
            positive_ids=positive_ids,
            negative_ids=negative_ids,
            weights=weights,
        )
        return self.search_combined(
            combined,
            k,
            min_score=min_score,
            diversity=diversity,
            path_prefix=path_prefix,
            caption=caption,
            min_similarity=min_similarity,
        )

    def query_vector(
        self,
        *,
        text: str | None = None,
        image_ids: Sequence[int] = (),
        images: Sequence[Any] = (),
        vector: Sequence[float] | None = None,
        positive_ids: Sequence[int] = (),
        negative_ids: Sequence[int] = (),
        weights: dict[str, float] | None = None,
    ) -> np.ndarray:
        """The unit vector a query searches with; callers may return it (`--with-vector`, `return_vector`)."""
        parts = self._query_parts(text, image_ids, images, vector, positive_ids, negative_ids)
        unknown_weights = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown_weights:
            raise UserError(f"unknown weight keys {sorted(unknown_weights)}; use {sorted(DEFAULT_WEIGHTS)}")
        return combine_parts(parts, weights or {})

    def search_combined(
        self,
        query: np.ndarray,
        k: int = 10,
        *,
        min_score: float | None = None,
        diversity: float = 0.0,
        path_prefix: str | None = None,
        caption: str | None = None,
        min_similarity: float | None = None,
    ) -> list[Hit]:
        """Search with a `query_vector`; `diversity` in [0, 1] re-orders the results by MMR."""
        if not 0.0 <= float(diversity) <= 1.0:
            raise UserError("diversity must be between 0 and 1")
        combined = np.asarray(query, dtype=np.float32)[None, :]
        k = self._check_k(k)
        filters = Filters(path_prefix=path_prefix, min_score=min_score, caption=caption, min_similarity=min_similarity)
        if diversity <= 0:
            return self.search_vectors(combined, k, **filters)[0]
        pool = self.search_vectors(combined, min(MAX_K, max(4 * k, 50)), **filters)[0]
        if not pool:
            return []
        order = mmr(combined[0], np.asarray(self.vectors[[h.id for h in pool]], dtype=np.float32), k, diversity)
        return [pool[i] for i in order]

    # --- helpers ---
    def _query_parts(
        self,
        text: str | None,
        image_ids: Sequence[int],
        images: Sequence[Any],
        vector: Sequence[float] | None,
        positive_ids: Sequence[int],
        negative_ids: Sequence[int],
    ) -> dict[str, np.ndarray]:
        parts: dict[str, np.ndarray] = {}
        if text is not None and text.strip():
            parts["text"] = self.encoder.encode_text([text])[0]
        image_vectors = []
        if len(image_ids):
            image_vectors.append(self.vectors_for_ids(image_ids))
        if len(images):
            image_vectors.append(self.encoder.encode_images([self.query_image(image) for image in images]))
        if image_vectors:
            parts["image"] = normalise_rows(np.concatenate(image_vectors)).mean(axis=0)
        if vector is not None:
            parts["vector"] = unit_vector(self._check_queries(vector, dtype=np.float64)[0])  # 1e38, 1e-40 are fine
        if len(positive_ids):
            parts["positive"] = self.vectors_for_ids(positive_ids).mean(axis=0)
        if not parts:
            raise UserError("empty query: give text, an image, image ids, a vector or positive ids")
        if len(negative_ids):
            parts["negative"] = self.vectors_for_ids(negative_ids).mean(axis=0)
        return parts

    def _check_queries(self, queries: Any, dtype: type = np.float32) -> np.ndarray:
        try:
            queries = np.asarray(queries, dtype=dtype)
        except (TypeError, ValueError):
            raise UserError("the query vector must be a list of numbers") from None
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"query vectors must have length {self.dim}, got shape {list(queries.shape)}")
        if not np.all(np.isfinite(queries)):
            raise UserError("the query vector holds NaN or infinite values")
        return queries

    @staticmethod
    def _check_k(k: int) -> int:
        if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_K:
            raise UserError(f"k must be an integer between 1 and {MAX_K}")
        return int(k)

    def _search_filtered(
        self, queries: np.ndarray, k: int, prefix: str | None, caption: str | None, min_similarity: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Few matching ids: exact search over just them. Many: the ANN search restricted by an id selector."""
        filters = MetaFilters(path_prefix=prefix, caption=caption, min_similarity=min_similarity)
        allowed = np.asarray(self.meta.ids_matching(**filters, limit=PREFILTER_LIMIT + 1), dtype=np.int64)
        if len(allowed) <= PREFILTER_LIMIT:
            cand = np.broadcast_to(allowed, (len(queries), len(allowed)))
            return rerank(queries, cand, self.vectors, k)
        selector = faiss.IDSelectorBatch(np.asarray(self.meta.ids_matching(**filters), dtype=np.int64))
        return search_index(
            self.index,
            self.vectors,
            queries,
            k,
            refine_factor=self.refine_factor,
            selector=selector,
            widen=True,
            tier=self.tier,
            exact_factor=self.exact_factor,
        )

    def _hits(
        self, scores: np.ndarray | Sequence[np.ndarray], ids: np.ndarray | Sequence[np.ndarray], min_score: float | None
    ) -> list[list[Hit]]:
        found = sorted({int(i) for row in ids for i in row if i >= 0})
        paths, captions = self.meta.paths_and_captions(found)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            out.append(
                [
                    Hit(int(i), float(s), paths.get(int(i), ""), captions.get(int(i), ""))
                    for s, i in zip(row_scores, row_ids)
                    if i >= 0 and np.isfinite(s) and (min_score is None or s >= min_score)
                ]
            )
        return out


def search_local(
    index_dir: str | Path,
    *,
    text: str | None = None,
    image: str | None = None,
    k: int = 10,
    nprobe: int | None = None,
    device: str = "auto",
    caption: str | None = None,
    min_similarity: float | None = None,
) -> tuple[list[Hit], np.ndarray]:
    """What `clip-hpc search INDEX_DIR TEXT [--image PATH]` does in local mode: text, image, or both combined.
    Returns the hits and the query vector they were found with."""
    if not text and not image:
        raise UserError("give a text query, --image PATH, or both")
    engine = SearchEngine(index_dir, nprobe=nprobe, device=device)
    try:
        query = engine.query_vector(text=text, images=[engine.query_image(image)] if image else [])
        return engine.search_combined(query, k, caption=caption, min_similarity=min_similarity), query
    finally:
        engine.close()
