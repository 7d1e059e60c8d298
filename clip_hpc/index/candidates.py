"""Indexes of the same rows that the self-check may serve in place of the one built: an HNSW graph (opt-in,
ann/graph.py) and IVF over SQ8 codes in the built lists (ann/fine_ivf.py). Each is priced on the tuning half by the
same bounds as the built index's settings, at its cheapest setting that reaches the target, and then timed beside
them (index/timed_choice.py); the clock decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from clip_hpc.ann.fine_ivf import FINE_REFINE, build_fine_ivf, fine_key, fine_label, fine_ladder
from clip_hpc.ann.graph import EF_LADDER, build_graph, graph_key, graph_label
from clip_hpc.ann.ground_truth import RECALL_K
from clip_hpc.index.check_queries import CheckQueries
from clip_hpc.index.setting_recall import SettingRecall, family_bound, longest_list, tuning_bounds
from clip_hpc.index.timed_choice import Setting
from clip_hpc.index.tuning import TARGET_RECALL


@dataclass(frozen=True)
class Replacement:
    """A candidate index at its cheapest setting that reaches the target: search width (nprobe, or a graph's
    efSearch), re-rank factor from the float16 rows (0: none), the bound it reached, and its factory key."""

    label: str
    index: faiss.Index
    width: int
    factor: int
    bound: float
    key: str

    @property
    def setting(self) -> Setting:
        return self.width, (self.factor, 0)


def graph_candidate(vectors: np.ndarray, tune: CheckQueries, tuning: dict[str, float]) -> Replacement | None:
    """The rows' HNSW graph at the least efSearch whose tuning bound (recorded) reaches the target."""
    graph = build_graph(vectors)
    bound_of = tuning_bounds(SettingRecall(graph, vectors, None, [(0, 0)]), tune, [1], RECALL_K, RECALL_K, {})
    for ef in EF_LADDER:
        tuning[graph_label(ef)] = bound = bound_of(ef, [(0, 0)])((0, 0))
        if bound >= TARGET_RECALL:
            return Replacement(graph_label(ef), graph, ef, 0, bound, graph_key())
    return None


def list_coverage(ivf: faiss.IndexIVF, vectors: np.ndarray, tune: CheckQueries, probes: list[int]) -> np.ndarray:
    """Per query and nprobe, the share of its exact top 10 that lies in the `probes[j]` lists it probes: the most
    recall any codes in those lists can give, from the coarse quantizer alone (no codes searched)."""
    truth = tune.truth.ids
    _, probed = ivf.quantizer.search(np.ascontiguousarray(tune.queries, dtype=np.float32), max(probes))
    rows = np.asarray(vectors[np.maximum(truth, 0).ravel()], dtype=np.float32)
    home = ivf.quantizer.assign(rows, 1).reshape(truth.shape)  # the list each true neighbour sits in
    rank = np.full(truth.shape, np.iinfo(np.int64).max)
    for j in range(probed.shape[1]):
        rank[(home == probed[:, j : j + 1]) & (rank > j)] = j
    present = (truth >= 0).sum(axis=1)
    shares = [
        np.where(present > 0, ((rank < p) & (truth >= 0)).sum(axis=1) / np.maximum(present, 1), 1.0) for p in probes
    ]
    return np.stack(shares, axis=1)  # a query with nothing to find (alone in its index) finds all of it


def fine_candidate(
    index: faiss.Index, vectors: np.ndarray, tune: CheckQueries, tuning: dict[str, float]
) -> Replacement | None:
    """IVF-SQ8 in the lists of `index` at the least nprobe (up to half the lists: past that an exact scan is near)
    and then the least re-rank factor whose tuning bound (recorded) reaches the target. Only nprobes whose lists
    hold enough of the true neighbours to reach it (`list_coverage`) are priced; with none, nothing is built."""
    built = faiss.extract_index_ivf(index)
    ladder = [p for p in fine_ladder(int(built.nlist)) if 2 * p <= built.nlist]
    if not ladder:
        return None
    coverage = list_coverage(built, vectors, tune, ladder)
    ladder = [p for j, p in enumerate(ladder) if family_bound(coverage[:, j], tune) >= TARGET_RECALL]
    if not ladder:
        return None
    fine = build_fine_ivf(index, vectors)
    configs = [(factor, 0) for factor in FINE_REFINE]
    recall = SettingRecall(fine, vectors, None, configs)
    bound_of = tuning_bounds(recall, tune, ladder, RECALL_K * max(FINE_REFINE), longest_list(fine), {})
    for probe in ladder:
        bounds = bound_of(probe, configs)
        for factor, _ in configs:
            tuning[fine_label(probe, factor)] = bound = bounds((factor, 0))
            if bound >= TARGET_RECALL:
                return Replacement(fine_label(probe, factor), fine, probe, factor, bound, fine_key(int(built.nlist)))
    return None
