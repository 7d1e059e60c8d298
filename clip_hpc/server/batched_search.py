"""The server's batched-search policy: which searches share a FAISS call (and a text the fused text-search stage),
and the two stages that run them on the compute thread."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from clip_hpc.ann.core import combine_parts
from clip_hpc.search.engine import SearchEngine
from clip_hpc.search.records import Hit
from clip_hpc.server.runtime import ServingRuntime
from clip_hpc.server.shared_encoder import SharedEncoder


def shares_batches(
    diversity: float, path_prefix: str | None, caption: str | None, min_similarity: float | None = None
) -> bool:
    """Whether a search may join a shared FAISS batch (and a text the fused text-search stage): filtered or
    diversified searches need a selector or MMR of their own, so they run alone."""
    return not (diversity or path_prefix or caption or min_similarity is not None)


class BatchedSearch:
    """The app's searches: plain queries (no path prefix, caption filter or diversity) share one FAISS call per batch,
    on the compute thread; filtered or diversified ones (and all of them without batching) run alone in their own
    request thread, so they hold nobody up. A plain text query that misses the text cache is encoded and searched in
    one call (`search_text`): no hop back to the request threads between the two (3 ms of a 50 ms round of 8).
    `encoder` is the engine's own encoder (its cache and its model call)."""

    def __init__(self, engine: SearchEngine, encoder: SharedEncoder, runtime: ServingRuntime) -> None:
        self.engine, self.encoder, self.compute = engine, encoder, runtime.compute
        self.stage = runtime.stage("search", self._run)
        self.text_stage = runtime.stage("text-search", self._run_text)

    def search_text(self, text: str, k: int = 10, *, min_score: float | None = None) -> tuple[np.ndarray, list[Hit]]:
        """(query vector, hits) for a text alone: what `query_vector(text=text)` then `search_combined` give."""
        if self.fuses(text):
            return self.search_text_future(text, k, min_score=min_score).result()
        query = self.engine.query_vector(text=text)
        return query, self.search_combined(query, k, min_score=min_score)

    def fuses(self, text: str) -> bool:
        """Whether this text goes through the fused stage: batching on, and not in the text cache."""
        return self.text_stage is not None and bool(text.strip()) and not self.encoder.is_cached(text)

    def search_text_future(self, text: str, k: int = 10, *, min_score: float | None = None) -> Future:
        """`search_text`'s answer as a future, for a text that `fuses`: the GET route awaits it on the event loop
        instead of blocking a threadpool thread (two thread hops a request; ~1 ms off the 8-client p50, measured)."""
        assert self.text_stage is not None
        return self.text_stage.submit_future((text, k, min_score))

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
        if self.stage is None or not shares_batches(diversity, path_prefix, caption, min_similarity):
            return self.compute.search_here(
                self.engine.search_combined,
                query,
                k,
                min_score=min_score,
                diversity=diversity,
                path_prefix=path_prefix,
                caption=caption,
                min_similarity=min_similarity,
            )
        return self.stage.submit((np.asarray(query, dtype=np.float32), k, min_score))

    def _run(self, items: list[tuple[np.ndarray, int, float | None]]) -> list[list[Hit]]:
        return self.compute.run(
            self.engine.search_batch,
            np.stack([query for query, _, _ in items]),
            [k for _, k, _ in items],
            [min_score for _, _, min_score in items],
        )

    def _run_text(self, items: list[tuple[str, int, float | None]]) -> list[tuple[np.ndarray, list[Hit]]]:
        texts = [text for text, _, _ in items]
        vectors, queries, hits = self.compute.run(
            self._encode_and_search, texts, [k for _, k, _ in items], [min_score for _, _, min_score in items]
        )
        self.encoder.remember(texts, vectors)
        return list(zip(queries, hits))

    def _encode_and_search(
        self, texts: list[str], ks: list[int], min_scores: list[float | None]
    ) -> tuple[np.ndarray, np.ndarray, list[list[Hit]]]:
        vectors = self.encoder.model_encode_text(texts)
        queries = np.stack([combine_parts({"text": vector}, {}) for vector in vectors])
        return vectors, queries, self.engine.search_batch(queries, ks, min_scores)
