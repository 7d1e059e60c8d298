"""What `index --update` must redo: the units whose shard no longer holds exactly the ids the index holds."""

from __future__ import annotations

import numpy as np

from clip_hpc.formats.emb_dir import EmbDir, EmbSummary
from clip_hpc.formats.metadata import MetadataStore


def drifted_units(emb: EmbDir, summary: EmbSummary, known: MetadataStore) -> tuple[list[int], np.ndarray]:
    """The units whose embedded ids are not exactly those the index holds in their range, and the indexed ids that
    no shard holds any more. Comparing counts missed a unit re-embedded with as many images but other ones (one
    fixed, another broken since): the fixed image was never indexed, the broken one kept its old vector. One
    primary-key range scan per unit, beside the shard ids `check_set` has already read."""
    changed, stale = [], []
    for entry in summary.shards:
        lo = entry.unit * summary.unit_size
        indexed = np.asarray(known.ids_between(lo, lo + summary.unit_size), dtype=np.int64)
        ids = emb.shard_ids(entry.unit)
        if not np.array_equal(indexed, ids):
            changed.append(entry.unit)
            stale.append(np.setdiff1d(indexed, ids))
    return changed, np.concatenate(stale) if stale else np.zeros(0, np.int64)
