"""Recall@10 of an index's settings on the self-check's queries, and the bound a setting must reach: what the
self-check's sweep (index/selfcheck.py) and the candidates served in place of the built index (index/candidates.py)
price their settings by.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from clip_hpc.ann.core import search_index, set_nprobe
from clip_hpc.ann.ground_truth import RECALL_K, tie_aware_positions, true_neighbours, without_own
from clip_hpc.index.check_queries import CheckQueries
from clip_hpc.index.tier_recall import tier_ranks, tier_scores
from clip_hpc.index.tuning import IMAGE_TARGET, TARGET_RECALL, group_prediction_bound, recall_lower_bound

FAMILY_MARGIN = {"in_distribution": IMAGE_TARGET - TARGET_RECALL}  # a family's bound is recorded less its target's
# excess over TARGET_RECALL, so that one number compares every family with one target
Config = tuple[int, int]  # (refine factor: candidates per result from the codes, the tier's exact factor or 0)


def longest_list(ivf: faiss.IndexIVF) -> int:
    """The most vectors one inverted list holds (at least 1): nprobe lists never hold more than nprobe x this."""
    return max(1, max((ivf.get_list_size(i) for i in range(ivf.nlist)), default=1))


def setting_label(probe: int, config: Config) -> str:
    return f"nprobe{probe},refine{config[0]}" + (f",tier{config[1]}" if config[1] else "")


class SettingRecall:
    """Per-query recall@10 of any (refine factor, tier exact factor) at an nprobe, from one search at the largest
    candidate count (`hit_positions` prices every refine factor; the tier re-scores the candidates once)."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, tier: faiss.Index | None, configs: list[Config]):
        self.index, self.vectors, self.tier, self.configs = index, vectors, tier, configs

    def at(self, checked: CheckQueries, probe: int, n: int) -> Callable[[Config], np.ndarray]:
        set_nprobe(self.index, probe)
        n = min(n, max(1, self.index.ntotal))  # more candidates than vectors is memory, never recall
        found = search_index(self.index, None, checked.queries, max(RECALL_K, n) + 1)[1]  # one more: its own
        found = without_own(found, checked.own)[:, : max(RECALL_K, n)]
        pos = tie_aware_positions(found, checked.truth, checked.queries, self.vectors)
        ranks: dict[int, np.ndarray] = {}

        def recall(config: Config) -> np.ndarray:
            factor, exact_factor = config
            hit = pos < RECALL_K * max(factor, 1)
            if exact_factor and self.tier is not None:
                c = min(RECALL_K * factor, found.shape[1])
                if not ranks:
                    prefixes = sorted({min(RECALL_K * f, found.shape[1]) for f, e in self.configs if e})
                    scores = tier_scores(self.index, self.tier, checked.queries, found)
                    ranks.update(zip(prefixes, tier_ranks(found, scores, pos, prefixes)))
                hit &= ranks[c] < RECALL_K * exact_factor
            none = (checked.truth.ids < 0).all(axis=1)  # nothing to find (an image query alone in its index): all found
            return np.where(none, 1.0, hit.sum(axis=1) / true_neighbours(checked.truth.ids))

        return recall


def family_bound(per_query: np.ndarray, tune: CheckQueries) -> float:
    """The lowest of the text-like groups' prediction bound and the other families' 3-sigma bounds (image
    queries' less 0.04: they must reach IMAGE_TARGET) over per-query recall of the tuning half."""
    spans = tune.spans
    bounds = [group_prediction_bound([per_query[a:b] for a, b in spans["text_like"]], tune.cosines)]
    bounds += [
        recall_lower_bound(per_query[a:b]) - FAMILY_MARGIN.get(name, 0.0)
        for name in ("in_distribution", "captions")
        for a, b in spans.get(name, [])
    ]
    return round(min(bounds), 4)


def tuning_bounds(
    recall: SettingRecall, tune: CheckQueries, probes: list[int], n_cand: int, longest: int, tuning: dict[str, float]
) -> Callable[[int, list[Config]], Callable[[Config], float]]:
    """`sweep`'s bound_of: each setting's `family_bound` on the tuning half, recorded in `tuning` under its label."""

    def bound_of(probe: int, live: list[Config]) -> Callable[[Config], float]:
        widest = RECALL_K * max(max(f for f, _ in live), 1)  # candidates the settings still worth pricing need
        recall_at = recall.at(tune, probe, min(n_cand, probe * longest, widest))
        exact: dict[int, float] = {}

        def bound(config: Config) -> float:
            factor, exact_factor = config
            if (
                exact_factor
                and exact.get(factor, 0.0) < TARGET_RECALL
                and (probe != probes[-1] or factor < max(exact, default=0))
            ):
                return 0.0  # the tier only loses recall against the exact re-rank of the same candidates: priced
                # where that reaches the target, or at the widest nprobe and factor (the best there is when nothing
                # does)
            value = family_bound(recall_at(config), tune)
            tuning[setting_label(probe, config)] = value
            if not exact_factor:
                exact[factor] = value
            return value

        return bound

    return bound_of
