"""The per-rank embedding loop: read (DataLoader workers decode), map (batched inference), write (one shard per unit).

Every unit is independent and written atomically, so a killed or requeued job redoes at most one unit per rank,
and a re-run may use another world size.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from clip_hpc.cluster.collective import all_or_none, from_root
from clip_hpc.cluster.jobenv import job_env
from clip_hpc.cluster.world import World, world
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir, Manifest
from clip_hpc.ingest.captions import embed_captions
from clip_hpc.ingest.gpu_decode import choose_route, default_batch_size
from clip_hpc.ingest.images import DEFAULT_MAX_PIXELS, DecodeFailure, decode_image
from clip_hpc.ingest.object_store import is_url, require_posix
from clip_hpc.ingest.sources import Listing, WorkUnit, list_inputs, plan_work_units, reconcile_inputs, units_for_rank
from clip_hpc.ingest.tars import (
    CAPTION_READ_BYTES,
    MAX_SIDECAR_BYTES,
    Member,
    TarSample,
    decode_caption,
    decode_meta,
    one_read,
    read_indexed_member,
    read_member,
    sample_meta,
    sample_span,
)


class Extras(NamedTuple):
    """What a shard stores beside an embedding: the caption, the metadata JSON, and a tar member's offset/size."""

    caption: str
    meta: str
    offset: int
    size: int


NO_EXTRAS = Extras("", "", -1, -1)


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
    extra_attrs: dict[str, Any] = field(default_factory=dict)


class ImageDataset(Dataset):
    """Item i -> (global id, pixels or None, failure reason, `Extras`); decoding happens in the worker processes.

    Tar members (`tar_samples`) are read by offset through one open handle per worker: a unit's members are
    contiguous, so each worker reads its tar sequentially and never from the start."""

    def __init__(
        self,
        ids: Sequence[int],
        paths: Sequence[str],
        preprocess: Callable,
        min_size: int,
        max_pixels: int,
        tar_samples: dict[str, TarSample] | None = None,
    ) -> None:
        self.ids, self.paths, self.preprocess = list(ids), list(paths), preprocess
        self.min_size, self.max_pixels = min_size, max_pixels
        self.tar_samples = tar_samples or {}
        self._handle: tuple[str, BinaryIO] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, Extras]:
        """Never raises: whatever goes wrong with one sample (reading, decoding, its sidecars, the transform)
        becomes its recorded failure, with the exception's type in the reason."""
        stage = "read error"
        try:
            if not self.paths[i].isprintable() and _undecodable(self.paths[i]):
                return self.ids[i], None, "name not UTF-8: the index's metadata cannot hold it; rename it", NO_EXTRAS
            source, extras = self._source(self.paths[i])
            if isinstance(source, DecodeFailure):
                return self.ids[i], None, str(source), extras
            stage = "decode error"
            img = decode_image(source, min_size=self.min_size, max_pixels=self.max_pixels)
            if not hasattr(img, "size"):
                return self.ids[i], None, str(img), extras
            stage = "preprocess error"  # e.g. a 1x1 image the transform cannot crop
            return self.ids[i], self.preprocess(img), "", extras
        except Exception as exc:
            return self.ids[i], None, f"{stage}: {type(exc).__name__}: {str(exc)[:120]}", NO_EXTRAS

    def __getitems__(self, positions: list[int]) -> list[tuple[int, torch.Tensor | None, str, Extras]]:
        """A batch (torch's fetcher asks for it whole): the members it reads from one object tar lie together, so
        they come in one ranged GET (64 LAION samples: one request, not 64); a failed prefetch only leaves each
        sample to its own read, which records its failure."""
        groups: dict[str, list[tuple[int, int, int]]] = {}
        for i in positions:
            sample = self.tar_samples.get(self.paths[i])
            if sample is not None and sample.image is not None and not sample.problem and is_url(sample.tar):
                groups.setdefault(sample.tar, []).append(sample_span(sample))
        out = []
        for i in positions:
            sample = self.tar_samples.get(self.paths[i])
            span = one_read(groups.pop(sample.tar)) if sample is not None and sample.tar in groups else None
            if span is not None:
                try:
                    self._tar_handle(sample.tar).prefetch(*span)  # type: ignore[attr-defined]
                except OSError:
                    pass
            out.append(self[i])
        return out

    def _source(self, path: str) -> tuple[str | bytes | DecodeFailure, Extras]:
        """A loose file's path (a loose object's bytes), or a tar member's bytes plus its caption and metadata
        (repairs noted in the meta)."""
        sample = self.tar_samples.get(path)
        if sample is None:
            return (_read_url(path) if is_url(path) else path), NO_EXTRAS
        if sample.problem or sample.image is None:
            return DecodeFailure(sample.problem.split(":")[0], sample.problem.partition(": ")[2]), NO_EXTRAS
        try:
            handle = self._tar_handle(sample.tar)
            span = one_read([sample_span(sample)])
            if span is not None and hasattr(handle, "prefetch"):  # an object: one ranged GET for the whole sample
                handle.prefetch(*span)
            data = read_indexed_member(sample.tar, sample.image, sample.name, handle)  # or ChangedTarError
            caption, notes = self._caption(sample, handle)
            meta, meta_notes = (
                ({}, [f"json: {sample.meta.size} bytes, over the {MAX_SIDECAR_BYTES} read"])
                if sample.meta and sample.meta.size > MAX_SIDECAR_BYTES
                else decode_meta(read_member(sample.tar, sample.meta, handle))
                if sample.meta
                else ({}, [])
            )
        except OSError as exc:
            return DecodeFailure(
                "truncated tar" if "truncated" in str(exc) else "read error", str(exc)[:160]
            ), NO_EXTRAS
        caption = caption or str(meta.get("caption") or "")
        return data, Extras(
            caption, sample_meta(sample, caption, meta, notes + meta_notes), sample.image.offset, sample.image.size
        )

    @staticmethod
    def _caption(sample: TarSample, handle: BinaryIO) -> tuple[str, list[str]]:
        """The caption member, of which at most `CAPTION_READ_BYTES` are read: a megabyte caption is cut, not loaded."""
        if sample.caption is None:
            return "", []
        head = Member(sample.caption.offset, min(sample.caption.size, CAPTION_READ_BYTES))
        return decode_caption(read_member(sample.tar, head, handle), sample.caption.size)

    def _tar_handle(self, tar: str) -> BinaryIO:
        """One open file per worker; an object's handle reads each member with one ranged GET, no readahead."""
        if self._handle is None or self._handle[0] != tar:
            if self._handle is not None:
                self._handle[1].close()
            if is_url(tar):
                from clip_hpc.ingest.object_store import RangedReader

                self._handle = (tar, RangedReader(tar, block=0))  # type: ignore[assignment]
            else:
                self._handle = (tar, open(tar, "rb"))
        return self._handle[1]

    def __getstate__(self) -> dict[str, Any]:  # an open file does not travel to the worker processes
        return {**self.__dict__, "_handle": None}


def _read_url(url: str) -> bytes | DecodeFailure:
    """A loose object's bytes (one GET, retried), or why not: a missing object like a missing file."""
    from clip_hpc.ingest.object_store import read_object

    try:
        return read_object(url)
    except FileNotFoundError:
        return DecodeFailure("missing file", url)
    except OSError as exc:
        return DecodeFailure("read error", str(exc)[:160])


def _undecodable(name: str) -> bool:
    """A name holding bytes that are not UTF-8 (Python's surrogate escapes): inputs.txt and the shards keep it, but
    meta.sqlite (UTF-8 text) cannot, so such a file is a recorded failure, never a crash of `index`."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def collate(items: list[tuple[int, torch.Tensor | None, str, Extras]]) -> dict[str, Any]:
    good = [(i, t, x) for i, t, _, x in items if t is not None]
    return {
        "ids": [i for i, _, _ in good],
        "pixels": torch.stack([t for _, t, _ in good]) if good else None,
        "extras": [x for _, _, x in good],
        "failed": [(i, reason) for i, t, reason, _ in items if t is None],
    }


class UnitBatchSampler(Sampler[list[int]]):
    """Batches never straddle units, so a unit is finished (and written) as soon as its last batch is."""

    def __init__(self, unit_lengths: Sequence[int], batch_size: int) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        offset = 0
        for u, length in enumerate(unit_lengths):
            for s in range(0, length, batch_size):
                self.batches.append((u, list(range(offset + s, offset + min(s + batch_size, length)))))
            offset += length

    def __iter__(self) -> Iterator[list[int]]:
        return (positions for _, positions in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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


def run_settings(cfg: EmbedConfig, w: World) -> dict[str, Any]:
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


def run_units(cfg: EmbedConfig, w: World, loaded: Any, listing: Listing, todo: Sequence[WorkUnit]) -> dict[str, Any]:
    """Embed `todo` and write one shard per unit; returns this rank's counts and timings."""
    stats: dict[str, Any] = {
        "rank": w.rank,
        "host": job_env().nodename,
        "embedded": 0,
        "failed": 0,
        "units": len(todo),
        "seconds": 0.0,
        "reasons": Counter(),
    }
    if not todo:
        return stats
    ids = [i for u in todo for i in u.ids]
    paths = listing.lines
    route = choose_route(cfg.decode, loaded, [paths[i] for i in ids], collate)
    dataset = route.dataset(
        ImageDataset(
            ids,
            [paths[i] for i in ids],
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
    out_dtype = np.float16 if cfg.dtype == "float16" else np.float32
    bar = tqdm(
        total=len(ids),
        unit="img",
        desc=f"embed rank {w.rank}",
        disable=not (cfg.progress and w.is_root),
        file=sys.stderr,
        smoothing=0.1,
    )
    acc: dict[str, list] = _empty_acc()
    t0 = time.perf_counter()
    for (u, _), batch in zip(sampler.batches, route.batches(loader)):  # the device route decodes JPEGs a batch ahead
        if batch["pixels"] is not None:
            image = loaded.encode_images(batch["pixels"])
            acc["emb"].append(image.astype(out_dtype))
            if cfg.captions:
                acc["captions"].append(embed_captions(loaded, [x.caption for x in batch["extras"]], image))
            acc["ids"].extend(batch["ids"])
            acc["extras"].extend(batch["extras"])
        acc["failed"].extend(batch["failed"])
        bar.update(len(batch["ids"]) + len(batch["failed"]))
        unit = todo[u]
        if len(acc["ids"]) + len(acc["failed"]) == len(unit.ids):
            write_unit(cfg, w, loaded, unit, paths, acc, out_dtype)
            stats["embedded"] += len(acc["ids"])
            stats["failed"] += len(acc["failed"])
            stats["reasons"].update(r.split(":")[0] for _, r in acc["failed"])
            acc = _empty_acc()
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _empty_acc() -> dict[str, list]:
    return {"emb": [], "ids": [], "extras": [], "failed": [], "captions": []}


def write_unit(
    cfg: EmbedConfig, w: World, loaded: Any, unit: WorkUnit, paths: Sequence[str], acc: dict[str, list], out_dtype: type
) -> None:
    from clip_hpc.model.loading import precision_name

    emb = np.concatenate(acc["emb"]) if acc["emb"] else np.zeros((0, loaded.dim), out_dtype)
    caption_args = (
        {}
        if not cfg.captions
        else {
            "caption_embeddings": np.concatenate([c.embeddings for c in acc["captions"]]).astype(out_dtype)
            if acc["captions"]
            else np.zeros((0, loaded.dim), out_dtype),
            "similarity": np.concatenate([c.similarity for c in acc["captions"]]) if acc["captions"] else [],
        }
    )
    EmbDir(cfg.out).write_shard(
        unit.index,
        embeddings=emb,
        ids=acc["ids"],
        paths=[paths[i] for i in acc["ids"]],
        captions=[x.caption for x in acc["extras"]],
        meta=[x.meta for x in acc["extras"]],
        offsets=[x.offset for x in acc["extras"]],
        sizes=[x.size for x in acc["extras"]],
        failed_ids=[i for i, _ in acc["failed"]],
        failed_paths=[paths[i] for i, _ in acc["failed"]],
        failed_reasons=[r for _, r in acc["failed"]],
        **caption_args,
        attrs={
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
        },
    )


def format_summary(manifest: Manifest | None, per_rank: list[dict[str, Any]], wall: float) -> str:
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


def embed(cfg: EmbedConfig, w: World | None = None) -> dict[str, Any]:
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
    summary = {"manifest": manifest, "per_rank": per_rank, "complete": complete}
    if w.is_root and per_rank is not None:
        print(format_summary(manifest, per_rank, time.perf_counter() - t0), flush=True)
        if manifest is None:
            print(
                "clip-hpc embed: some units are not done yet (other ranks still running or failed); "
                "re-run the same command to finish",
                file=sys.stderr,
            )
    return summary
