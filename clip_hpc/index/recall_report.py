"""The self-check's result (index/selfcheck.py) as a typed record: what the build reads back from it (nprobe, the
refine factor, the tier's exact factor) and `to_dict`, index.json's `recall` with its keys in their order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FamilyFigures = dict[str, Any]  # refine / no_refine recall; off_distribution adds *_worst_direction, *_by_cosine


@dataclass
class RecallReport:
    """Recall@k of the served configuration, how tuning reached it, and the per-family figures of the half of the
    queries that tuning never saw."""

    k: int
    target: float
    nprobe: int
    refine_factor: int
    tier_exact_factor: int | None
    tier_code_bytes: int | None
    tuning_queries: int
    queries: int
    off_directions: int
    text_like_cosines: list[float]
    captions_source: str
    tuning_lower_bounds: dict[str, float]
    probes_swept: list[int]
    sweep_budget_s: float | None
    sweep_budget_hit: bool
    ground_truth_s: float
    captions_fallback: str | None = None  # why the captions could not be encoded here, when they could not
    timing: dict[str, Any] | None = None  # the measured times the setting was chosen by (index/timed_choice.py)
    tier_pays: bool | None = None  # --rerank-tier on only: whether the self-check would have chosen the tier too
    families: dict[str, FamilyFigures] = field(default_factory=dict)  # in_distribution, off_distribution, captions
    served: float = 0.0
    served_bound: float = 0.0
    target_met: bool = False
    replacement: Any = field(default=None, repr=False, compare=False)  # the exact scan or the graph, when it won
    replacement_key: str | None = None  # its factory key ("Flat", "HNSW32,Flat", "IVF512,SQ8"): index.json's then
    replacement_refines: bool = False  # it is served with the re-rank from the float16 rows (`refine_factor`)

    def to_dict(self) -> dict[str, Any]:
        """The `recall` of index.json: the fields in order, captions_fallback only when set, the families inline."""
        out: dict[str, Any] = {
            "k": self.k,
            "target": self.target,
            "nprobe": self.nprobe,
            "refine_factor": self.refine_factor,
            "tier_exact_factor": self.tier_exact_factor,
            "tier_code_bytes": self.tier_code_bytes,
            "tuning_queries": self.tuning_queries,
            "queries": self.queries,
            "off_directions": self.off_directions,
            "text_like_cosines": self.text_like_cosines,
            "captions_source": self.captions_source,
            "tuning_lower_bounds": self.tuning_lower_bounds,
            "probes_swept": self.probes_swept,
            "sweep_budget_s": self.sweep_budget_s,
            "sweep_budget_hit": self.sweep_budget_hit,
            "ground_truth_s": self.ground_truth_s,
        }
        if self.captions_fallback:
            out["captions_fallback"] = self.captions_fallback
        if self.timing is not None:
            out["timing"] = self.timing
        if self.tier_pays is not None:
            out["tier_pays"] = self.tier_pays
        out.update(self.families)
        out.update(served=self.served, served_bound=self.served_bound, target_met=self.target_met)
        return out
