"""Building an INDEX_DIR from an EMB_DIR: choose the index, train on a sample, stream the adds, measure recall.

Nothing is held whole in RAM: shards stream one at a time into `vectors.npy` (a memory map), the training set is
a random sample, and the adds go in batches. Everything is written into a temporary directory renamed at the end,
so an INDEX_DIR is either absent, the old one, or the new one, never half of either. The stages themselves are in
index/stages.py; this module runs them across the ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clip_hpc.ann.fine_ivf import FINE_MAX, fine_bytes
from clip_hpc.ann.graph import GRAPH_MAX, graph_bytes
from clip_hpc.ann.refine import check_refine_factor
from clip_hpc.cluster.collective import from_root, on_every_rank
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.cluster.world import World
from clip_hpc.cluster.world import world as current_world
from clip_hpc.errors import UserError, full_disk_is_a_user_error
from clip_hpc.formats.caption_view import emb_view
from clip_hpc.formats.index_dir import ROW_LAYOUT, IndexDir, IndexInfo
from clip_hpc.index.choose import FLAT_BELOW, choose_index_key, choose_train_size, is_fast_scan, ivf_lists
from clip_hpc.index.memory import DEFAULT_MAX_RAM, choose_tier_code, tier_key
from clip_hpc.index.ranks import choose_lists, deserialize, merge_in_memory, merge_on_disk, my_units, serialize
from clip_hpc.index.rerank_tier import TIER_FROM, check_tier_choice, may_tier, start_codes, train_tier
from clip_hpc.index.selfcheck import RECALL_QUERIES
from clip_hpc.index.stages import add, checked_set, finish, make_index, n_rows, now, train, unit_counts, write_vectors


@dataclass(frozen=True)
class BuildOptions:
    """`clip-hpc index`'s choices, as `build_index` takes them (see its keyword arguments)."""

    index_key: str = "auto"
    train_size: int | None = None
    refine: bool | None = None
    nprobe: int | None = None
    refine_factor: int | None = None
    seed: int = 0
    lists: str = "auto"
    progress: bool = True
    vectors: str = "images"
    rerank_tier: str = "auto"
    max_ram: int | None = None  # None: DEFAULT_MAX_RAM for the tier, never a refusal
    graph_candidate: bool = False  # also time an HNSW graph (ann/graph.py); opt-in, see its docstring
    tier_from: int = TIER_FROM


@dataclass
class BuildPlan:
    """What rank 0 hands every rank after training: where to write, what to add, the trained index."""

    root: str
    units: list[int]
    trained: np.ndarray
    lists: str
    info: dict[str, Any]
    query_ids: np.ndarray
    exact_allowed: bool = False  # every choice left to the build: exact search may be served where it is faster
    graph_allowed: bool = False  # ... and an HNSW graph, where it fits the RAM budget and N <= GRAPH_MAX
    fine_allowed: bool = False  # ... and IVF-SQ8 in the same lists, where a tier may be used and it fits the budget
    tier_asked: bool = False  # --rerank-tier on: kept even where the self-check finds it does not pay


def plan(tmp: IndexDir, emb_dir: str | os.PathLike, out: Path, options: BuildOptions, world: World) -> BuildPlan:
    """Rank 0: check the shards, choose the index, write vectors.npy and meta.sqlite, and train it."""
    if out.exists():
        raise UserError(f"{out} already exists; remove it first, or pass --update to add new units to it")
    o = options
    if (o.nprobe is not None and o.nprobe < 1) or (o.refine_factor is not None and o.refine_factor < 1):
        raise UserError("--nprobe and the refine factor must be at least 1")
    listing = time.perf_counter()
    emb = emb_view(emb_dir, o.vectors)
    summary = checked_set(emb)
    n, dim, units = summary.n_embedded, int(summary.dim or 0), [e.unit for e in summary.shards]
    timings: dict[str, Any] = {"listing_s": round(time.perf_counter() - listing, 3)}
    on_disk = choose_lists(o.lists, n * (dim // 16 + 8)) == "disk"
    key = choose_index_key(n, dim, lists_on_disk=on_disk) if o.index_key in (None, "", "auto") else o.index_key
    if on_disk and is_fast_scan(key):
        raise UserError(f"{key}: fast-scan lists cannot be merged on disk; use --lists memory, or an 8-bit PQ key")
    index = make_index(key, dim)
    nlist = ivf_lists(key)
    if nlist and n < nlist:
        raise UserError(f"{key} needs at least {nlist} vectors to train, the shards hold {n}; use --index-key auto")
    refine = (key.split(",")[-1].strip() != "Flat") if o.refine is None else o.refine
    is_ivf = faiss.try_extract_index_ivf(index) is not None
    check_tier_choice(o.rerank_tier, key, is_ivf, bool(refine), o.refine_factor)
    tier = choose_tier_code(
        o.rerank_tier,
        key,
        n,
        n_rows(summary),
        dim,
        o.max_ram,
        may_tier=may_tier(o.rerank_tier, n, is_ivf, bool(refine), o.tier_from),
    )
    mode = ("disk" if on_disk else "memory") if is_ivf else "memory"
    info = IndexInfo(
        index_key=key,
        dim=dim,
        model=summary.model,
        pretrained=summary.pretrained,
        refine=bool(refine),
        refine_factor=o.refine_factor,
        row_layout=ROW_LAYOUT,
        n_rows=n_rows(summary),
        unit_counts=unit_counts(summary.shards),
        unit_size=summary.unit_size,
        emb_dir=str(Path(emb_dir).resolve()),
        seed=o.seed,
        created=now(),
        updates=[],
        train_size=choose_train_size(n, key, o.train_size) if not index.is_trained else 0,
        timings=timings,
        ranks=world.size if is_ivf else 1,
        lists=mode,
        vectors=o.vectors,
        max_ram=o.max_ram if o.max_ram is not None else DEFAULT_MAX_RAM,
        tier={"key": tier_key(tier.code, dim)} if tier.code else None,  # until the self-check keeps it or not
    )
    start = time.perf_counter()
    with tmp.open_metadata(readonly=False) as meta:
        write_vectors(tmp, emb, units, info.n_rows, dim, meta, o.progress)
    timings["vectors_s"] = round(time.perf_counter() - start, 3)
    sample_ids = emb.sample_ids(summary.shards, max(info.train_size, RECALL_QUERIES), np.random.default_rng(o.seed))
    index = _train_with_tier(tmp, index, info, sample_ids, o.progress, world.local_rank)
    exact_allowed, graph_allowed, fine_allowed = _others_allowed(
        o, n, dim, nlist or 0, mode == "memory", info.max_ram or DEFAULT_MAX_RAM
    )
    return BuildPlan(
        str(tmp.root),
        units,
        serialize(index),
        mode,
        info.to_dict(),
        sample_ids[:RECALL_QUERIES],
        exact_allowed,
        graph_allowed,
        fine_allowed,
        tier_asked=o.rerank_tier not in ("auto", "off"),
    )


def _others_allowed(o: BuildOptions, n: int, dim: int, nlist: int, in_memory: bool, budget: int) -> tuple[bool, ...]:
    """Whether exact search, the HNSW graph and IVF-SQ8 may be served in place of the index built: every choice left
    to the build, lists in memory, and each within the RAM budget (exact search: the float32 rows); the graph only
    when asked for, IVF-SQ8 (d-byte codes) only where a tier may be used (not --rerank-tier off)."""
    exact = in_memory and _all_left_to_the_build(o) and n * dim * 4 <= budget
    graph = o.graph_candidate and exact and FLAT_BELOW <= n <= GRAPH_MAX and graph_bytes(n, dim) <= budget
    fine = exact and nlist > 0 and o.rerank_tier == "auto" and n <= FINE_MAX and fine_bytes(n, dim, nlist) <= budget
    return exact, graph, fine


def _all_left_to_the_build(o: BuildOptions) -> bool:
    """No key, nprobe, refine factor, lists or tier asked for: the build may serve exact search instead of its
    index when that is no slower (a key or setting the user named is what they get)."""
    return (
        o.index_key in (None, "", "auto")
        and o.nprobe is None
        and o.refine_factor is None
        and o.lists == "auto"
        and o.rerank_tier in ("auto", "off")
    )


def _train_with_tier(
    tmp: IndexDir,
    index: faiss.Index,
    info: IndexInfo,
    sample_ids: np.ndarray,
    progress: bool,
    local_rank: int,
) -> faiss.Index:
    """Train the index on the first `info.train_size` sample ids, and the re-rank tier when the plan has one."""
    vectors = tmp.open_vectors()
    sample = np.asarray(vectors[np.sort(sample_ids[: info.train_size])], dtype=np.float32) if info.train_size else None
    del vectors
    index = train(index, sample, progress, info.timings, local_rank, info.index_key)
    if sample is not None and info.tier is not None:
        start = time.perf_counter()
        tier = train_tier(sample, info.tier["key"])
        faiss.write_index(tier, str(tmp.tier_path))
        start_codes(tier, tmp.tier_codes_path, info.n_rows)
        info.timings["tier_train_s"] = round(time.perf_counter() - start, 3)
    return index


def add_my_share(plan: BuildPlan, world: World, progress: bool) -> tuple[faiss.Index, dict[str, float]]:
    """Every rank: add its own units to the trained index; write its lists when they are to be merged."""
    index, timings = deserialize(plan.trained), dict[str, float]()
    info = IndexInfo.from_dict(plan.info)
    units = my_units(plan.units, world) if info.ranks > 1 else plan.units if world.is_root else []
    index = add(
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


def merge_and_finish(
    plan: BuildPlan, own: faiss.Index, per_rank: list[dict[str, float]], out: Path, nprobe: int | None, started: float
) -> dict[str, Any]:
    """Rank 0: merge the ranks' lists (in memory or on disk), self-check, save, swap in."""
    tmp, info = IndexDir(plan.root), IndexInfo.from_dict(plan.info)
    timings: dict[str, Any] = info.timings  # add_s_per_rank is a list
    timings["add_s"] = max(t["add_s"] for t in per_rank)
    if info.ranks > 1:
        timings["add_s_per_rank"] = [t["add_s"] for t in per_rank]
    start = time.perf_counter()
    if plan.lists == "disk":
        own = merge_on_disk(deserialize(plan.trained), [tmp.part_path(r) for r in range(info.ranks)], tmp.ivfdata_path)
    elif info.ranks > 1:
        own = merge_in_memory(own, [tmp.part_path(r) for r in range(1, info.ranks)])
    timings["merge_s"] = round(time.perf_counter() - start, 3)
    return finish(
        tmp,
        out,
        own,
        info,
        plan.query_ids,
        nprobe,
        timings,
        started,
        plan.exact_allowed,
        plan.tier_asked,
        plan.graph_allowed,
        plan.fine_allowed,
    ).to_dict()


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
    max_ram: int | None = None,
    tier_from: int = TIER_FROM,
    graph_candidate: bool = False,
) -> IndexInfo:
    """EMB_DIR -> INDEX_DIR (see the module docstring) on every rank of `world` (default: this job's), over the
    image or the caption embeddings (`vectors`, formats/caption_view.py); returns index.json, on every rank.
    `max_ram`: bytes the served index may hold in RAM (index/memory.py); `tier_from`: vectors from which
    `rerank_tier="auto"` considers a tier; `graph_candidate`: also time an HNSW graph (opt-in, ann/graph.py).
    `index --update` is index/update.py."""
    check_refine_factor(refine_factor)
    options = BuildOptions(
        index_key=index_key,
        train_size=train_size,
        refine=refine,
        nprobe=nprobe,
        refine_factor=refine_factor,
        seed=seed,
        lists=lists,
        progress=progress,
        vectors=vectors,
        rerank_tier=rerank_tier,
        max_ram=max_ram,
        tier_from=tier_from,
        graph_candidate=graph_candidate,
    )
    world = job_world(world)
    with full_disk_is_a_user_error(out, "clip-hpc index"):  # the temporary directory is gone by then
        return _build(emb_dir, Path(out), options, world)


def _rank0_only() -> Any:
    """What a rank other than 0 runs in `from_root`: nothing; it gets rank 0's result."""
    return None


def _build(emb_dir: str | os.PathLike, out: Path, options: BuildOptions, world: World) -> IndexInfo:
    """A new INDEX_DIR on every rank: rank 0 plans and trains, every rank adds, rank 0 merges and swaps in."""
    started, progress = time.perf_counter(), options.progress
    if not world.is_root:
        shared: BuildPlan = from_root(world, _rank0_only)  # rank 0's plan, or its error
        on_every_rank(world, lambda: add_my_share(shared, world, progress)[1])
        return IndexInfo.from_dict(from_root(world, _rank0_only))
    with IndexDir.build_beside(out) as tmp:
        built = from_root(world, lambda: plan(tmp, emb_dir, out, options, world))
        own: list[faiss.Index] = []

        def add_own() -> dict[str, float]:
            index, timings = add_my_share(built, world, progress)
            own.append(index)
            return timings

        per_rank = on_every_rank(world, add_own)
        return IndexInfo.from_dict(
            from_root(world, lambda: merge_and_finish(built, own[0], per_rank, out, options.nprobe, started))
        )
