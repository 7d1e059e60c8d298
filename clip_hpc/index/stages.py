"""The stages of building an INDEX_DIR, shared by a fresh build (index/build.py) and `index --update`
(index/update.py): FAISS objects, streaming shards into vectors.npy and meta.sqlite, training, adding, and
finishing (self-check, save, swap in)."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
from tqdm import tqdm

from clip_hpc.ann.tier import load_tier
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir, EmbSummary, ShardEntry
from clip_hpc.formats.index_dir import IndexDir, IndexInfo
from clip_hpc.formats.metadata import MetadataStore
from clip_hpc.formats.shard import Shard, meta_key_url
from clip_hpc.index.choose import (
    ADD_BATCH,
    KMEANS_ITERATIONS,
    OPQ_ITERATIONS,
    OPQ_TRAIN_POINTS,
    PQ_TRAIN_PER_CENTROID,
)
from clip_hpc.index.defaults import TRAIN_PER_LIST
from clip_hpc.index.gpu_train import pretrain_coarse_quantizer
from clip_hpc.index.rerank_tier import TIER_KEY, encode_into, tier_record, tier_warning
from clip_hpc.index.selfcheck import SWEEP_BUDGET_MIN_S, SWEEP_BUDGET_SHARE, self_check
from clip_hpc.index.summary import served_footprint


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
def progress_bar(progress: bool, **kw: Any) -> tqdm:
    """A vectors-per-second bar, silent without `progress` (and on ranks other than 0)."""
    return tqdm(disable=not progress, unit="vec", unit_scale=True, dynamic_ncols=True, **kw)


def now() -> str:
    """UTC, to the second: index.json's `created` and each update's `at`."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_shards(emb: EmbDir, units: Iterable[int], known: MetadataStore | None = None) -> Iterable[Shard]:
    """Shards in unit order, one in memory at a time; with `known`, only the ids it lacks (what --update adds)."""
    for unit in units:
        shard = emb.read_shard(unit)
        if known is not None:
            shard.select(~np.isin(shard.ids, np.fromiter(known.paths_of(shard.ids), dtype=np.int64)))
        yield shard


def add_metadata(meta: MetadataStore, shard: Shard) -> None:
    """A shard's rows into meta.sqlite: path, caption, key, url, image-caption similarity, a tar member's offset."""
    keys, urls = zip(*map(meta_key_url, shard.meta)) if shard.meta else ((), ())
    meta.add(
        shard.ids.tolist(),
        shard.paths,
        shard.sizes.tolist(),
        captions=shard.captions,
        keys=keys,
        urls=urls,
        offsets=shard.offsets.tolist(),
        similarities=shard.similarity.tolist(),
        identities=shard.identities,
    )


def n_rows(summary: EmbSummary) -> int:
    """One row per global id, embedded or failed: `check_set` proved the last unit covers its ids exactly, so
    the largest id is the last input's."""
    return summary.n_inputs


def unit_counts(entries: Sequence[ShardEntry]) -> dict[str, int]:
    """What index.json records as indexed: embedded ids per unit (a refilled unit shows up as a changed count)."""
    return {str(e.unit): e.n for e in entries}


def write_vectors(
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
    vectors = cast(np.memmap, target.create_vectors(n_rows, dim))
    if old is not None:
        previous = old.open_vectors()
        for lo in range(0, len(previous), ADD_BATCH):
            hi = min(lo + ADD_BATCH, len(previous))
            vectors[lo:hi] = previous[lo:hi]
        if removed is not None and len(removed):
            vectors[np.sort(removed)] = 0
    with progress_bar(progress, desc="vectors") as bar:
        for shard in read_shards(emb, units, known):
            vectors[shard.ids] = shard.embeddings.astype(np.float16)
            add_metadata(meta, shard)
            bar.update(len(shard.ids))
    vectors.flush()
    del vectors


def train(
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
        with progress_bar(progress, desc="train", total=len(sample)) as bar:
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


def add(
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
    tier, codes_path = None, None
    if tier_dir is not None and tier_dir.has_tier():
        tier, codes_path = faiss.read_index(str(tier_dir.tier_path)), tier_dir.tier_codes_path
    gpu = gpu_index(index, local_rank)
    target = gpu if gpu is not None else index
    with progress_bar(progress, desc="add") as bar:
        for shard in read_shards(emb, units, known):
            for lo in range(0, len(shard.ids), ADD_BATCH):
                batch = np.ascontiguousarray(shard.embeddings[lo : lo + ADD_BATCH], dtype=np.float32)
                target.add_with_ids(batch, np.ascontiguousarray(shard.ids[lo : lo + ADD_BATCH]))
                if codes_path is not None:
                    encode_into(tier, codes_path, shard.ids[lo : lo + ADD_BATCH], batch)
                bar.update(len(batch))
    timings["add_s"] = round(time.perf_counter() - start, 3)
    return faiss.index_gpu_to_cpu(gpu) if gpu is not None else index


def finish(
    tmp: IndexDir,
    out: Path,
    index: faiss.Index,
    info: IndexInfo,
    query_ids: np.ndarray,
    nprobe: int | None,
    timings: dict[str, Any],
    started: float,
    exact_allowed: bool = False,
    tier_asked: bool = False,
    graph_allowed: bool = False,
    fine_allowed: bool = False,
) -> IndexInfo:
    """Self-check, save the index and index.json into `tmp`, then swap `tmp` in as `out`; where `exact_allowed`
    and the self-check measured exact search (or, where `graph_allowed`, an HNSW graph) faster than every setting
    of the index, that index of the same rows is saved instead (`serve_replacement`). A tier asked for
    (`tier_asked`: --rerank-tier on or a named code, now or when the index being updated was built) is kept where
    it does not pay, with a warning."""
    start = time.perf_counter()
    tier_asked = tier_asked or (info.tier or {}).get("asked") == "on"
    vectors = tmp.open_vectors()
    budget = max(SWEEP_BUDGET_MIN_S, SWEEP_BUDGET_SHARE * (start - started))  # a stated share of the build
    tier = load_tier(tmp.tier_path, tmp.tier_codes_path) if tmp.has_tier() else None
    check = self_check(
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
        exact_allowed=exact_allowed and not tier_asked,
        graph_allowed=graph_allowed and not tier_asked,
        fine_allowed=fine_allowed and not tier_asked,
        keep_tier=tier_asked,
    )
    info.nprobe, info.recall, info.refine_factor = check.nprobe, check.to_dict(), check.refine_factor
    if check.replacement is not None:
        index = serve_replacement(info, check.replacement, check.replacement_key or "Flat", check.replacement_refines)
    if tier is not None and not check.tier_exact_factor:
        tmp.remove_tier()  # it does not pay on this data: neither RAM nor disk keeps it
    key = (info.tier or {}).get("key", TIER_KEY)  # the plan's (or, on --update, the index's own) tier code
    info.tier = (
        tier_record(key, int(tier.sa_code_size()), int(check.tier_exact_factor or 0), tier_asked, check.tier_pays)
        if tier is not None and tmp.has_tier()
        else None
    )
    if tier is not None and check.tier_pays is False:
        print(tier_warning(kept=tmp.has_tier()), file=sys.stderr)
    del tier
    timings["recall_s"] = round(time.perf_counter() - start, 3)
    del vectors
    info.index_bytes = tmp.write_index(index)
    tmp.record_files(info)  # and where the lists went (--update of on-disk lists once left "disk" and none)
    info.n = int(index.ntotal)
    info.bytes_per_vector = round(info.index_bytes / max(1, info.n), 2)
    footprint = served_footprint(info.files)
    info.ram_bytes_per_vector = round(footprint.ram / max(1, info.n), 2)
    info.disk_bytes_per_vector = round(footprint.disk / max(1, info.n), 2)
    timings["total_s"] = round(time.perf_counter() - started, 3)
    info.faiss_version = faiss.__version__
    tmp.write_info(info)
    tmp.swap_in(out)
    return info


def serve_replacement(info: IndexInfo, index: faiss.Index, key: str, refines: bool = False) -> faiss.Index:
    """The exact scan, the HNSW graph or IVF-SQ8 in place of the index built: its key, and the re-rank from the
    float16 rows only where the self-check chose one (`refines`; the first two score the rows exactly); index.json's
    `recall.timing` keeps the times and the key it was measured against."""
    info.recall["timing"]["built_key"] = info.index_key
    info.index_key, info.refine, info.train_size = key, refines, 0
    return index


def checked_set(emb: EmbDir) -> EmbSummary:
    """The EMB_DIR's checked summary; an EMB_DIR with nothing embedded is a user's error."""
    if (summary := emb.check_set()).n_embedded == 0:
        raise UserError(f"{emb.root}: the shards hold no embedded images; nothing to index")
    return summary
