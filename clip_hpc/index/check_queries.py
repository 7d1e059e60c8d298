"""The self-check's queries (index/selfcheck.py): indexed vectors, text-like gap groups and captions, split into a
tuning half and a reporting half that tuning never sees, with the exact top 10 of every row searched once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clip_hpc.ann.core import normalise_rows
from clip_hpc.ann.ground_truth import RECALL_K, Truth, exact_truth
from clip_hpc.ann.text_queries import text_like_groups

TEXT_GROUPS = 20  # text-like gap groups per half, each with its own direction (4 a cosine: 15 d.f. for the bound)


def _family_spans(families: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, dict[str, list[tuple[int, int]]]]:
    """All query groups stacked into one matrix, and each family's (start, stop) rows per group."""
    parts: list[np.ndarray] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    at = 0
    for name, groups in families.items():
        spans[name] = []
        for group in groups:
            parts.append(group)
            spans[name].append((at, at + len(group)))
            at += len(group)
    return np.concatenate(parts), spans


def _query_families(
    vectors: np.ndarray, ids: np.ndarray, captions: np.ndarray | None, rng: np.random.Generator
) -> tuple[dict[str, list[np.ndarray]], list[float]]:
    """in_distribution (indexed vectors), text_like (gap groups, cosines 0.45-0.25), captions (if any)."""
    images = normalise_rows(np.asarray(vectors[np.sort(ids)], dtype=np.float32))
    text = text_like_groups(images, rng, TEXT_GROUPS)
    families = {"in_distribution": [images], "text_like": [q for _, q in text]}
    if captions is not None and len(captions):
        families["captions"] = [normalise_rows(captions)]
    return families, [c for c, _ in text]


@dataclass
class CheckQueries:
    """One half of the self-check's queries (tuning or reporting): every family stacked, each family's row spans,
    the exact top 10 of every row, and the text-like groups' target cosines."""

    queries: np.ndarray
    spans: dict[str, list[tuple[int, int]]]
    truth: Truth
    cosines: list[float]
    own: np.ndarray  # per row: the id of the indexed vector it is (in-distribution), else -1; left out of both


def check_queries(
    vectors: np.ndarray, query_ids: np.ndarray, rng: np.random.Generator, caption_vectors: np.ndarray | None
) -> tuple[CheckQueries, CheckQueries]:
    """The tuning and the reporting halves of every family, with one exact search for both."""
    ids = np.asarray(query_ids)
    halves, half_ids = [], []
    for half in range(2):  # one query id (a 1-vector index) serves both halves: an empty half's recall is NaN
        step = slice(half, None, 2) if len(ids) > 1 else slice(None)
        caps = None if caption_vectors is None else caption_vectors[half::2]
        half_ids.append(np.sort(ids[step]))
        halves.append(_query_families(vectors, ids[step], caps, rng))
    (tune_families, tune_cosines), (report_families, report_cosines) = halves
    tune_queries, tune_spans = _family_spans(tune_families)
    report_queries, report_spans = _family_spans(report_families)
    tune_own = _own_ids(len(tune_queries), tune_spans, half_ids[0])
    report_own = _own_ids(len(report_queries), report_spans, half_ids[1])
    own = np.concatenate([tune_own, report_own])
    truth = exact_truth(np.concatenate([tune_queries, report_queries]), vectors, RECALL_K, own=own)  # one pass
    cut = len(tune_queries)
    return (
        CheckQueries(tune_queries, tune_spans, truth.rows(slice(0, cut)), tune_cosines, tune_own),
        CheckQueries(report_queries, report_spans, truth.rows(slice(cut, None)), report_cosines, report_own),
    )


def _own_ids(rows: int, spans: dict[str, list[tuple[int, int]]], ids: np.ndarray) -> np.ndarray:
    """Each stacked row's own id: the in-distribution rows are the indexed vectors `ids` (sorted), the rest -1."""
    own = np.full(rows, -1, dtype=np.int64)
    (start, stop), *_ = spans["in_distribution"]
    own[start:stop] = np.asarray(ids, dtype=np.int64)
    return own
