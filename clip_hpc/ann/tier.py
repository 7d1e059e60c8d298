"""The re-rank tier's query side: its trained quantizer loaded with every row's codes, FAISS's IndexRefine over an
index by it (what the self-check prices), and `TierScorer`, which the engine serves through (the build side,
training and encoding, is in `clip_hpc.index.rerank_tier`)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

EXACT_FACTORS = (2, 5, 10, 20, 50)  # rows per result the tier hands to the exact re-rank
MIN_PART = 1024  # candidates: a smaller part costs more to hand to another thread than to score (~0.1-0.2 µs each)


def load_tier(trained_path: Path, codes_path: Path, chunk: int = 1 << 20) -> faiss.Index:
    """The trained tier with every row's codes, read into RAM (row i is global id i)."""
    tier = faiss.read_index(str(trained_path))
    codes = np.load(codes_path, mmap_mode="r")
    for lo in range(0, len(codes), chunk):
        tier.add_sa_codes(np.ascontiguousarray(codes[lo : lo + chunk]))
    return tier


def refine_over(index: faiss.Index, tier: faiss.Index) -> faiss.IndexRefine:
    """FAISS's IndexRefine of `index` by the tier. It asks both for the same ntotal, but the tier has a row per
    global id, failed ones too (more rows than the index holds vectors): the check is met for the constructor,
    then the tier's true count is put back, and the refine index takes it too: it checks each candidate id
    against its own count, and ids run up to the last row, not to the number of vectors."""
    rows = tier.ntotal
    tier.ntotal = index.ntotal
    try:
        refine = faiss.IndexRefine(index, tier)
    finally:
        tier.ntotal = rows
    refine.ntotal = rows
    return refine


Part = tuple[int, np.ndarray]  # (query row, sorted candidate ids)


class TierScorer:
    """The tier's codes in RAM (row i is global id i) and its trained quantizer. `best` keeps each query's best
    candidates by the tier's score: the candidates' codes are gathered into a scratch index and scanned there
    (FAISS's flat-code scan, about a third of IndexRefine's cost a candidate: it calls a distance computer per
    id), and a query's candidates are cut into parts scored on `threads` threads at once (FAISS releases the GIL;
    each worker searches with one OpenMP thread, so none spins on the cores the model needs). A whole batch of
    queries is one call; a row gets what it would get alone (its parts depend on its own candidates only)."""

    def __init__(self, trained: faiss.Index, codes: np.ndarray, threads: int = 1) -> None:
        self.trained, self.codes, self.threads = trained, codes, max(1, int(threads))
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._owner: faiss.Index | None = None  # what `codes` views, when it is not an array of its own
        self._lock = threading.Lock()

    @classmethod
    def load(cls, trained_path: Path, codes_path: Path, threads: int = 1) -> TierScorer:
        """The tier of an INDEX_DIR, its codes read whole into RAM."""
        return cls(faiss.read_index(str(trained_path)), np.load(codes_path), threads)

    @classmethod
    def of_index(cls, tier: faiss.Index, threads: int = 1) -> TierScorer:
        """The scorer over a tier loaded whole (`load_tier`), as the self-check holds it: its codes seen in place
        (a copy would hold them twice: 256 MB a million vectors at SQ4), and an empty trained copy for the scratch
        indexes. The scorer keeps `tier` alive, and with it the memory its codes view."""
        size = int(tier.ntotal) * int(tier.sa_code_size())
        codes = faiss.rev_swig_ptr(tier.codes.data(), size).reshape(int(tier.ntotal), int(tier.sa_code_size()))
        trained = faiss.clone_index(tier)
        trained.reset()
        scorer = cls(trained, codes, threads)
        scorer._owner = tier
        return scorer

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def best(self, queries: np.ndarray, candidates: np.ndarray, keep: int) -> np.ndarray:
        """(n, keep) ids: row i's `keep` best of `candidates[i]` (-1 = none, also where fewer were given),
        ordered by score, ties by id."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts: list[Part] = []
        for i, row in enumerate(candidates):
            ids = np.sort(row[row >= 0])  # the codes' own ids are unique; sorted, the gather reads in order
            parts += [(i, part) for part in np.array_split(ids, self.parts_for(len(ids))) if len(part)]
        by_row: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for (i, _), scored in zip(parts, self._score_all(queries, parts, keep)):
            by_row.setdefault(i, []).append(scored)
        out = np.full((len(queries), keep), -1, dtype=np.int64)
        for i, mine in by_row.items():
            scores, ids = np.concatenate([s for s, _ in mine]), np.concatenate([d for _, d in mine])
            order = np.lexsort((ids, -scores))[:keep]
            out[i, : len(order)] = ids[order]
        return out

    def parts_for(self, n_candidates: int) -> int:
        """How many threads a query's candidates are cut across: one per MIN_PART candidates, at most `threads`."""
        return max(1, min(self.threads, n_candidates // MIN_PART))

    def _score_all(self, queries: np.ndarray, parts: list[Part], keep: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(parts) <= 1 or self.threads == 1:
            return [self._score(queries[i], ids, keep) for i, ids in parts]
        pool = self._executor()
        futures = [pool.submit(self._score, queries[i], ids, keep) for i, ids in parts]
        return [future.result() for future in futures]

    def _score(self, query: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The tier's scores of the best `keep` of `ids` for one query, and those ids."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:  # one per thread: a scratch index holds one part's codes at a time
            scratch = self._local.scratch = faiss.clone_index(self.trained)
        scratch.reset()
        scratch.add_sa_codes(self.codes[ids])
        scores, at = scratch.search(query[None, :], min(keep, len(ids)))
        valid = at[0] >= 0
        return scores[0][valid], ids[at[0][valid]]

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.threads,
                    thread_name_prefix="clip-hpc-tier",
                    initializer=faiss.omp_set_num_threads,
                    initargs=(1,),
                )
            return self._pool
