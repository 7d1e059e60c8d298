"""`clip-hpc index --update`: add the ids an EMB_DIR gained since INDEX_DIR was built (`embed --append`) to its
trained index, without retraining; the new INDEX_DIR replaces the old one whole, as a build does.

An id is a line number of inputs.txt, so an update is only sound when the EMB_DIR's listing still gives every
indexed image its id: a fresh `embed` of a grown folder sorts new files in between old ones, and adding "the ids
past the old end" would then index some images twice and others never. `_refuse_other_listing` refuses that.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import faiss
import numpy as np

from clip_hpc.ann.graph import build_graph, graph_of
from clip_hpc.cluster.collective import from_root
from clip_hpc.cluster.world import World
from clip_hpc.errors import UserError, full_disk_is_a_user_error
from clip_hpc.formats.caption_view import emb_view
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.index_dir import IndexDir, IndexInfo
from clip_hpc.formats.tier_codes import copy_codes
from clip_hpc.index.build import job_world
from clip_hpc.index.drift import ListingMismatch, drifted_units
from clip_hpc.index.ranks import lists_to_disk
from clip_hpc.index.rerank_tier import start_codes
from clip_hpc.index.selfcheck import RECALL_QUERIES
from clip_hpc.index.stages import add, checked_set, finish, n_rows, now, unit_counts, write_vectors


def _refuse_other_listing(mismatch: ListingMismatch | None, emb: EmbDir, out: Path) -> None:
    """Refuse (UserError, nothing written) an EMB_DIR whose inputs.txt no longer gives an indexed id its image."""
    if mismatch is not None:
        raise UserError(
            f"{emb.root} lists other images under the ids {out} indexes (id {mismatch.id} is {mismatch.indexed!r} "
            f"in the index, {mismatch.listed!r} in inputs.txt): only `clip-hpc embed --append` keeps ids; build a "
            "new index"
        )


def _carry_tier(current: IndexDir, tmp: IndexDir, n_rows: int) -> None:
    """`--update` of an index with a re-rank tier: the trained tier and the old rows, the new rows to come."""
    if current.has_tier():
        shutil.copy2(current.tier_path, tmp.tier_path)
        start_codes(faiss.read_index(str(current.tier_path)), tmp.tier_codes_path, n_rows)
        copy_codes(current.tier_codes_path, tmp.tier_codes_path)


def update_index(
    emb_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    nprobe: int | None = None,
    refine: bool | None = None,
    progress: bool = True,
    world: World | None = None,
    vectors: str | None = None,
) -> IndexInfo:
    """Add the ids of EMB_DIR not yet in INDEX_DIR (new units, or a last unit that `embed --append` refilled) to
    its trained index, without retraining; the new INDEX_DIR replaces the old one whole. Rank 0 does it all (the
    adds are a fraction of a build); every rank returns index.json. `vectors`, when given, must be what the index
    holds (images or captions): an update adds the same kind."""
    world = job_world(world)
    with full_disk_is_a_user_error(out, "clip-hpc index"):  # the temporary directory is gone by then
        return IndexInfo.from_dict(
            from_root(
                world,
                lambda: _update(
                    emb_dir, Path(out), nprobe=nprobe, refine=refine, progress=progress, vectors=vectors
                ).to_dict(),
            )
        )


def _update(
    emb_dir: str | os.PathLike,
    out: Path,
    *,
    nprobe: int | None,
    refine: bool | None,
    progress: bool,
    vectors: str | None = None,
) -> IndexInfo:
    started = time.perf_counter()
    current = IndexDir(out)
    info = current.check_integrity()
    if vectors is not None and vectors != info.vectors:
        raise UserError(
            f"{out} indexes the {info.vectors} embeddings; --update adds the same kind, not --vectors {vectors}: "
            f"leave --vectors out, or build a new index of the {vectors} embeddings"
        )
    emb = emb_view(emb_dir, info.vectors)
    summary = checked_set(emb)
    if (summary.model, summary.pretrained, int(summary.dim or 0)) != (info.model, info.pretrained, info.dim):
        raise UserError(
            f"{emb_dir} holds {summary.model}/{summary.pretrained} {summary.dim}-d vectors, "
            f"{out} indexes {info.model}/{info.pretrained} {info.dim}-d; build a new index"
        )
    counts = unit_counts(summary.shards)
    with current.open_metadata() as known:
        drift = drifted_units(emb, summary, known, emb.read_inputs())
    _refuse_other_listing(drift.mismatch, emb, out)
    changed, stale = drift.changed, drift.stale
    if not changed:
        return info
    if refine is not None:
        info.refine = bool(refine)
    timings: dict[str, float] = {}
    with IndexDir.build_beside(out) as tmp:
        tmp.copy_metadata_from(current)
        start = time.perf_counter()
        info.n_rows = max(int(info.n_rows), n_rows(summary))
        with tmp.open_metadata(readonly=False) as meta, current.open_metadata() as known:
            write_vectors(
                tmp, emb, changed, info.n_rows, info.dim, meta, progress, old=current, known=known, removed=stale
            )
            timings["vectors_s"] = round(time.perf_counter() - start, 3)
            index = current.open_index(writable=True)
            n_before = int(index.ntotal) - len(stale)
            if len(stale):  # indexed before, failed in the unit's new shard: its old vector must not be found
                meta.remove(stale)
            _carry_tier(current, tmp, info.n_rows)
            if graph_of(index) is not None:  # a graph cannot drop a node: built anew from the rows just written
                index = build_graph(tmp.open_vectors())  # (stale rows zeroed, so left out; seconds at GRAPH_MAX)
            else:
                if len(stale):
                    index.remove_ids(faiss.IDSelectorBatch(stale))
                index = add(index, emb, changed, progress, timings, known=known, tier_dir=tmp)
            timings["train_s"] = 0
        if info.lists == "disk":  # they were read into memory to add to them: back out to disk
            index = lists_to_disk(index, tmp.ivfdata_path)
        info.unit_counts = counts
        info.updates = info.updates + [
            {
                "units": sorted(changed),
                "added": int(index.ntotal) - n_before,
                "removed": len(stale),
                "timings": timings,
                "at": now(),
            }
        ]
        query_ids = emb.sample_ids(summary.shards, RECALL_QUERIES, np.random.default_rng(info.seed))
        return finish(tmp, out, index, info, query_ids, nprobe or info.nprobe, timings, started)
