"""What `index --update` must redo, and whether it may: one pass over meta.sqlite, unit by unit, compares each
indexed (id, path) with the unit's shard ids and with inputs.txt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clip_hpc.formats.emb_dir import EmbDir, EmbSummary
from clip_hpc.formats.metadata import MetadataStore

PAST_ANY_ID = 1 << 62  # an upper bound for "every id from here on"


@dataclass(frozen=True)
class ListingMismatch:
    """The first indexed id whose image inputs.txt no longer names (`listed` is None past its end)."""

    id: int
    indexed: str
    listed: str | None


@dataclass(frozen=True)
class Drift:
    """The units whose shard no longer holds exactly the ids the index holds in their range, the indexed ids no
    shard holds any more, and the first listing mismatch (then the other two are not worked out)."""

    changed: list[int] = field(default_factory=list)
    stale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mismatch: ListingMismatch | None = None


def first_other_path(rows: Sequence[tuple[int, str]], names: Sequence[str]) -> ListingMismatch | None:
    """The first (id, path) where the path is not `names[id]` (None past its end): an id is a line number of
    inputs.txt, so this tells whether the listing still gives the indexed images their ids."""
    for id, path in rows:
        listed = names[id] if id < len(names) else None
        if path != listed:
            return ListingMismatch(id, path, listed)
    return None


def drifted_units(emb: EmbDir, summary: EmbSummary, known: MetadataStore, names: Sequence[str]) -> Drift:
    """Per unit, one primary-key range scan of (id, path) against inputs.txt (`names`) and the shard's ids.
    Comparing counts missed a unit re-embedded with as many images but other ones (one fixed, another broken
    since): the fixed image was never indexed, the broken one kept its old vector. Ids past the last unit's range
    are past the listing: the first of them, if any, is a mismatch."""
    changed, stale = [], []
    for entry in summary.shards:
        lo = entry.unit * summary.unit_size
        rows = known.id_paths_between(lo, lo + summary.unit_size)
        if (mismatch := first_other_path(rows, names)) is not None:
            return Drift(mismatch=mismatch)
        indexed = np.fromiter((id for id, _ in rows), dtype=np.int64, count=len(rows))
        ids = emb.shard_ids(entry.unit)
        if not np.array_equal(indexed, ids):
            changed.append(entry.unit)
            stale.append(np.setdiff1d(indexed, ids))
    end = max((e.unit + 1) * summary.unit_size for e in summary.shards) if summary.shards else 0
    if past := known.ids_between(end, PAST_ANY_ID):
        return Drift(mismatch=ListingMismatch(past[0], known.path_of(past[0]) or "", None))
    return Drift(changed, np.concatenate(stale) if stale else np.zeros(0, np.int64))
