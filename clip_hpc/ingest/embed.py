"""The per-rank embedding loop: read (DataLoader workers decode), map (batched inference), write (one shard per unit).

Every unit is independent and written atomically, so a killed or requeued job redoes at most one unit per rank,
and a re-run may use another world size.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip_hpc.cluster.collective import all_or_none, from_root
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.cluster.world import World, world
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir, Manifest, RunSetting
from clip_hpc.formats.shard import AttrValue, ShardBatch
from clip_hpc.ingest.captions import CaptionRows, embed_captions
from clip_hpc.ingest.gpu_decode import Batch, CpuRoute, DeviceRoute, choose_route, default_batch_size
from clip_hpc.ingest.image_dataset import Extras, ImageDataset, UnitBatchSampler, collate
from clip_hpc.ingest.images import DEFAULT_MAX_PIXELS
from clip_hpc.ingest.object_store import require_posix
from clip_hpc.ingest.sources import Listing, WorkUnit, list_inputs, plan_work_units, reconcile_inputs, units_for_rank

if TYPE_CHECKING:
    from clip_hpc.model.loading import LoadedModel


@dataclass
class EmbedConfig:
    inputs: Sequence[str] = ()
    out: str = "emb"
    file_list: str | None = None
    model: str = "ViT-B-32"
    pretrained: str | None = None
    batch_size: int | None = None  # None: 64 on a CPU, more on a GPU (gpu_decode.default_batch_size)
    workers: int | None = None
    shard_size: int = 10000
    precision: str = "auto"
    device: str = "auto"
    append: bool = False
    dtype: str = "float16"
    max_pixels: int | None = None
    decode: str = "auto"  # auto | cpu | gpu: who decodes JPEGs (ingest/gpu_decode.py)
    progress: bool = True
    captions: bool = False  # also embed each caption with the text tower, and store the image-caption similarity
    extra_attrs: dict[str, AttrValue] = field(default_factory=dict)


def prepare_inputs(cfg: EmbedConfig, w: World) -> Listing:
    """Rank 0 lists and saves inputs.txt; the others get the same list (and the tars' member offsets, which the
    listing found once), so ids agree across the job. A failure on rank 0 (bad input, a read-only --out) reaches
    every rank instead of leaving them waiting."""
    out = EmbDir(cfg.out)

    def listed() -> Listing:
        out.refuse_other_settings(run_settings(cfg, w))  # before inputs.txt (an --append) or any shard changes
        found = list_inputs(cfg.inputs, cfg.file_list)
        saved = out.read_inputs()
        paths = reconcile_inputs(saved, found.lines, cfg.append)
        if w.is_root:
            out.root.mkdir(parents=True, exist_ok=True)
            if paths != saved:
                out.write_inputs(paths)
        return Listing(paths, found.tar_samples)

    return from_root(w, listed)


def run_settings(cfg: EmbedConfig, w: World) -> dict[str, RunSetting]:
    """What this run writes into every shard's attrs that every shard of one EMB_DIR must share
    (`formats.emb_dir.RUN_SETTINGS`); a precision the device cannot have is left to `load_model` to refuse."""
    from clip_hpc.model.loading import ModelError, precision_name, resolve_device, resolve_precision, resolve_pretrained

    try:
        precision: str | None = precision_name(
            resolve_precision(cfg.precision, resolve_device(cfg.device, w.local_rank))
        )
    except ModelError:
        precision = None
    return {
        "model": cfg.model,
        "pretrained": resolve_pretrained(cfg.model, cfg.pretrained),
        "unit_size": cfg.shard_size,
        "dtype": cfg.dtype,
        "precision": precision,
    }


def pending_units(
    out: EmbDir, units: Sequence[WorkUnit], unit_size: int, model: str, pretrained: str, captions: bool = False
) -> list[WorkUnit]:
    """Units whose shard is missing, does not validate (`EmbDir.check_unit`), was made by another model, or (with
    `captions`) lacks the caption embeddings asked for."""
    todo = []
    for unit in units:
        check = out.check_unit(unit.index, unit_size, len(unit.ids))
        if check.ok and check.shard is not None:
            attrs = check.shard.attrs
            if (attrs.get("model"), attrs.get("pretrained")) == (model, pretrained) and (
                check.shard.has_captions or not captions
            ):
                continue
        todo.append(unit)
    return todo


class RankStats(TypedDict):
    """One rank's counts and timings: gathered to rank 0 for the summary (a plain dict on the wire)."""

    rank: int
    host: str
    embedded: int
    failed: int
    units: int
    seconds: float
    reasons: Counter[str]


class EmbedSummary(TypedDict):
    manifest: Manifest | None
    per_rank: list[RankStats] | None
    complete: bool


@dataclass
class UnitBuffer:
    """One unit's results as its batches come in, until the unit is whole and becomes a `ShardBatch`."""

    embeddings: list[np.ndarray] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    extras: list[Extras] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    captions: list[CaptionRows] = field(default_factory=list)

    @property
    def n_done(self) -> int:
        return len(self.ids) + len(self.failed)

    def add(self, batch: Batch, image: np.ndarray | None, captions: CaptionRows | None) -> None:
        if image is not None:
            self.embeddings.append(image)
            self.ids.extend(batch["ids"])
            self.extras.extend(batch["extras"])
        if captions is not None:
            self.captions.append(captions)
        self.failed.extend(batch["failed"])

    def shard_batch(
        self, paths: Sequence[str], dim: int, out_dtype: type, with_captions: bool, attrs: dict[str, AttrValue]
    ) -> ShardBatch:
        """Pure: the shard's content; caption rows only `with_captions` (a unit may have none yet need them)."""
        empty: np.ndarray = np.zeros((0, dim), out_dtype)
        caption_rows = np.concatenate([c.embeddings for c in self.captions]) if self.captions else empty
        return ShardBatch(
            embeddings=np.concatenate(self.embeddings) if self.embeddings else empty,
            ids=self.ids,
            paths=[paths[i] for i in self.ids],
            captions=[x.caption for x in self.extras],
            meta=[x.meta for x in self.extras],
            offsets=[x.offset for x in self.extras],
            sizes=[x.size for x in self.extras],
            identities=[x.identity for x in self.extras],
            failed_ids=[i for i, _ in self.failed],
            failed_paths=[paths[i] for i, _ in self.failed],
            failed_reasons=[r for _, r in self.failed],
            caption_embeddings=caption_rows.astype(out_dtype) if with_captions else None,
            similarity=(np.concatenate([c.similarity for c in self.captions]) if self.captions else [])
            if with_captions
            else None,
            attrs=attrs,
        )


def _loader(
    cfg: EmbedConfig, loaded: LoadedModel, listing: Listing, todo: Sequence[WorkUnit]
) -> tuple[DataLoader, UnitBatchSampler, DeviceRoute | CpuRoute]:
    """The DataLoader over `todo`'s inputs, its sampler (which batch belongs to which unit) and the decode route."""
    ids = [i for u in todo for i in u.ids]
    paths = [listing.lines[i] for i in ids]
    route = choose_route(cfg.decode, loaded, paths, collate)
    dataset = route.dataset(
        ImageDataset(
            ids,
            paths,
            loaded.preprocess,
            loaded.image_size,
            cfg.max_pixels or DEFAULT_MAX_PIXELS,
            listing.tar_samples,
        )
    )
    sampler = UnitBatchSampler([len(u.ids) for u in todo], cfg.batch_size or default_batch_size(loaded.device))
    workers = job_env().dataloader_workers if cfg.workers is None else cfg.workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=route.collate,
        pin_memory=loaded.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    return loader, sampler, route


def run_units(
    cfg: EmbedConfig, w: World, loaded: LoadedModel | None, listing: Listing, todo: Sequence[WorkUnit]
) -> RankStats:
    """Embed `todo` and write one shard per unit (`loaded` is None only when there is nothing to do); returns this
    rank's counts and timings."""
    stats = RankStats(
        rank=w.rank, host=job_env().nodename, embedded=0, failed=0, units=len(todo), seconds=0.0, reasons=Counter()
    )
    if not todo or loaded is None:
        return stats
    loader, sampler, route = _loader(cfg, loaded, listing, todo)
    out_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    bar = tqdm(
        total=sum(len(u.ids) for u in todo),
        unit="img",
        desc=f"embed rank {w.rank}",
        disable=not (cfg.progress and w.is_root),
        file=sys.stderr,
        smoothing=0.1,
    )
    buffer = UnitBuffer()
    t0 = time.perf_counter()
    for (u, _), batch in zip(sampler.batches, route.batches(loader)):  # the device route decodes JPEGs a batch ahead
        image = loaded.encode_images(batch["pixels"]) if batch["pixels"] is not None else None
        captions = (
            embed_captions(loaded, [x.caption for x in batch["extras"]], image)
            if image is not None and cfg.captions
            else None
        )
        buffer.add(batch, None if image is None else image.astype(out_dtype), captions)
        bar.update(len(batch["ids"]) + len(batch["failed"]))
        unit = todo[u]
        if buffer.n_done == len(unit.ids):
            write_unit(cfg, w, loaded, unit, listing.lines, buffer, out_dtype)
            stats["embedded"] += len(buffer.ids)
            stats["failed"] += len(buffer.failed)
            stats["reasons"].update(r.split(":")[0] for _, r in buffer.failed)
            buffer = UnitBuffer()
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def write_unit(
    cfg: EmbedConfig,
    w: World,
    loaded: LoadedModel,
    unit: WorkUnit,
    paths: Sequence[str],
    buffer: UnitBuffer,
    out_dtype: type,
) -> None:
    from clip_hpc.model.loading import precision_name

    attrs: dict[str, AttrValue] = {
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "unit": unit.index,
        "unit_size": cfg.shard_size,
        "unit_start": unit.start,
        "unit_stop": unit.stop,
        "rank": w.rank,
        "dtype": cfg.dtype,
        "precision": precision_name(loaded.dtype),
        **cfg.extra_attrs,
    }
    EmbDir(cfg.out).write_shard(unit.index, buffer.shard_batch(paths, loaded.dim, out_dtype, cfg.captions, attrs))


def format_summary(manifest: Manifest | None, per_rank: Sequence[RankStats], wall: float) -> str:
    """The end-of-run report: what was embedded, what failed and why, and the speed overall and per rank."""
    done = sum(s["embedded"] + s["failed"] for s in per_rank)
    lines = []
    if manifest is not None:
        lines.append(
            f"embedded {manifest.n_embedded} of {manifest.n_inputs} images into "
            f"{len(manifest.shards)} shards, {manifest.n_failed} failed"
        )
        for reason, count in sorted(manifest.failed_by_reason.items()):
            lines.append(f"  failed ({reason}): {count}")
    lines.append(f"this run: {done} images in {wall:.1f} s = {done / wall if wall else 0:.1f} img/s overall")
    for s in per_rank:
        rate = (s["embedded"] + s["failed"]) / s["seconds"] if s["seconds"] else 0.0
        lines.append(
            f"  rank {s['rank']} ({s['host']}): {s['units']} units, {s['embedded']} embedded, "
            f"{s['failed']} failed, {rate:.1f} img/s"
        )
    return "\n".join(lines)


def embed(cfg: EmbedConfig, w: World | None = None) -> EmbedSummary:
    """Embed this rank's share of the inputs, then (rank 0) write manifest.json once every unit is done."""
    from clip_hpc.model.loading import load_model, resolve_pretrained

    w = w or world()
    t0 = time.perf_counter()
    require_posix(cfg.out)
    out = EmbDir(cfg.out)
    if out.root.exists() and not out.root.is_dir():
        raise UserError(f"--out {out.root} exists and is not a directory")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    listing = prepare_inputs(cfg, w)
    paths = listing.lines
    units = plan_work_units(len(paths), cfg.shard_size)
    pretrained = resolve_pretrained(cfg.model, cfg.pretrained)
    mine = units_for_rank(units, w.rank, w.size)
    todo = pending_units(out, mine, cfg.shard_size, cfg.model, pretrained, cfg.captions)
    # every rank must learn of a failure on any rank, or the others would wait forever (cluster/collective.py)
    loaded = all_or_none(
        w, lambda: load_model(cfg.model, cfg.pretrained, cfg.device, cfg.precision, w.local_rank) if todo else None
    )
    if w.is_root:
        print(
            f"clip-hpc embed: {len(paths)} inputs, {len(units)} units of {cfg.shard_size}, {w.size} rank(s) "
            f"[{w.backend}]; rank 0 has {len(todo)} of its {len(mine)} units to do",
            file=sys.stderr,
            flush=True,
        )
    stats = all_or_none(w, lambda: run_units(cfg, w, loaded, listing, todo))  # every rank has finished its units
    per_rank = w.gather(stats)
    manifest = from_root(w, lambda: out.write_manifest(len(units), cfg.shard_size))
    # uncoordinated ranks each did their share; the last one to finish writes the manifest
    complete = manifest is not None or not w.coordinated
    summary = EmbedSummary(manifest=manifest, per_rank=per_rank, complete=complete)
    if w.is_root and per_rank is not None:
        print(format_summary(manifest, per_rank, time.perf_counter() - t0), flush=True)
        if manifest is None:
            print(
                "clip-hpc embed: some units are not done yet (other ranks still running or failed); "
                "re-run the same command to finish",
                file=sys.stderr,
            )
    return summary
