"""`clip-hpc dedup`: semantic deduplication of an EMB_DIR, as SemDeDup does it, on every rank of a job.

1. rank 0 checks the EMB_DIR, trains spherical k-means on a sample (FAISS) and sets the border margin;
2. every rank assigns its units' vectors to their nearest partition and to every partition within the border
   margin (`dedup_core.assign_partitions`), written per unit under DIR/work;
3. partitions are spread over the ranks by cost; each rank finds its partitions' pairs >= S exactly;
4. rank 0 merges the pairs, groups them (union-find) and writes duplicates.parquet and dedup.json.

A step that fails on any rank fails on every rank (`cluster.collective`). With `--border exact` the partitioning
only decides the speed: the pairs found are exactly those an all-pairs search finds, whatever the partitions and
the number of ranks. `--border auto` (the default) narrows the margin to twice what the sample's pairs need
(`dedup_margin`): on real CLIP photos a fortieth of the memberships, every pair still found there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from clip_hpc.cluster.collective import all_or_none, from_root, on_every_rank
from clip_hpc.cluster.world import World, world
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.subsets import dedup_core as core
from clip_hpc.subsets.dedup_margin import Calibration, calibrated_margins
from clip_hpc.subsets.dedup_output import (
    DedupCounts,
    DedupResult,
    DedupSettings,
    PartitionStats,
    Resumed,
    read_record,
    write_outputs,
)
from clip_hpc.subsets.dedup_work import ASSIGN_CHUNK, PartitionReader, WorkDir, sort_unit

T = TypeVar("T")
SAMPLE_PER_PARTITION = 50  # k-means training points per centroid
KMEANS_LEAST_PER_PARTITION = 39  # FAISS warns below this
KMEANS_ITERATIONS = 10  # better centroids only make it faster, never more exact
THIN_AT_LEAST = 0.01  # near-copies in the k-means sample worth a second training without them
BORDERS = ("auto", "exact")
THIN_ABOVE = 4.0  # memberships per vector that make a search for them worth it (2.2 on 200k ordinary vectors)


@dataclass(frozen=True)
class DedupOptions:
    """What `clip-hpc dedup` asks for; `partitions` None: chosen from `partition_candidates` by estimated cost."""

    emb_dir: Path
    out: Path
    threshold: float
    partitions: int | None = None
    seed: int = 0
    border: str = "auto"  # "auto": the margin the sample's pairs need (`dedup_margin`); "exact": sqrt(2 - 2S)


class RunPlan(NamedTuple):
    settings: DedupSettings
    units: list[int]
    n_vectors: int
    dim: int
    dtype: str
    done: DedupResult | None


def partition_candidates(n_vectors: int, requested: int | None) -> list[int]:
    """The k-means sizes to try: the requested one, else one partition (all pairs), about sqrt(n) and twice that
    (at least 39 vectors each). Too few partitions for the data's clusters put many vectors near borders; too many
    split clusters; which one fits is only seen once trained, so all are trained on the sample and the cheapest
    kept (`core.estimated_cost`). One partition wins where borders would hold most vectors anyway (47k real photos
    at S = 0.9: 59 memberships per vector, 6x the time of all pairs); it runs on one rank."""
    if requested is not None:
        return [min(requested, n_vectors)]
    most = max(1, n_vectors // KMEANS_LEAST_PER_PARTITION)
    root = max(1, min(round(n_vectors**0.5), most))
    return sorted({1, root, min(2 * root, most)})


def dedup_embeddings(options: DedupOptions, w: World | None = None) -> DedupResult:
    """The whole job; every rank calls it and gets the result (a finished DIR: `already_done`, nothing redone)."""
    w = w or world()
    if w.size > 1 and w.comm is None:
        raise UserError(f"dedup on {w.size} ranks needs MPI (mpiexec, or srun --mpi=pmi2); or run one process")
    timings: dict[str, float] = {}
    plan = _timed(timings, "check", lambda: from_root(w, lambda: make_plan(options)))
    if plan.done is not None:
        return plan.done
    work, emb = WorkDir(options.out), EmbDir(options.emb_dir)
    centroids, border = _timed(timings, "kmeans", lambda: from_root(w, lambda: centroids_for(work, emb, plan)))
    k = len(centroids)
    mine = plan.units[w.rank :: w.size]
    units_done = _timed(
        timings, "assign", lambda: on_every_rank(w, lambda: assign_units(work, emb, mine, centroids, border.margin))
    )
    reader = all_or_none(w, lambda: PartitionReader(work, plan.units, plan.dim, plan.dtype))
    primary, total = reader.sizes()
    owner = core.balance(primary * total, w.size)
    todo = [p for p in range(k) if owner[p] == w.rank]
    threshold = plan.settings.threshold
    parts_done = _timed(
        timings,
        "pairs",
        lambda: on_every_rank(w, lambda: find_pairs(work, reader, todo, threshold, centroids, border.margin)),
    )
    draft = DedupResult(
        out=options.out,
        settings=plan.settings,
        counts=DedupCounts(plan.n_vectors, 0, 0, 0),
        partitions=PartitionStats(
            k, int(total.sum()), int(total.max()), border.margin, core.border_margin(threshold), border.pairs
        ),
        ranks=w.size,
        timings=timings,
        resumed=Resumed(sum(units_done), sum(parts_done)),
    )
    return from_root(w, lambda: merge(work, emb, plan, draft))


def _timed(timings: dict[str, float], name: str, step: Callable[[], T]) -> T:
    start = time.perf_counter()
    try:
        return step()
    finally:
        timings[name] = time.perf_counter() - start


def make_plan(options: DedupOptions) -> RunPlan:
    """Rank 0: the EMB_DIR is whole, DIR is either finished with these settings, unfinished with these, or new."""
    if not 0.0 < options.threshold <= 1.0:
        raise UserError(f"--threshold is a cosine similarity in (0, 1], not {options.threshold}")
    if options.border not in BORDERS:
        raise UserError(f"--border is one of {', '.join(BORDERS)}, not {options.border!r}")
    if options.partitions is not None and options.partitions < 1:
        raise UserError(f"--partitions must be at least 1, not {options.partitions}")
    if options.out.exists() and not options.out.is_dir():
        raise UserError(f"--out {options.out} exists and is not a directory")
    emb = EmbDir(options.emb_dir)
    summary = emb.check_set()
    if not summary.n_embedded:
        raise UserError(f"{options.emb_dir} holds no embedded images: nothing to deduplicate")
    k = max(partition_candidates(summary.n_embedded, options.partitions))
    settings = DedupSettings(
        threshold=float(options.threshold),
        partitions=None if options.partitions is None else min(options.partitions, summary.n_embedded),
        seed=options.seed,
        border=options.border,
        sample=min(summary.n_embedded, SAMPLE_PER_PARTITION * k),
        emb_dir=str(emb.root),
        inputs_sha256=emb.inputs_sha256(),
    )
    units = [entry.unit for entry in summary.shards]
    plan = RunPlan(settings, units, summary.n_embedded, int(summary.dim or 0), str(summary.dtype or "float16"), None)
    finished = read_record(options.out)
    if finished is not None:
        settings.refuse_other(asdict(finished.settings), str(options.out))
        return plan._replace(done=finished)
    work = WorkDir(options.out)
    recorded = work.read_settings()
    if recorded is not None:
        settings.refuse_other(recorded, f"{options.out} (an unfinished dedup)")
    else:
        work.start(vars(settings))
    return plan


def centroids_for(work: WorkDir, emb: EmbDir, plan: RunPlan) -> tuple[np.ndarray, Calibration]:
    """Rank 0: the centroids and border of an unfinished run, else those of the candidate k-means
    (`partition_candidates`, each trained on a seeded uniform sample, its border from `borders_for`) whose
    partitions cost least on that sample. When the best leaves more than `THIN_ABOVE` memberships per vector, the
    sizes are trained again on the sample cut by `without_near_copies` and compete too."""
    found = work.read_centroids()
    if found is not None:
        return found
    settings = plan.settings
    rng = np.random.default_rng(settings.seed)
    picks = np.sort(rng.choice(plan.n_vectors, settings.sample, replace=False))
    sample = core.unit_rows(rows_at(emb, plan.units, picks))[rng.permutation(len(picks))]  # any prefix: uniform
    sample = sample[core.distinct_rows(sample)[1]]  # a vector stored a thousand times would draw many centroids
    seed = settings.seed
    sizes = sorted({min(k, len(sample)) for k in partition_candidates(plan.n_vectors, settings.partitions)})
    best = cheapest([spherical_kmeans(sample[: SAMPLE_PER_PARTITION * k], k, seed) for k in sizes], sample, plan)
    if best.replication > THIN_ABOVE:
        thinned = without_near_copies(sample, best.centroids, settings.threshold, best.border.margin)
        if thinned is not None:
            fewer = sorted({min(k, len(thinned)) for k in sizes if k > 1})  # the same k, but for fewer rows than k
            trained = [spherical_kmeans(thinned[: SAMPLE_PER_PARTITION * k], k, seed) for k in fewer]
            best = min([best, cheapest(trained, sample, plan)], key=by_cost)
    work.write_centroids(best.centroids, best.border)
    return best.centroids, best.border


def cheapest(trained: list[np.ndarray], sample: np.ndarray, plan: RunPlan) -> Candidate:
    """Of the trained centroid sets, each with its border (`borders_for`), the one that costs least on the sample;
    a tie goes to the first (the smaller k)."""
    borders = borders_for(sample, trained, plan.settings)
    return min((Candidate.of(c, border, sample, plan) for c, border in zip(trained, borders)), key=by_cost)


def borders_for(sample: np.ndarray, trained: list[np.ndarray], settings: DedupSettings) -> list[Calibration]:
    """--border exact: sqrt(2 - 2S), which loses no pair; auto: what the sample's pairs need (`dedup_margin`).
    One partition has no border."""
    exact = Calibration(core.border_margin(settings.threshold), 0, settings.threshold)
    split = [i for i, centroids in enumerate(trained) if len(centroids) > 1]
    borders = [exact] * len(trained)
    if settings.border == "auto" and split:
        for i, border in zip(split, calibrated_margins(sample, [trained[i] for i in split], settings.threshold)):
            borders[i] = border
    return borders


def by_cost(candidate: Candidate) -> float:
    return candidate.cost  # min() keeps the first of equal costs: the smaller k, the sample as it came


class Candidate(NamedTuple):
    """A k-means result with its border, scored on the whole sample: its estimated cost and its memberships per
    vector."""

    cost: float
    replication: float
    centroids: np.ndarray
    border: Calibration

    @classmethod
    def of(cls, centroids: np.ndarray, border: Calibration, sample: np.ndarray, plan: RunPlan) -> Candidate:
        assignment = core.assign_in_chunks(sample, centroids, border.margin, ASSIGN_CHUNK)
        cost = core.estimated_cost(assignment, len(centroids), plan.n_vectors, plan.dim)
        return cls(cost, len(assignment.rows) / max(1, len(sample)), centroids, border)


def without_near_copies(
    sample: np.ndarray, centroids: np.ndarray, threshold: float, margin: float
) -> np.ndarray | None:
    """The sample with each of its duplicate groups cut to `SAMPLE_PER_PARTITION` rows (what draws about one
    centroid), when that removes at least `THIN_AT_LEAST` of it; else None. A placeholder re-encoded thousands of
    times (its copies a hair apart, not equal) draws a centroid per 50 copies, and every copy then joins all those
    partitions; trained on the cut sample, the candidates compete with the others on the whole sample."""
    groups = core.duplicates_in(sample, np.arange(len(sample)), centroids, threshold, margin)
    order = np.lexsort((groups.ids, groups.kept))
    kept, ids = groups.kept[order], groups.ids[order]
    first = np.searchsorted(kept, kept)  # where each duplicate's group starts in `order`
    extra = ids[np.arange(len(ids)) - first >= SAMPLE_PER_PARTITION - 1]  # the kept row is one of the 50
    if len(extra) < THIN_AT_LEAST * len(sample):
        return None
    return np.delete(sample, extra, axis=0)


def spherical_kmeans(sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k unit centroids of the unit rows `sample` (FAISS, seeded)."""
    if k == 1:
        return core.unit_rows(sample.mean(axis=0, keepdims=True))
    import faiss

    kmeans = faiss.Kmeans(  # a cut sample (`without_near_copies`) may hold fewer than FAISS's 39 rows a centroid
        sample.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(sample)
    if kmeans.centroids is None:  # only before training, by FAISS's types
        raise UserError("k-means training produced no centroids")
    return core.unit_rows(kmeans.centroids)


def rows_at(emb: EmbDir, units: list[int], positions: np.ndarray) -> np.ndarray:
    """The embedded rows at ascending global `positions` (row order: units in order, ids ascending in each)."""
    picked, offset = [], 0
    for shard in map(emb.read_shard, units):  # checked: finite and unit norm, or the shard is named
        n = len(shard.ids)
        mine = positions[(positions >= offset) & (positions < offset + n)] - offset
        picked.append(shard.embeddings[mine])
        offset += n
    return np.concatenate(picked)


def assign_units(work: WorkDir, emb: EmbDir, units: list[int], centroids: np.ndarray, margin: float) -> int:
    """This rank's units, each written once; how many an interrupted run had done already (they are skipped)."""
    k = len(centroids)
    done = [unit for unit in units if work.unit_done(unit)]
    for unit in units:
        if unit in done:
            continue
        shard = emb.read_shard(unit)
        chunks = range(0, len(shard.ids), ASSIGN_CHUNK)
        for chunk, start in enumerate(chunks):
            vectors, ids = shard.embeddings[start : start + ASSIGN_CHUNK], shard.ids[start : start + ASSIGN_CHUNK]
            assignment = core.assign_partitions(core.unit_rows(vectors), centroids, margin)
            work.write_piece((unit, chunk), *sort_unit(ids, vectors, assignment, k))
        work.finish_unit(unit, len(chunks))
    return len(done)


def find_pairs(
    work: WorkDir,
    reader: PartitionReader,
    partitions: list[int],
    threshold: float,
    centroids: np.ndarray,
    margin: float,
) -> int:
    """This rank's partitions, each written once; how many an interrupted run had done already (they are skipped)."""
    done = [p for p in partitions if work.pairs_done(p)]
    for p in partitions:
        if p in done:
            continue
        members, border = reader.members(p), core.Border(p, centroids, margin)
        work.write_pairs(p, core.joining_pairs(members.vectors, members.ids, members.n_primary, threshold, border))
    return len(done)


def merge(work: WorkDir, emb: EmbDir, plan: RunPlan, draft: DedupResult) -> DedupResult:
    """Rank 0: every partition's pairs, once each, grouped; similarities to the kept ids; the outputs; work gone."""
    start = time.perf_counter()
    parts = list(work.iter_pairs(draft.partitions.count))
    groups = core.group_duplicates(core.Pairs(*(np.concatenate(c) for c in zip(*(part.pairs for part in parts)))))
    needed = np.union1d(groups.ids, groups.kept)
    vectors, paths = rows_with_ids(emb, plan.units, needed, plan.dim)
    similarity = core.row_cosines(
        vectors[np.searchsorted(needed, groups.ids)], vectors[np.searchsorted(needed, groups.kept)]
    )
    draft.timings["merge"] = time.perf_counter() - start
    draft.timings["total"] = sum(draft.timings.values())
    result = replace(
        draft, counts=DedupCounts(plan.n_vectors, len(groups.ids), groups.n_groups, sum(part.found for part in parts))
    )
    write_outputs(result, groups, similarity, paths)
    work.remove()
    return result


def rows_with_ids(emb: EmbDir, units: list[int], ids: np.ndarray, dim: int) -> tuple[np.ndarray, dict[int, str]]:
    """The rows (in the order of ascending `ids`) and the paths of `ids`, streaming the shards once."""
    vectors = np.zeros((len(ids), dim), np.float32)
    paths: dict[int, str] = {}
    for shard in emb.iter_shards(units=units):
        found = np.isin(shard.ids, ids)
        if not found.any():
            continue
        vectors[np.searchsorted(ids, shard.ids[found])] = shard.embeddings[found]
        paths.update((int(i), shard.paths[r]) for r, i in zip(np.flatnonzero(found), shard.ids[found]))
    return vectors, paths
