"""Item i of a rank's inputs -> (global id, pixels or None, failure reason, `Extras`), and batches of them.

What the DataLoader's workers run: reading (loose files, objects, tar members by offset) and decoding never raise,
they record a failure; `UnitBatchSampler` keeps every batch inside one work unit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from clip_hpc.formats.input_identity import content_identity, stat_identity
from clip_hpc.formats.tar_member import refusal
from clip_hpc.ingest.gpu_decode import Batch
from clip_hpc.ingest.images import DecodeFailure, decode_image
from clip_hpc.ingest.object_store import is_url
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
    """What a shard stores beside an embedding: the caption, the metadata JSON, a tar member's offset/size, and the
    input's identity (formats/input_identity.py), which the server checks before it sends the bytes."""

    caption: str
    meta: str
    offset: int
    size: int
    identity: str = ""


NO_EXTRAS = Extras("", "", -1, -1)


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
            if sample is not None and span is not None:
                try:
                    self._tar_handle(sample.tar).prefetch(*span)  # type: ignore[attr-defined]  # only tars use spans: a RangedReader
                except OSError:
                    pass
            out.append(self[i])
        return out

    def _source(self, path: str) -> tuple[str | bytes | DecodeFailure, Extras]:
        """A loose file's path (a loose object's bytes), or a tar member's bytes plus its caption and metadata
        (repairs noted in the meta)."""
        sample = self.tar_samples.get(path)
        if sample is None:
            why = refusal(path)
            return (DecodeFailure("refused name", why), NO_EXTRAS) if why else _loose(path)
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
        meta_json = sample_meta(sample, caption, meta, notes + meta_notes)
        return data, Extras(caption, meta_json, sample.image.offset, sample.image.size, content_identity(data))

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

                handle: BinaryIO = RangedReader(tar, block=0)  # type: ignore[assignment]  # reads like a file
            else:
                handle = open(tar, "rb")
            self._handle = (tar, handle)
        return self._handle[1]

    def __getstate__(self) -> dict[str, Any]:  # an open file does not travel to the worker processes
        return {**self.__dict__, "_handle": None}


def _loose(path: str) -> tuple[str | bytes | DecodeFailure, Extras]:
    """A loose object's bytes, or a local file's path (decoded lazily), with its identity: the bytes' digest, or the
    file's size and mtime (a file that cannot be stat'ed fails when it is decoded, as before)."""
    if is_url(path):
        data = _read_url(path)
        return data, NO_EXTRAS if isinstance(data, DecodeFailure) else NO_EXTRAS._replace(
            identity=content_identity(data)
        )
    try:
        return path, NO_EXTRAS._replace(identity=stat_identity(os.stat(path)))
    except OSError:
        return path, NO_EXTRAS


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


Item = tuple[int, torch.Tensor | None, str, Extras]


def collate(items: list[Item]) -> Batch:
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
