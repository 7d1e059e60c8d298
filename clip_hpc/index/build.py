"""Building an INDEX_DIR from an EMB_DIR: choose the index, train on a sample, stream the adds, measure recall.

Nothing is held whole in RAM: shards stream one at a time into `vectors.npy` (a memory map), the training set is
a random sample, and the adds go in batches. Everything is written into a temporary directory renamed at the end,
so an INDEX_DIR is either absent, the old one, or the new one, never half of either.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from clip_hpc.cluster.collective import from_root, on_every_rank
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.cluster.world import World
from clip_hpc.cluster.world import world as current_world
from clip_hpc.errors import UserError, full_disk_is_a_user_error
from clip_hpc.formats.caption_view import emb_view
from clip_hpc.formats.emb_dir import EmbDir, EmbSummary, ShardEntry
from clip_hpc.formats.index_dir import ROW_LAYOUT, IndexDir, IndexInfo
from clip_hpc.formats.metadata import MetadataStore
from clip_hpc.formats.shard import Shard
from clip_hpc.index.choose import (
    ADD_BATCH,
    KMEANS_ITERATIONS,
    OPQ_ITERATIONS,
    OPQ_TRAIN_POINTS,
    PQ_TRAIN_PER_CENTROID,
    choose_index_key,
    choose_train_size,
    is_fast_scan,
    ivf_lists,
)
from clip_hpc.index.defaults import TRAIN_PER_LIST
from clip_hpc.index.gpu_train import pretrain_coarse_quantizer
from clip_hpc.index.ranks import choose_lists, deserialize, merge_in_memory, merge_on_disk, my_units, serialize
from clip_hpc.index.rerank_tier import TIER_KEY, encode_into, load_tier, start_codes, train_tier, wants_tier
from clip_hpc.index.selfcheck import RECALL_QUERIES, SWEEP_BUDGET_MIN_S, SWEEP_BUDGET_SHARE, self_check
from clip_hpc.ingest.tars import meta_key_url


# --- FAISS objects ---------------------------------------------------------------------------------------------
def make_index(index_key: str, dim: int) -> faiss.Index:
    """The factory index, inner product, wrapped in an IDMap when it cannot take ids itself (Flat, HNSW, ...)."""
    try:
        index = faiss.index_factory(dim, index_key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:160]
        raise UserError(
            f"--index-key {index_key!r} is not a valid FAISS factory string for dim {dim} ({reason})"
        ) from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)
    elif ivf is not None:
        ivf.cp.min_points_per_centroid = TRAIN_PER_LIST  # k-means warns below 39·K points otherwise
        ivf.cp.niter = KMEANS_ITERATIONS
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.max_points_per_centroid = (
                PQ_TRAIN_PER_CENTROID  # 4x fewer residuals for the codebooks (recall not yet compared with the default)
            )
        _limit_opq_training(index)
    return index


def _limit_opq_training(index: faiss.Index) -> None:
    """Fewer iterations and points for an OPQ rotation in the chain (see OPQ_ITERATIONS)."""
    if not isinstance(index, faiss.IndexPreTransform):
        return
    for i in range(index.chain.size()):
        transform = faiss.downcast_VectorTransform(index.chain.at(i))
        if isinstance(transform, faiss.OPQMatrix):
            transform.niter, transform.max_train_points = OPQ_ITERATIONS, OPQ_TRAIN_POINTS


def gpu_index(index: faiss.Index, local_rank: int = 0) -> faiss.Index | None:
    """A GPU copy for training and adding when FAISS sees GPUs (this rank's GPU: local rank modulo the count);
    None when it does not, or the type has no GPU version (HNSW quantizer, fast-scan PQ): then only the k-means
    of the coarse quantizer moves to the GPU."""
    gpus = faiss.get_num_gpus()
    if gpus == 0:
        return None
    resources = faiss.StandardGpuResources()
    device = local_rank % gpus
    try:
        return faiss.index_cpu_to_gpu(resources, device, index)
    except (RuntimeError, AttributeError):
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = faiss.index_cpu_to_gpu(resources, device, faiss.IndexFlatL2(ivf.d))
        return None


# --- I/O: the build ---------------------------------------------------------------------------------------------
def _bar(progress: bool, **kw: Any) -> tqdm:
    return tqdm(disable=not progress, unit="vec", unit_scale=True, dynamic_ncols=True, **kw)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _shards(emb: EmbDir, units: Iterable[int], known: MetadataStore | None = None) -> Iterable[Shard]:
    """Shards in unit order, one in memory at a time; with `known`, only the ids it lacks (what --update adds)."""
    for unit in units:
        shard = emb.read_shard(unit)
        if known is not None:
            shard.select(~np.isin(shard.ids, np.fromiter(known.paths_of(shard.ids), dtype=np.int64)))
        yield shard


def _add_metadata(meta: MetadataStore, shard: Shard) -> None:
    """A shard's rows into meta.sqlite: path, caption, key, url, image-caption similarity, a tar member's offset."""
    keys, urls = zip(*map(meta_key_url, shard.meta)) if shard.meta else ((), ())
    meta.add(
        shard.ids,
        shard.paths,
        shard.sizes,
        captions=shard.captions,
        keys=keys,
        urls=urls,
        offsets=shard.offsets,
        similarities=shard.similarity,
    )


def _n_rows(summary: EmbSummary) -> int:
    """One row per global id, embedded or failed: `check_set` proved the last unit covers its ids exactly, so
    the largest id is the last input's."""
    return summary.n_inputs


def _unit_counts(entries: Sequence[ShardEntry]) -> dict[str, int]:
    """What index.json records as indexed: embedded ids per unit (a refilled unit shows up as a changed count)."""
    return {str(e.unit): e.n for e in entries}


def _write_vectors(
    target: IndexDir,
    emb: EmbDir,
    units: Sequence[int],
    n_rows: int,
    dim: int,
    meta: MetadataStore,
    progress: bool,
    old: IndexDir | None = None,
    known: MetadataStore | None = None,
    removed: np.ndarray | None = None,
) -> None:
    """Stream the shards into a float16 memory map (old rows copied first on --update, but for the `removed` ids:
    a zero row is no image, and exact search must not find one the index no longer holds) and paths into SQLite."""
    vectors = target.create_vectors(n_rows, dim)
    if old is not None:
        previous = old.open_vectors()
        for lo in range(0, len(previous), ADD_BATCH):
            hi = min(lo + ADD_BATCH, len(previous))
            vectors[lo:hi] = previous[lo:hi]
        if removed is not None and len(removed):
            vectors[np.sort(removed)] = 0
    with _bar(progress, desc="vectors") as bar:
        for shard in _shards(emb, units, known):
            vectors[shard.ids] = shard.embeddings.astype(np.float16)
            _add_metadata(meta, shard)
            bar.update(len(shard.ids))
    vectors.flush()
    del vectors


def _train(
    index: faiss.Index,
    sample: np.ndarray | None,
    progress: bool,
    timings: dict[str, float],
    local_rank: int = 0,
    key: str = "the index",
) -> faiss.Index:
    """Train on the sample (on this rank's GPU when FAISS sees one); the trained, empty CPU index back. FAISS
    refuses a sample smaller than a codebook (PQ4 on 5 vectors: 256 centroids each): a user's error, one line."""
    start = time.perf_counter()
    if sample is not None and not index.is_trained:
        gpu = gpu_index(index, local_rank)
        if gpu is None and (torch_s := pretrain_coarse_quantizer(index, sample, local_rank)) is not None:
            timings["kmeans_torch_s"] = torch_s  # faiss-cpu: the coarse k-means ran on this rank's GPU, via torch
        with _bar(progress, desc="train", total=len(sample)) as bar:
            try:
                (gpu if gpu is not None else index).train(np.ascontiguousarray(sample, dtype=np.float32))
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[-1].split("failed: ")[-1][:200]
                raise UserError(
                    f"{key} cannot be trained on {len(sample)} vectors ({reason}); use more vectors "
                    "(--train-size) or --index-key auto"
                ) from None
            bar.update(len(sample))
        index = faiss.index_gpu_to_cpu(gpu) if gpu is not None else index
    timings["train_s"] = round(time.perf_counter() - start, 3)
    return index


def _add(
    index: faiss.Index,
    emb: EmbDir,
    units: Sequence[int],
    progress: bool,
    timings: dict[str, float],
    known: MetadataStore | None = None,
    local_rank: int = 0,
    tier_dir: IndexDir | None = None,
) -> faiss.Index:
    """Add every shard of `units` in batches (on this rank's GPU when FAISS sees one), and their rows of the
    re-rank tier when `tier_dir` has one; the CPU index back."""
    start = time.perf_counter()
    tier = faiss.read_index(str(tier_dir.tier_path)) if tier_dir is not None and tier_dir.has_tier() else None
    gpu = gpu_index(index, local_rank)
    target = gpu if gpu is not None else index
    with _bar(progress, desc="add") as bar:
        for shard in _shards(emb, units, known):
            for lo in range(0, len(shard.ids), ADD_BATCH):
                batch = np.ascontiguousarray(shard.embeddings[lo : lo + ADD_BATCH], dtype=np.float32)
                target.add_with_ids(batch, np.ascontiguousarray(shard.ids[lo : lo + ADD_BATCH]))
                if tier is not None:
                    encode_into(tier, tier_dir.tier_codes_path, shard.ids[lo : lo + ADD_BATCH], batch)
                bar.update(len(batch))
    timings["add_s"] = round(time.perf_counter() - start, 3)
    return faiss.index_gpu_to_cpu(gpu) if gpu is not None else index


def _finish(
    tmp: IndexDir,
    out: Path,
    index: faiss.Index,
    info: IndexInfo,
    query_ids: np.ndarray,
    nprobe: int | None,
    timings: dict[str, Any],
    started: float,
) -> IndexInfo:
    """Self-check, save the index and index.json into `tmp`, then swap `tmp` in as `out`."""
    start = time.perf_counter()
    vectors = tmp.open_vectors()
    budget = max(SWEEP_BUDGET_MIN_S, SWEEP_BUDGET_SHARE * (start - started))  # a stated share of the build
    tier = load_tier(tmp.tier_path, tmp.tier_codes_path) if tmp.has_tier() else None
    info.nprobe, info.recall = self_check(
        index,
        vectors,
        query_ids,
        refine_factor=info.refine_factor,
        refine=info.refine,
        nprobe=nprobe,
        seed=info.seed,
        model=info.model,
        pretrained=info.pretrained,
        budget_s=budget,
        tier=tier,
    )
    info.refine_factor = info.recall["refine_factor"]
    if tier is not None and not info.recall.get("tier_exact_factor"):
        tmp.remove_tier()  # it does not pay on this data: neither RAM nor disk keeps it
    info.tier = (
        {"key": TIER_KEY, "code_bytes": int(tier.sa_code_size()), "exact_factor": info.recall["tier_exact_factor"]}
        if tmp.has_tier()
        else None
    )
    del tier
    timings["recall_s"] = round(time.perf_counter() - start, 3)
    del vectors
    info.index_bytes = tmp.write_index(index)
    tmp.record_files(info)  # and where the lists went (--update of on-disk lists once left "disk" and none)
    info.n = int(index.ntotal)
    info.bytes_per_vector = round(info.index_bytes / max(1, info.n), 2)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    info.faiss_version = faiss.__version__
    tmp.write_info(info)
    tmp.swap_in(out)
    return info


def _checked_set(emb: EmbDir) -> EmbSummary:
    if (summary := emb.check_set()).n_embedded == 0:
        raise UserError(f"{emb.root}: the shards hold no embedded images; nothing to index")
    return summary


@dataclass
class _Plan:
    """What rank 0 hands every rank after training: where to write, what to add, the trained index."""

    root: str
    units: list[int]
    trained: np.ndarray
    lists: str
    info: dict[str, Any]
    query_ids: np.ndarray


def _prepare(
    tmp: IndexDir,
    emb_dir: str | os.PathLike,
    out: Path,
    *,
    index_key: str,
    train_size: int | None,
    refine: bool | None,
    nprobe: int | None,
    refine_factor: int | None,
    seed: int,
    lists: str,
    world: World,
    progress: bool,
    vectors: str,
    rerank_tier: str,
) -> _Plan:
    """Rank 0: check the shards, write vectors.npy and meta.sqlite, choose the index and train it."""
    if out.exists():
        raise UserError(f"{out} already exists; remove it first, or pass --update to add new units to it")
    if (nprobe is not None and nprobe < 1) or (refine_factor is not None and refine_factor < 1):
        raise UserError("--nprobe and the refine factor must be at least 1")
    listing = time.perf_counter()
    emb = emb_view(emb_dir, vectors)
    summary = _checked_set(emb)
    n, dim, units = summary.n_embedded, int(summary.dim or 0), [e.unit for e in summary.shards]
    listing = round(time.perf_counter() - listing, 3)
    on_disk = choose_lists(lists, n * (dim // 16 + 8)) == "disk"
    key = choose_index_key(n, dim, lists_on_disk=on_disk) if index_key in (None, "", "auto") else index_key
    if on_disk and is_fast_scan(key):
        raise UserError(f"{key}: fast-scan lists cannot be merged on disk; use --lists memory, or an 8-bit PQ key")
    index = make_index(key, dim)
    nlist = ivf_lists(key)
    if nlist and n < nlist:
        raise UserError(f"{key} needs at least {nlist} vectors to train, the shards hold {n}; use --index-key auto")
    refine = (key.split(",")[-1].strip() != "Flat") if refine is None else refine
    timings: dict[str, Any] = {"listing_s": listing}
    is_ivf = faiss.try_extract_index_ivf(index) is not None
    mode = ("disk" if on_disk else "memory") if is_ivf else "memory"
    info = IndexInfo(
        index_key=key,
        dim=dim,
        model=summary.model,
        pretrained=summary.pretrained,
        refine=bool(refine),
        refine_factor=refine_factor,
        row_layout=ROW_LAYOUT,
        n_rows=_n_rows(summary),
        unit_counts=_unit_counts(summary.shards),
        unit_size=summary.unit_size,
        emb_dir=str(Path(emb_dir).resolve()),
        seed=seed,
        created=_now(),
        updates=[],
        train_size=choose_train_size(n, key, train_size) if not index.is_trained else 0,
        timings=timings,
        ranks=world.size if is_ivf else 1,
        lists=mode,
        vectors=vectors,
    )
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with tmp.open_metadata(readonly=False) as meta:
        _write_vectors(tmp, emb, units, info.n_rows, dim, meta, progress)
    timings["vectors_s"] = round(time.perf_counter() - start, 3)
    vectors = tmp.open_vectors()
    sample_ids = emb.sample_ids(summary.shards, max(info.train_size, RECALL_QUERIES), rng)
    sample = np.asarray(vectors[np.sort(sample_ids[: info.train_size])], dtype=np.float32) if info.train_size else None
    del vectors
    index = _train(index, sample, progress, timings, world.local_rank, key)
    if sample is not None and wants_tier(rerank_tier, n, is_ivf, info.refine):
        start = time.perf_counter()
        tier = train_tier(sample)
        faiss.write_index(tier, str(tmp.tier_path))
        start_codes(tier, tmp.tier_codes_path, info.n_rows)
        timings["tier_train_s"] = round(time.perf_counter() - start, 3)
    return _Plan(str(tmp.root), units, serialize(index), mode, info.to_dict(), sample_ids[:RECALL_QUERIES])


def _add_my_share(plan: _Plan, world: World, progress: bool) -> tuple[faiss.Index, dict[str, float]]:
    """Every rank: add its own units to the trained index; write its lists when they are to be merged."""
    index, timings = deserialize(plan.trained), {}
    info = IndexInfo.from_dict(plan.info)
    units = my_units(plan.units, world) if info.ranks > 1 else plan.units if world.is_root else []
    index = _add(
        index,
        emb_view(str(info.emb_dir), info.vectors),
        units,
        progress and world.is_root,
        timings,
        local_rank=world.local_rank,
        tier_dir=IndexDir(plan.root),
    )
    if info.ranks > 1 or plan.lists == "disk":
        start = time.perf_counter()
        if not world.is_root or plan.lists == "disk":
            IndexDir(plan.root).write_part(index, world.rank)
        timings["write_lists_s"] = round(time.perf_counter() - start, 3)
    return index, timings


def _merge_and_finish(
    plan: _Plan, own: faiss.Index, per_rank: list[dict[str, float]], out: Path, nprobe: int | None, started: float
) -> dict[str, Any]:
    """Rank 0: merge the ranks' lists (in memory or on disk), self-check, save, swap in."""
    tmp, info = IndexDir(plan.root), IndexInfo.from_dict(plan.info)
    timings = info.timings
    timings["add_s"] = max(t["add_s"] for t in per_rank)
    if info.ranks > 1:
        timings["add_s_per_rank"] = [t["add_s"] for t in per_rank]
    start = time.perf_counter()
    if plan.lists == "disk":
        own = merge_on_disk(deserialize(plan.trained), [tmp.part_path(r) for r in range(info.ranks)], tmp.ivfdata_path)
    elif info.ranks > 1:
        own = merge_in_memory(own, [tmp.part_path(r) for r in range(1, info.ranks)])
    timings["merge_s"] = round(time.perf_counter() - start, 3)
    return _finish(tmp, out, own, info, plan.query_ids, nprobe, timings, started).to_dict()


def job_world(world: World | None = None) -> World:
    """This job's ranks (or `world`); ranks that cannot talk leave rank 0 to work alone, the others to stop."""
    world = world if world is not None else current_world()
    if not world.coordinated:  # ranks that cannot talk: rank 0 builds alone, the others have nothing to do
        if not world.is_root:
            raise UserError(
                f"rank {world.rank} of {world.size} cannot reach the others (no MPI); "
                f"run one task, or {job_env().mpi_hint}"
            )
        world = World()
    return world


def build_index(
    emb_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    index_key: str = "auto",
    train_size: int | None = None,
    refine: bool | None = None,
    nprobe: int | None = None,
    refine_factor: int | None = None,
    seed: int = 0,
    lists: str = "auto",
    progress: bool = True,
    world: World | None = None,
    vectors: str = "images",
    rerank_tier: str = "auto",
) -> IndexInfo:
    """EMB_DIR -> INDEX_DIR (see the module docstring) on every rank of `world` (default: this job's), over the
    image or the caption embeddings (`vectors`, formats/caption_view.py); returns index.json, on every rank.
    `index --update` is index/update.py."""
    world = job_world(world)
    with full_disk_is_a_user_error(out, "clip-hpc index"):  # the temporary directory is gone by then
        options = dict(
            index_key=index_key,
            train_size=train_size,
            refine=refine,
            seed=seed,
            nprobe=nprobe,
            refine_factor=refine_factor,
            lists=lists,
            world=world,
            progress=progress,
            vectors=vectors,
            rerank_tier=rerank_tier,
        )
        return _build(emb_dir, Path(out), options)


def _build(emb_dir: str | os.PathLike, out: Path, options: dict[str, Any]) -> IndexInfo:
    """A new INDEX_DIR on every rank: rank 0 prepares and trains, every rank adds, rank 0 merges and swaps in."""
    started, world, progress = time.perf_counter(), options["world"], options["progress"]
    if not world.is_root:
        plan = from_root(world, lambda: None)  # rank 0's plan, or its error
        on_every_rank(world, lambda: _add_my_share(plan, world, progress)[1])
        return IndexInfo.from_dict(from_root(world, lambda: None))
    with IndexDir.build_beside(out) as tmp:
        plan = from_root(world, lambda: _prepare(tmp, emb_dir, out, **options))
        own: list[faiss.Index] = []

        def add() -> dict[str, float]:
            index, timings = _add_my_share(plan, world, progress)
            own.append(index)
            return timings

        per_rank = on_every_rank(world, add)
        return IndexInfo.from_dict(
            from_root(world, lambda: _merge_and_finish(plan, own[0], per_rank, out, options["nprobe"], started))
        )
