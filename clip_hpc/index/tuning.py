"""Tuning nprobe and the refine factor (index/selfcheck.py): the statistical bounds recall is held to, and the
sweep over nprobe that picks the cheapest setting reaching the target."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TARGET_RECALL = 0.95
IMAGE_TARGET = 0.99  # image queries (in-distribution, new images of the indexed kind): cheap to hold, and a
# search by example is expected to be near exact; their bound counts against this, text-like ones against 0.95
PREDICTION_Z = 2.0  # t(0.95, 7 d.f.)·√(1 + 1/8): a one-sided 95% prediction bound for a 9th group of 8
FALLBACK_SLACK = 0.005
T95 = (
    math.inf,
    6.314,
    2.920,
    2.353,
    2.132,
    2.015,
    1.943,
    1.895,
    1.860,
    1.833,
    1.812,
    1.796,
    1.782,
    1.771,
    1.761,
    1.753,
)
# one-sided t(0.95, d.f.); past 15 d.f. the 15's value, a little above the true quantile


def recall_lower_bound(per_query: np.ndarray) -> float:
    """Mean minus three standard errors: for i.i.d. queries (indexed vectors), tuning on this keeps fresh ones
    above the target, not just the sample that was measured."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - 3 * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def recall_prediction_bound(
    group_means: np.ndarray, z: float = PREDICTION_Z, cosines: Any = None, sampling_var: float = 0.0
) -> float:
    """Mean minus z standard deviations of the group means: what a fresh group (another gap direction, other
    queries) stays above 95% of the time; the spread between directions, not the number of queries, limits it.
    With each group's target `cosines` (the schedule 0.45..0.25 is a designed factor that users' queries average
    over, not a draw), a one-way random-effects bound instead: the spread between groups at the same cosine (or,
    with no cosine repeated, around a straight line in it), less `sampling_var` (what a group mean varies by from
    its few sampled queries alone, which a user's whole query stream does not), is the directions' own; a fresh
    direction's recall over the schedule is bounded by Student's t (46k real CLIP vectors: the raw spread asked
    for efSearch 1024 where held-out queries held 0.985 at 512; 1M hard mixture: refine x5000 bounded 0.945)."""
    means = np.asarray(group_means, dtype=np.float64)
    n = len(means)
    if n < 2:
        return float(means.mean()) if n else 0.0
    c = None if cosines is None else np.asarray(cosines, dtype=np.float64)
    if c is None or len(c) != n or n < 4 or np.ptp(c) == 0:
        return float(means.mean() - z * means.std(ddof=1))
    levels, level_of = np.unique(c, return_inverse=True)
    if n - len(levels) >= 2:  # each cosine's own mean: the trend over the cosine need not be straight
        residual, df = means - (np.bincount(level_of, means) / np.bincount(level_of))[level_of], n - len(levels)
    else:
        design = np.stack([np.ones(n), c], axis=1)
        residual, df = means - design @ np.linalg.lstsq(design, means, rcond=None)[0], n - 2
    spread2 = float((residual**2).sum() / df)
    direction2 = max(0.0, spread2 - sampling_var)
    return float(means.mean() - T95[min(df, len(T95) - 1)] * np.sqrt(direction2 + spread2 / n))


def group_prediction_bound(groups: list[np.ndarray], cosines: Any) -> float:
    """`recall_prediction_bound` of groups of per-query recalls: their means, at their cosines, less the variance
    their means have from the queries sampled (each group's per-query variance over its size)."""
    noise = float(np.mean([g.var(ddof=1) / len(g) if len(g) > 1 else 0.0 for g in groups])) if groups else 0.0
    return recall_prediction_bound(np.array([g.mean() for g in groups]), cosines=cosines, sampling_var=noise)


@dataclass
class Sweep:
    """What tuning tried: (nprobe, factor) -> the bound it reached, the pair chosen, and whether time ran out."""

    bounds: dict[tuple[int, Any], float] = field(default_factory=dict)
    best: tuple[int, Any] | None = None
    budget_hit: bool = False
    probes: list[int] = field(default_factory=list)


def sweep(
    bound_of: Callable[[int, list[Any]], Callable[[Any], float]],
    probes: list[int],
    factors: list[Any],
    cost: Callable[[int, Any], float],
    deadline: float,
    target: float = TARGET_RECALL,
    slack: float = 1.0,
) -> Sweep:
    """nprobe from small to large, every factor still cheaper than the best pair priced from one search each
    (`bound_of(probe, live)(factor)`); the cheapest pair reaching `target` wins; stops once a wider nprobe alone
    costs more than that pair, or at `deadline` (perf_counter seconds) after at least one nprobe, saying so (and
    then, if nothing reached the target yet, prices the widest nprobe before it stops).
    None reaching it: the cheapest within FALLBACK_SLACK of the best bound (the tier at a hair's less recall
    than re-reading 50,000 rows, on data where nothing reaches the target). With `slack` > 1, settings up to
    `slack` x the best pair's cost are priced too (the measured time, not this cost, chooses among them)."""
    out = Sweep()
    queue = list(probes)
    while queue:
        probe = queue.pop(0)
        live = [f for f in factors if out.best is None or cost(probe, f) < slack * cost(*out.best)]
        if not live:
            break
        if out.probes and time.perf_counter() > deadline and not out.budget_hit:
            out.budget_hit = True  # out of time: the widest nprobe still, when nothing reached the target
            queue = [probes[-1]] if out.best is None and probes[-1] != probe else []
            if not queue:
                break
            probe = queue.pop(0)
        bound = bound_of(probe, live)
        out.probes.append(probe)
        for factor in live:
            out.bounds[(probe, factor)] = value = bound(factor)
            if value >= target and (out.best is None or cost(probe, factor) < cost(*out.best)):
                out.best = (probe, factor)
    if out.best is None:  # the cheapest of those within FALLBACK_SLACK of the best bound
        top = max(out.bounds.values())
        out.best = min((pf for pf, b in out.bounds.items() if b >= top - FALLBACK_SLACK), key=lambda pf: cost(*pf))
    return out


def probe_ladder(nlist: int) -> list[int]:
    """1, 2, 4, ... up to every list."""
    ladder = [1 << i for i in range(max(1, nlist).bit_length()) if (1 << i) < nlist]
    return ladder + [nlist]


KEEP_PENALTY = 1e30  # added to the cost of a pair `sweep_keeping` must not choose while another reaches the target


def sweep_keeping(
    bound_of: Callable[[int, list[Any]], Callable[[Any], float]],
    probes: list[int],
    factors: list[Any],
    cost: Callable[[int, Any], float],
    deadline_s: float,
    keep: Callable[[Any], bool] | None = None,
    slack: float = 1.0,
) -> tuple[Sweep, bool]:
    """`sweep`, and whether its choice satisfies `keep` by itself. With `keep` (an explicit `--rerank-tier on`) and a
    cheapest pair without it, a second sweep in which the other pairs cost KEEP_PENALTY more chooses the cheapest
    pair with it (the others are still priced: the tier's bounds are held against the exact re-rank's)."""
    tuned = sweep(bound_of, probes, factors, cost, deadline=time.perf_counter() + deadline_s, slack=slack)
    assert tuned.best is not None  # sweep always chooses a pair
    if keep is None or keep(tuned.best[1]) or not any(keep(f) for f in factors):
        return tuned, True

    def kept_cost(probe: int, factor: Any) -> float:
        return cost(probe, factor) + (0.0 if keep(factor) else KEEP_PENALTY)

    kept = sweep(bound_of, probes, factors, kept_cost, deadline=time.perf_counter() + deadline_s, slack=slack)
    kept.budget_hit = kept.budget_hit or tuned.budget_hit
    return kept, False
