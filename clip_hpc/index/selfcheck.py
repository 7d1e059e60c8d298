"""The recall self-check of an index: recall@10 of the served configuration against exact inner-product search,
for indexed vectors used as queries, for text-like ones (clip_hpc.ann.text_queries: CLIP's "modality gap" puts a
text query at cosine ~0.25-0.45 from its best image) and for real captions through the index's own model, and
the nprobe / refine-factor tuning built on it. Tuning and reporting use disjoint halves of every query family.

The gap's direction is unknown when the index is built, and recall depends on it (at 1M synthetic vectors, one
direction gave 0.98 and another 0.94 with the same nprobe), so the off-distribution queries come in groups, each
with its own direction and noise, and tuning holds a *fresh* group, not the mean, above the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.core import set_nprobe
from clip_hpc.ann.graph import EF_LADDER, graph_of
from clip_hpc.ann.ground_truth import RECALL_K
from clip_hpc.ann.text_queries import caption_queries
from clip_hpc.ann.tier import EXACT_FACTORS, TierScorer
from clip_hpc.index.candidates import Replacement, fine_candidate, graph_candidate
from clip_hpc.index.check_queries import CheckQueries, check_queries
from clip_hpc.index.recall_report import FamilyFigures, RecallReport
from clip_hpc.index.setting_recall import Config, SettingRecall, longest_list, setting_label, tuning_bounds
from clip_hpc.index.timed_choice import (
    EXACT_LABEL,
    Setting,
    TimedChoice,
    frontier,
    measure,
    served_runner,
    timing_queries,
)
from clip_hpc.index.tuning import (
    TARGET_RECALL,
    Sweep,
    probe_ladder,
    sweep_keeping,
)

RECALL_QUERIES = 800  # indexed vectors sampled: half tune, half report (each also the base of text-like groups)
REFINE_FACTORS = (10, 25, 50, 100, 200, 500, 1000, 2000, 3000, 5000)  # candidates per result re-ranked exactly (1 KiB
# rows at d=512). Past 200 only for data where the 32-byte code ranks text-like queries badly (many small clusters:
# at 300k, nprobe all, x200 gave 0.887, x500 0.955, x1000 0.980): recall first, at the latency bench_index shows.
RERANK_BYTE_COST = 7  # a re-ranked float16 row costs ~7x its bytes in scanned 8-bit PQ codes (2 cores, d=512)
TIER_BYTE_COST = 1.5  # a tier code byte re-scored in RAM (SQ4 via IndexRefine), in scanned 8-bit code bytes
FAST_SCAN_BYTE_COST = 0.25  # a fast-scan 4-bit code byte costs a quarter of an 8-bit one (1M: 10 ms vs 39 a query)
SWEEP_BUDGET_MIN_S = 60.0  # the nprobe sweep stops after max(this, SWEEP_BUDGET_SHARE x the rest of the build)
SWEEP_BUDGET_SHARE = 0.5
SWEEP_COST_SLACK = 2.0  # settings up to this many times the modelled cost of the best are priced, then timed
SELF_CHECK_SALT = 0x5E1F_C4EC  # default_rng(seed + 1) drew offsets equal to the synthetic data's cluster centres


def serving_cost(
    nprobe: int,
    factor: int,
    *,
    list_size: float,
    code_size: float,
    dim: int,
    tier_bytes: int = 0,
    exact_factor: int = 0,
) -> float:
    """Bytes one query touches, weighted: the codes of `nprobe` inverted lists, then either the re-ranked float16
    rows of every candidate, or the tier's codes of every candidate and the float16 rows of its best."""
    rows = exact_factor if tier_bytes and exact_factor else factor
    tier = TIER_BYTE_COST * factor * RECALL_K * tier_bytes if tier_bytes and exact_factor else 0.0
    return nprobe * list_size * code_size + tier + RERANK_BYTE_COST * rows * RECALL_K * dim * 2


@dataclass
class _Costs:
    """What a (nprobe, config) costs to serve, in scanned 8-bit code bytes (`serving_cost`), and the most candidates
    nprobe lists can hold (nprobe x the longest list)."""

    ivf: Any
    dim: int
    tier_bytes: int
    longest: int
    scan: float

    @classmethod
    def of(cls, index: faiss.Index, dim: int, tier_bytes: int, n_cand: int) -> _Costs:
        ivf = faiss.try_extract_index_ivf(index)
        longest = longest_list(ivf) if ivf is not None else n_cand
        fast = ivf is not None and "FastScan" in type(faiss.downcast_index(ivf)).__name__
        return cls(ivf, dim, tier_bytes, longest, FAST_SCAN_BYTE_COST if fast else 1.0)

    def __call__(self, probe: int, config: Config) -> float:
        return serving_cost(
            probe,
            config[0],
            list_size=0.0 if self.ivf is None else self.ivf.ntotal / self.ivf.nlist,
            code_size=0.0 if self.ivf is None else self.ivf.code_size * self.scan,
            dim=self.dim,
            tier_bytes=self.tier_bytes,
            exact_factor=config[1],
        )


def _served_figures(
    served_recall: Callable[[Config], np.ndarray], checked: CheckQueries, config: Config
) -> dict[str, FamilyFigures]:
    """The reporting half's recall, refine (at `config`) and no_refine, per family; the text-like
    family as off_distribution with its worst direction and its mean by target cosine."""
    cosines, report = checked.cosines, dict[str, FamilyFigures]()
    for name, each in (("refine", config), ("no_refine", (0, 0))):
        recall = served_recall(each)
        for family, spans in checked.spans.items():
            key = "off_distribution" if family == "text_like" else family
            means = np.array([recall[a:b].mean() for a, b in spans])
            report.setdefault(key, {})[name] = round(float(recall[spans[0][0] : spans[-1][1]].mean()), 4)
            if family == "text_like":
                report[key][f"{name}_worst_direction"] = round(float(means.min()), 4)
                report[key][f"{name}_by_cosine"] = {
                    f"{c:.2f}": round(float(np.mean([m for m, cc in zip(means, cosines) if cc == c])), 4)
                    for c in sorted(set(cosines), reverse=True)
                }
    return report


def _timed_setting(
    index: faiss.Index,
    vectors: np.ndarray,
    tier: faiss.Index | None,
    tuned: Sweep,
    cost: _Costs,
    queries: np.ndarray,
    exact_allowed: bool,
    keep: Callable[[Config], bool] | None = None,
    others: tuple[Replacement, ...] = (),
) -> tuple[TimedChoice | None, Setting | None, Replacement | None]:
    """The settings that hold the bound (the sweep's fallback when none does), timed beside exact search and the
    `others` (indexes of the same rows at their own setting): the fastest setting, and what to serve instead of
    the index built where exact search (the flat index, no setting) or another index won. A Flat index has one
    setting, nothing to time."""
    assert tuned.best is not None  # sweep always chooses a pair
    if cost.ivf is None:
        return None, tuned.best, None
    meeting = [s for s, b in tuned.bounds.items() if b >= TARGET_RECALL and (keep is None or keep(s[1]))]
    meeting = meeting or [tuned.best]  # the sweep's own choice (with `keep`, one that keeps the tier)
    by_label = {setting_label(p, c): (p, c) for p, c in frontier(meeting, cost)}
    tiered = tier is not None and any(c[1] for _, c in by_label.values())
    refined = TierScorer.of_index(tier) if tiered else None  # as the engine serves it
    approximate = {
        label: (served_runner(index, vectors, refined, *s, RECALL_K), tuned.bounds[s]) for label, s in by_label.items()
    }
    for other in others:
        approximate[other.label] = (served_runner(other.index, vectors, None, *other.setting, RECALL_K), other.bound)
    choice, flat = measure(
        approximate, vectors, timing_queries(queries), n_total=index.ntotal, k=RECALL_K, exact_allowed=exact_allowed
    )
    if choice.exact_wins:
        return choice, None, Replacement(EXACT_LABEL, flat, 1, 0, 1.0, "Flat")
    for other in others:
        if choice.chosen == other.label:
            return choice, other.setting, other
    return choice, by_label[choice.chosen], None


def _exact_bound(flat: faiss.Index, vectors: np.ndarray, tune: CheckQueries) -> tuple[SettingRecall, float]:
    """The exact scan's recall and its bound on the tuning half, as any setting's (1, but for what ties leave)."""
    recall, recorded = SettingRecall(flat, vectors, None, [(0, 0)]), dict[str, float]()
    bound = tuning_bounds(recall, tune, [1], RECALL_K, RECALL_K, recorded)(1, [(0, 0)])((0, 0))
    return recall, bound


def self_check(
    index: faiss.Index,
    vectors: np.ndarray,
    query_ids: np.ndarray,
    *,
    refine_factor: int | None,
    refine: bool,
    nprobe: int | None,
    seed: int = 0,
    model: str | None = None,
    pretrained: str | None = None,
    budget_s: float | None = None,
    tier: faiss.Index | None = None,
    exact_allowed: bool = False,
    keep_tier: bool = False,
    graph_allowed: bool = False,
    fine_allowed: bool = False,
) -> RecallReport:
    """Recall@10 of the served configuration against exact search, for three query families: indexed vectors,
    synthetic text-like groups (one gap direction each, cosine to their image 0.45 down to 0.25) and the built-in
    captions through the index's own text tower (when its weights load here). Half of every family tunes nprobe
    and the refine factor jointly (the settings whose 3-sigma bounds, and for the gap groups the prediction
    bound of a fresh group, all reach TARGET_RECALL); the fastest by measured time wins (index/timed_choice.py),
    or exact search (`exact_allowed`), an HNSW graph (`graph_allowed`) or IVF-SQ8 in the same lists (`fine_allowed`)
    that is faster (`replacement`); the other half, never seen by tuning, gives the figures. The exact top 10 is
    searched once for both halves; each nprobe is one search at the largest candidate count, which prices every
    refine factor (`hit_positions`); the sweep stops after `budget_s` and says so. `keep_tier` (an explicit
    --rerank-tier on) serves with the tier even where it does not pay, and says so (`tier_pays`)."""
    started = time.perf_counter()
    rng = np.random.default_rng([seed, SELF_CHECK_SALT])  # a stream of its own: never the one data came from
    text = caption_queries(model, pretrained, int(vectors.shape[1])) if model else None
    tune, served = check_queries(vectors, query_ids, rng, text.vectors if text is not None else None)
    truth_s = time.perf_counter() - started
    f1s = [refine_factor] if refine and refine_factor else list(REFINE_FACTORS) if refine else [0]
    tiered = tier is not None and refine
    configs = [(f, 0) for f in f1s] + ([(f, e) for f in f1s for e in EXACT_FACTORS if e < f] if tiered else [])
    n_cand = int(min(max(1, index.ntotal), RECALL_K * max(max(f1s), 1)))
    tier_bytes = int(tier.sa_code_size()) if tier is not None and tiered else 0
    cost, tuning = _Costs.of(index, int(vectors.shape[1]), tier_bytes, n_cand), dict[str, float]()
    recall, probes = SettingRecall(index, vectors, tier, configs), _search_widths(index, cost, nprobe)
    bound_of = tuning_bounds(recall, tune, probes, n_cand, cost.longest, tuning)
    with_tier = (lambda config: bool(config[1])) if keep_tier and tiered else None
    budget = budget_s if budget_s is not None else math.inf
    tuned, pays = sweep_keeping(bound_of, probes, configs, cost, budget, keep=with_tier, slack=SWEEP_COST_SLACK)
    others = _other_indexes(index, vectors, tune, tuning, cost, graph_allowed, fine_allowed)  # graph, IVF-SQ8
    choice, setting, won = _timed_setting(
        index, vectors, tier if tiered else None, tuned, cost, tune.queries, exact_allowed, with_tier, others
    )
    recall, label = _measured(recall, won, vectors, tune, tuning)
    nprobe, (factor, exact_factor) = setting or (1, (0, 0))
    shown_factor = factor or refine_factor or REFINE_FACTORS[0]  # refine numbers are shown even when it is off
    report = RecallReport(
        k=RECALL_K,
        target=TARGET_RECALL,
        nprobe=nprobe,
        refine_factor=shown_factor,
        tier_exact_factor=exact_factor or None,
        tier_code_bytes=(tier_bytes or None) if won is None else None,
        tuning_queries=int(len(tune.queries)),
        queries=int(len(served.queries)),
        off_directions=len(served.spans["text_like"]),
        text_like_cosines=list(served.cosines),
        captions_source=text.source if text is not None else "none",
        tuning_lower_bounds=tuning,
        probes_swept=tuned.probes,
        sweep_budget_s=None if budget_s is None else round(budget_s, 1),
        sweep_budget_hit=tuned.budget_hit,
        ground_truth_s=round(truth_s, 3),
        captions_fallback=text.reason if text is not None and text.reason else None,
        timing=None if choice is None else choice.to_dict(),
        replacement=None if won is None else won.index,
        replacement_key=None if won is None else won.key,
        replacement_refines=won is not None and won.factor > 0,
        tier_pays=None if with_tier is None else pays,
    )
    bound = tuning[label or setting_label(nprobe, (factor, exact_factor))]
    wide = RECALL_K * max(factor if won is not None else shown_factor, 1)  # a graph's k sets its width
    _add_served_figures(report, recall.at(served, nprobe, wide), served, bool(factor), bound)
    set_nprobe(index if won is None else won.index, nprobe)
    return report


def _search_widths(index: faiss.Index, cost: _Costs, nprobe: int | None) -> list[int]:
    """The widths the sweep prices: `nprobe` when given, else every nprobe's ladder (IVF) or efSearch's (a graph);
    a flat scan has none."""
    ladder = probe_ladder(cost.ivf.nlist) if cost.ivf is not None else list(EF_LADDER) if graph_of(index) else [1]
    return [int(nprobe)] if nprobe and len(ladder) > 1 else ladder


def _other_indexes(
    index: faiss.Index,
    vectors: np.ndarray,
    tune: CheckQueries,
    tuning: dict[str, float],
    cost: _Costs,
    graph_allowed: bool,
    fine_allowed: bool,
) -> tuple[Replacement, ...]:
    """The indexes of the same rows allowed beside an IVF index, each at its cheapest setting that reaches the
    target (none where no setting does)."""
    if cost.ivf is None:
        return ()
    found = (
        graph_candidate(vectors, tune, tuning) if graph_allowed else None,
        fine_candidate(index, vectors, tune, tuning) if fine_allowed else None,
    )
    return tuple(other for other in found if other is not None)


def _measured(
    recall: SettingRecall, won: Replacement | None, vectors: np.ndarray, tune: CheckQueries, tuning: dict[str, float]
) -> tuple[SettingRecall, str | None]:
    """What the figures measure, and the label of its bound: the index built (None: its setting's), or the exact
    scan or the other index that won the clock."""
    if won is None:
        return recall, None
    if won.label == EXACT_LABEL:
        recall, tuning[EXACT_LABEL] = _exact_bound(won.index, vectors, tune)
        return recall, EXACT_LABEL
    return SettingRecall(won.index, vectors, None, [won.setting[1]]), won.label


def _add_served_figures(
    report: RecallReport,
    served_recall: Callable[[Config], np.ndarray],
    served: CheckQueries,
    refined: bool,
    bound: float,
) -> None:
    """The reporting half's figures per family at the served setting (`refined`: re-ranked), the lowest of them
    as `served`, and whether it and the tuning half's `bound` both reach the target."""
    report.families = _served_figures(served_recall, served, (report.refine_factor, report.tier_exact_factor or 0))
    label = "refine" if refined else "no_refine"
    report.served = round(min(figures[label] for figures in report.families.values()), 4)
    report.served_bound = bound
    report.target_met = bound >= TARGET_RECALL and report.served >= TARGET_RECALL
