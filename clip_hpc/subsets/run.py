"""`filter_subset`: the whole filter job on every rank, in collective steps (cluster/collective.py), so a failure on
any rank stops every rank with one line.

    rank 0: read the manifest, encode the queries with the recorded model, claim --out   (from_root)
    every rank: scan its units u % W == r that have no part yet, one part per unit      (all_or_none)
    rank 0: merge the parts into results.parquet, paths.txt ...                         (from_root)
    every rank: write its tars t % W == r that do not exist yet (--to tars)             (all_or_none)
    rank 0: filter.json                                                                 (from_root)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from clip_hpc.cluster.collective import all_or_none, from_root
from clip_hpc.cluster.world import World, world
from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import atomic_write_bytes
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.shard import ShardError
from clip_hpc.formats.shard_columns import scan_problem
from clip_hpc.formats.span_read import node_memory
from clip_hpc.subsets.options import FilterOptions, FilterResult, Settings, goes_around_cache
from clip_hpc.subsets.out_dir import RESULTS_FILE, SKIPPED_FILE, OutDir, parquet_bytes, read_parquet
from clip_hpc.subsets.outputs import select_results, write_outputs, write_report
from clip_hpc.subsets.queries import QueryVectors, encode_queries
from clip_hpc.subsets.scan import read_ahead, scan_unit
from clip_hpc.subsets.scoring import pinned_buffers
from clip_hpc.subsets.subset_dedup import drop_duplicates
from clip_hpc.subsets.tars import Sample, Skipped, gather_skipped, tar_numbers, write_tar

UNUSABLE_LISTED = 1000  # ids of unusable rows filter.json lists (all are counted)


@dataclass(frozen=True)
class Plan:
    """What rank 0 found and every rank scans with."""

    settings: Settings
    queries: QueryVectors
    shards: dict[int, str]  # unit -> its shard file
    rows: dict[int, int]  # unit -> its embedded rows
    unit_size: int  # ids per unit: unit u holds ids in [u * unit_size, (u + 1) * unit_size)
    dim: int


class StepStats(NamedTuple):
    """One rank's share of a step: items done this run, items found done, the rows or samples it handled, seconds."""

    done: int
    skipped: int
    items: int
    seconds: float


def _bar(options: FilterOptions, w: World, total: int, unit: str, desc: str) -> tqdm:
    return tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc=desc,
        disable=not (options.progress and w.is_root),
        file=sys.stderr,
        smoothing=0.1,
    )


def plan_exact(options: FilterOptions) -> Plan:
    """Rank 0: the EMB_DIR's whole units (its manifest), the queries, and --out claimed for these settings."""
    emb = EmbDir(options.source)
    manifest = emb.load_manifest()
    if manifest is None or manifest.model is None:
        raise UserError(f"{emb.root} has no manifest.json: not every unit is embedded yet (finish clip-hpc embed)")
    if options.min_caption_similarity is not None and not manifest.n_captioned:
        raise UserError(
            f"{emb.root} holds no caption embeddings (embedded without embed --captions, or no image had a caption): "
            "--min-caption-similarity would keep nothing"
        )
    settings = Settings.of(options, manifest.inputs_sha256, manifest.model, str(manifest.pretrained), exact=True)
    out = OutDir(options.out)
    out.claim(settings)
    out.remove_stale_temp_files()
    queries = encode_queries(
        settings.model,
        settings.pretrained,
        options.texts,
        options.images,
        options.negatives,
        options.device,
        manifest.dim,
    )
    return Plan(
        settings,
        queries,
        {e.unit: str(emb.shard_path(e.unit)) for e in manifest.shards},
        {e.unit: e.n for e in manifest.shards},
        manifest.unit_size,
        int(manifest.dim or 0),
    )


def scan_units(options: FilterOptions, plan: Plan, w: World) -> StepStats:
    """This rank's units without a part: scanned, each part written atomically as soon as its unit is done."""
    from clip_hpc.model.loading import resolve_device

    out = OutDir(options.out)
    found = resolve_device(options.device, w.local_rank)
    device = str(found) if found.type == "cuda" else None
    mine = [u for u in sorted(plan.shards) if u % w.size == w.rank]
    todo = [u for u in mine if not out.part_path(u).exists()]
    bar = _bar(options, w, sum(plan.rows[u] for u in todo), "vec", f"filter rank {w.rank}")
    pa.array(np.zeros(1))  # pyarrow imports pandas on first use (a second): not inside the timed scan
    widest = 2 * plan.dim * max((plan.rows[u] for u in todo), default=0)  # float16 bytes of the largest shard
    pinned = pinned_buffers(widest) if device is not None and todo else None
    around = goes_around_cache(options.page_cache, 2 * plan.dim * sum(plan.rows.values()), node_memory())
    t0, rows = time.perf_counter(), 0
    with one_cpu_thread(device is None), ThreadPoolExecutor(1) as writer:  # a part's fsync waits behind the reads
        written = []
        for unit, (shard, columns) in zip(todo, read_ahead([plan.shards[u] for u in todo], pinned, around)):
            problem = scan_problem(columns, unit * plan.unit_size, plan.unit_size, plan.rows[unit], plan.dim)
            if problem:
                raise ShardError(f"{shard}: {problem}: it changed after the manifest; re-run clip-hpc embed")
            table, n, unusable = scan_unit(shard, columns, plan.queries, plan.settings, device)
            written.append(writer.submit(out.write_part, unit, table, n, unusable))
            rows += n
            bar.update(n)
        for part in written:
            part.result()  # an error writing a part stops the rank once the scan is through (it stopped at once when
            # the parts were written inline); the parts written before it stand, so a re-run skips their units
    bar.close()
    return StepStats(len(todo), len(mine) - len(todo), rows, time.perf_counter() - t0)


@contextlib.contextmanager
def one_cpu_thread(on_cpu: bool) -> Iterator[None]:
    """The CPU scan's products on one torch thread: its cache-sized blocks are too small to share out (two threads
    were 30x slower on a busy node), and the reader thread keeps another core busy. More ranks use more cores."""
    import torch

    before = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Merged(NamedTuple):
    """Rank 0's merge: rows scanned, rows kept, near-duplicates dropped (--dedup), the files written, and the rows
    left out as unusable (no direction): how many, and the first `UNUSABLE_LISTED` of their ids."""

    scanned: int
    kept: int
    duplicates: int
    files: list[str]
    unusable: int
    unusable_ids: list[int]


def merge_parts(options: FilterOptions, plan: Plan) -> Merged | None:
    """Rank 0: every part joined into the outputs, less the subset's near-duplicates with --dedup; None while a unit
    has no part (ranks that cannot talk finish at different times: the last one's run merges)."""
    out = OutDir(options.out)
    if any(not out.part_path(u).exists() for u in plan.shards):
        return None
    top, tables, rows, scanned, unusable = plan.settings.top, [], 0, 0, 0
    unusable_ids: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (unit, lowest id, highest id) of each part with rows, for --dedup
    for unit in sorted(plan.shards):
        table, n, unusable_here = out.read_part(unit)
        tables.append(table)
        unusable += len(unusable_here)
        unusable_ids.extend(unusable_here[: max(0, UNUSABLE_LISTED - len(unusable_ids))])
        if len(table):
            ids = table.column("id")
            spans.append((unit, pc.min(ids).as_py(), pc.max(ids).as_py()))
        rows, scanned = rows + len(table), scanned + n
        if top is not None and rows > 4 * top:  # a few top-Ns in memory at most, however many units
            tables = [select_results(tables, top)]
            rows = len(tables[0])
    results, duplicates = select_results(tables, top), 0
    if plan.settings.dedup is not None:
        emb = EmbDir(options.source)
        results, duplicates = drop_duplicates(results, emb, spans, plan.queries.positives.shape[1], plan.settings.dedup)
    files = write_outputs(out, results, options.to)
    return Merged(scanned, len(results), duplicates, files, unusable, unusable_ids)


def write_tars(options: FilterOptions, w: World) -> StepStats:
    """This rank's tars that do not exist yet, from results.parquet (the same on every rank); ranks that cannot talk
    leave every tar to the one that merged (the last to finish its scan)."""
    out = OutDir(options.out)
    results = read_parquet(out.path(RESULTS_FILE))
    per_tar = options.samples_per_tar
    rank, size = (w.rank, w.size) if w.coordinated else (0, 1)
    mine = tar_numbers(len(results), per_tar, rank, size)
    todo = [t for t in mine if not out.tar_path(t).exists()]
    n_samples = sum(len(results.slice(t * per_tar, per_tar)) for t in todo)
    bar = _bar(options, w, n_samples, "img", f"tars rank {w.rank}")
    t0 = time.perf_counter()
    for number in todo:
        rows = results.slice(number * per_tar, per_tar).to_pylist()  # one tar's rows in memory at a time
        samples = [Sample(*(r[name] for name in Sample._fields)) for r in rows]
        write_tar(out.tar_path(number), samples, number * per_tar, lambda: bar.update(1))
    bar.close()
    return StepStats(len(todo), len(mine) - len(todo), n_samples, time.perf_counter() - t0)


def record_skipped(out: OutDir, n_tars: int) -> int:
    """Rank 0: every tar's skipped samples in skipped.parquet (none: no file), counted; a resumed run counts those
    of the tars an earlier run wrote too."""
    skipped = gather_skipped([out.tar_path(t) for t in range(n_tars)])
    out.path(SKIPPED_FILE).unlink(missing_ok=True)
    if skipped:
        table = pa.table({name: [getattr(s, name) for s in skipped] for name in Skipped._fields})
        atomic_write_bytes(out.path(SKIPPED_FILE), parquet_bytes(table))
    return len(skipped)


def _total(per_rank: list[StepStats] | None) -> StepStats:
    ranks = per_rank or []
    return StepStats(
        sum(s.done for s in ranks),
        sum(s.skipped for s in ranks),
        sum(s.items for s in ranks),
        max((s.seconds for s in ranks), default=0.0),
    )


def report(options: FilterOptions, settings: Settings, result: FilterResult, w: World) -> dict[str, Any]:
    """filter.json: what was asked, with what model, what came out, how long it took."""
    return {
        "format": "clip-hpc-filter",
        "source": settings.source,
        "exact": result.exact,
        "model": settings.model,
        "pretrained": settings.pretrained,
        "queries": {"texts": settings.texts, "images": settings.images, "negatives": settings.negatives},
        "threshold": settings.threshold,
        "top": settings.top,
        "min_caption_similarity": settings.min_caption_similarity,
        "dedup": settings.dedup,
        "samples_per_tar": settings.samples_per_tar if "tars" in options.to else None,
        "ranks": w.size,
        "counts": {
            "scanned": result.n_scanned,
            "kept": result.n_kept,
            "duplicates_dropped": result.n_duplicates,
            "units": result.n_units,
            "units_skipped": result.n_units_skipped,
            "tars": result.n_tars,
            "tars_skipped": result.n_tars_skipped,
            "samples_skipped": result.n_samples_skipped,
            "unusable_vectors": result.n_unusable,
        },
        "unusable_ids": result.unusable_ids,
        "timings": result.timings,
        "outputs": result.files,
    }


def filter_subset(options: FilterOptions, w: World | None = None) -> FilterResult:
    """The subset of `options.source` the queries select, written under `options.out` (see the module doc)."""
    w = w or world()
    t0 = time.perf_counter()
    options.check()
    source = Path(options.source)
    if not EmbDir(source).looks_like_one():
        if IndexDir(source).looks_like_one():
            from clip_hpc.subsets.preview import preview_subset

            if options.dedup is not None:
                raise UserError("--dedup needs an EMB_DIR source (exact vectors), not the INDEX_DIR preview")

            return preview_subset(options, w)
        raise UserError(f"{source} is neither an EMB_DIR (clip-hpc embed --out) nor an INDEX_DIR (clip-hpc index)")
    plan = from_root(w, lambda: plan_exact(options))
    t_plan = time.perf_counter()
    scan = _total(w.gather(all_or_none(w, lambda: scan_units(options, plan, w))))
    t_scan = time.perf_counter()
    merged = from_root(w, lambda: merge_parts(options, plan))
    t_merge = time.perf_counter()
    if merged is None:  # only ranks that cannot talk get here: the last one to finish merges
        print("clip-hpc filter: other ranks are still scanning; the last to finish writes the outputs", file=sys.stderr)
        return FilterResult(options.out, True, 0, 0, len(plan.shards), scan.skipped, complete=False)
    result = FilterResult(
        options.out,
        True,
        merged.scanned,
        merged.kept,
        len(plan.shards),
        scan.skipped,
        n_duplicates=merged.duplicates,
        files=merged.files,
        n_unusable=merged.unusable,
        unusable_ids=merged.unusable_ids,
    )
    timings = {
        "plan_s": t_plan - t0,
        "scan_s": t_scan - t_plan,
        "scan_vectors_per_s": scan.items / scan.seconds if scan.seconds else 0.0,
        "merge_s": t_merge - t_scan,
    }
    finish(options, plan.settings, result, w, t0, timings)
    return result


def finish(
    options: FilterOptions, settings: Settings, result: FilterResult, w: World, t0: float, timings: dict[str, float]
) -> None:
    """The tars (every rank) and filter.json (rank 0), shared by the exact run and the index preview."""
    if "tars" in options.to:
        t_tars = time.perf_counter()
        tars = _total(w.gather(all_or_none(w, lambda: write_tars(options, w))))
        result.n_tars, result.n_tars_skipped = tars.done + tars.skipped, tars.skipped
        result.n_samples_skipped = from_root(w, lambda: record_skipped(OutDir(options.out), result.n_tars))
        if result.n_samples_skipped:
            result.files.append(SKIPPED_FILE)
        timings["tars_s"] = time.perf_counter() - t_tars
        timings["tar_images_per_s"] = tars.items / tars.seconds if tars.seconds else 0.0
        result.files.append("tars/")
    result.timings = {**timings, "total_s": time.perf_counter() - t0}
    from_root(w, lambda: write_report(OutDir(options.out), report(options, settings, result, w)))
