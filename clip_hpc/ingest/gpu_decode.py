"""JPEG decode on the model's device (nvJPEG through torchvision's batched `decode_jpeg`), a route of the embed loop.

On a GPU node the CPU workers' decode, not inference, bounds throughput: the workers then only read bytes, and the
main process decodes a batch of JPEGs on the GPU and resizes, crops and normalises them there. Anything the GPU
route cannot take exactly (PNG, CMYK/Adobe, progressive, EXIF-rotated, truncated, over the pixel bound, or a decode
error) goes through the dataset's own CPU path item by item, so failure records are the CPU route's, byte for byte.
"""

from __future__ import annotations

import queue
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypedDict, TypeVar

import torch
from torch.utils.data import Dataset

from clip_hpc.errors import UserError

if TYPE_CHECKING:
    from clip_hpc.model.loading import LoadedModel

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
BASELINE_SOF = (0xC0, 0xC1)  # Huffman baseline and extended sequential: what nvJPEG's batched decode takes
OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # progressive, lossless, arithmetic
ADOBE_APP14, EXIF_APP1, SOS = 0xEE, 0xE1, 0xDA
DECODE_CHOICES = ("auto", "cpu", "gpu")
CPU_BATCH_SIZE = 64
GPU_BATCH_SIZE = 256  # ViT-B-32 in bf16 on one large GPU: big enough to keep it busy, small enough for prefetch
PREFETCH_BATCHES = 2  # device-decoded batches ready ahead of inference (each ~150 MB of float32 at 256 x 224^2)
T = TypeVar("T")


class Batch(TypedDict):
    """What the loop gets per batch (`image_dataset.collate`): embedded ids, their pixels (None: every item failed),
    their `Extras`, and (id, reason) of each failure. A dict, which DataLoader workers and pinning pass as is."""

    ids: list[int]
    pixels: Any  # a stacked tensor; in `collate_mixed`'s batch, a list of tensors and `RawJpeg`s until `finish`
    extras: list[Any]
    failed: list[tuple[int, str]]


class CpuDataset(Protocol):
    """What the route needs from `image_dataset.ImageDataset` (a Protocol, so this module never imports embed)."""

    ids: list[int]
    paths: list[str]
    min_size: int
    max_pixels: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, Any]: ...

    def _source(self, path: str) -> tuple[Any, Any]: ...


class RawJpeg(NamedTuple):
    """A JPEG the device will decode: its position in the dataset (for the CPU fallback) and its bytes."""

    position: int
    data: torch.Tensor


# --- which bytes the device decodes ------------------------------------------------------------------------------
def _exif_orientation(segment: bytes) -> int:
    """The EXIF orientation in an APP1 payload (1, upright, when absent or unreadable)."""
    if not segment.startswith(b"Exif\0\0") or len(segment) < 14:
        return 1
    tiff = segment[6:]
    endian = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for k in range(count):
            tag, _, _, value = struct.unpack_from(endian + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return value
    except struct.error:
        return 0  # unreadable EXIF: let PIL decide
    return 1


def gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """True for a complete baseline JPEG with 1 or 3 components, no Adobe transform, upright, within `max_pixels`:
    the ones nvJPEG decodes to the same pixels PIL would. A header scan only; the rest go to the CPU path."""
    if len(data) < 4 or data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return False  # not a JPEG, or truncated (PIL records those)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        payload = data[pos + 4 : pos + 2 + length]
        if marker in BASELINE_SOF:
            if len(payload) < 6:
                return False
            height, width = struct.unpack_from(">HH", payload, 1)
            return payload[5] in (1, 3) and 0 < width * height <= max_pixels
        if marker in OTHER_SOF or marker in (ADOBE_APP14, SOS):
            return False
        if marker == EXIF_APP1 and _exif_orientation(payload) != 1:
            return False
        pos += 2 + length
    return False


def default_batch_size(device: torch.device) -> int:
    """Batches sized to the device: a GPU needs a few hundred images in flight to stay busy; a CPU gains nothing."""
    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def looks_jpeg(path: str) -> bool:
    return path.lower().endswith(JPEG_SUFFIXES)


# --- the device half: decode, resize, crop, normalise --------------------------------------------------------------
class DevicePreprocess:
    """open_clip's eval transform (shortest-side resize, centre crop, normalise) on decoded uint8 tensors, batched
    over images of one size. PIL resizes in uint8 then crops: rounding and crop offsets follow torchvision's."""

    def __init__(self, cfg: dict[str, Any], device: torch.device) -> None:
        size = cfg.get("size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mode = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        self.device = device
        self._mean_std: tuple[torch.Tensor, torch.Tensor] | None = None  # moved to the device on first use
        self.cfg_mean_std = cfg["mean"], cfg["std"]

    @staticmethod
    def supports(cfg: dict[str, Any]) -> bool:
        return (
            cfg.get("resize_mode", "shortest") == "shortest"
            and cfg.get("interpolation", "bicubic") in ("bicubic", "bilinear")
            and cfg.get("mode", "RGB") == "RGB"
            and "mean" in cfg
            and "std" in cfg
        )

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation constants in uint8 units, on the device."""
        if self._mean_std is None:
            mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) * 255.0 for v in self.cfg_mean_std)
            self._mean_std = mean, std
        return self._mean_std

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) uint8 images in, (N, 3, size, size) float32 out, in the same order."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, image in enumerate(images):
            h, w = image.shape[-2:]
            groups.setdefault((h, w), []).append(k)
        for (h, w), members in groups.items():
            x = torch.stack([images[k] for k in members]).float()
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
            if (new_h, new_w) != (h, w):
                x = (
                    torch.nn.functional.interpolate(
                        x, size=(new_h, new_w), mode=self.mode, antialias=True, align_corners=False
                    )
                    .clamp_(0, 255)
                    .round_()
                )
            top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
            mean, std = self.mean_std()
            x = (x[..., top : top + self.size, left : left + self.size] - mean) / std
            for k, row in zip(members, x):
                out[k] = row
        return torch.stack(out)  # type: ignore[arg-type]  # every slot was filled by one of the two routes above


def decode_on_device(jpegs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Batched `decode_jpeg` on `device`; when the batch fails, one by one, so a bad image costs only itself (None)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        return []
    with warnings.catch_warnings():  # torchvision >= 0.29 flags its decoders deprecated (for TorchCodec) on each call
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode(jpegs, device, decode_jpeg, ImageReadMode.RGB)


def _decode(
    jpegs: Sequence[torch.Tensor], device: torch.device, decode_jpeg: Callable, rgb: Any
) -> list[torch.Tensor | None]:
    try:
        return list(decode_jpeg(list(jpegs), mode=rgb, device=device))
    except Exception:  # nvJPEG and libjpeg raise RuntimeError; a decoder bug must cost one image, not the run
        decoded: list[torch.Tensor | None] = []
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=rgb, device=device))
            except Exception:
                decoded.append(None)
        return decoded


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items` produced by a thread up to `depth` ahead of the consumer; its exception is raised in the consumer,
    and a consumer that stops early stops the thread at its next item."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(("error", exc))

    threading.Thread(target=produce, name="device-decode", daemon=True).start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


# --- the route: dataset, collate, finish ---------------------------------------------------------------------------
class DeviceJpegDataset(Dataset):
    """The CPU dataset's items, except that a JPEG the device can decode comes back as `RawJpeg` bytes."""

    def __init__(self, inner: CpuDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | RawJpeg | None, str, Any]:
        source, extras = self.inner._source(self.inner.paths[i])
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else _read_file(source)
        if data is None or not gpu_decodable(data, self.inner.max_pixels):
            return self.inner[i]  # the CPU path, and its failure record, unchanged
        return self.inner.ids[i], RawJpeg(i, torch.frombuffer(bytearray(data), dtype=torch.uint8)), "", extras


def _read_file(source: Any) -> bytes | None:
    if not isinstance(source, str):
        return None
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError:
        return None


def collate_mixed(items: list[tuple[int, Any, str, Any]]) -> Batch:
    """`image_dataset.collate`'s batch, `pixels` a list (tensors and `RawJpeg`s) that `DeviceRoute.finish` stacks."""
    good = [(i, t, x) for i, t, _, x in items if t is not None]
    return {
        "ids": [i for i, _, _ in good],
        "pixels": [t for _, t, _ in good] or None,
        "extras": [x for _, _, x in good],
        "failed": [(i, reason) for i, t, reason, _ in items if t is None],
    }


class DeviceRoute:
    """Workers read bytes; `finish` decodes a batch's JPEGs on the model's device and sends the others (and any the
    device could not decode) through the CPU dataset in this process."""

    def __init__(self, device: torch.device, preprocess_cfg: dict[str, Any]) -> None:
        self.device = device
        self.preprocess = DevicePreprocess(preprocess_cfg, device)
        self.inner: CpuDataset | None = None
        self.collate: Callable[[list[Any]], Batch] = collate_mixed

    def dataset(self, inner: CpuDataset) -> Dataset:
        self.inner = inner
        return DeviceJpegDataset(inner)

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """The loader's batches finished one step ahead in a thread: the next batch's decode overlaps this one's
        inference (the GPU work shares a stream; the host work, and the wait for the GPU, overlap)."""
        return prefetched(map(self.finish, loader), PREFETCH_BATCHES)

    def finish(self, batch: Batch) -> Batch:
        items = batch["pixels"] or []
        raw = [k for k, t in enumerate(items) if isinstance(t, RawJpeg)]
        decoded = dict(zip(raw, decode_on_device([items[k].data for k in raw], self.device)))
        ready = {k: image for k, image in decoded.items() if image is not None}
        on_device = dict(zip(ready, self.preprocess(list(ready.values())))) if ready else {}
        ids, pixels, extras, failed = [], [], [], list(batch["failed"])
        for k, item in enumerate(items):
            if isinstance(item, RawJpeg) and k not in on_device:
                assert self.inner is not None
                _, item, reason, _ = self.inner[item.position]  # the device could not: the CPU path decides
                if item is None:
                    failed.append((batch["ids"][k], reason))
                    continue
            pixels.append(on_device[k] if k in on_device else item.to(self.device, non_blocking=True))
            ids.append(batch["ids"][k])
            extras.append(batch["extras"][k])
        return {"ids": ids, "pixels": torch.stack(pixels) if pixels else None, "extras": extras, "failed": failed}


class CpuRoute:
    """Workers decode and preprocess (the project's default); batches pass through unchanged."""

    def __init__(self, collate: Callable[[list[Any]], Batch]) -> None:
        self.collate = collate

    def dataset(self, inner: CpuDataset) -> Dataset:
        return inner  # type: ignore[return-value]  # map-style by protocol (__getitem__, __len__), not a subclass

    def batches(self, loader: Iterable[Batch]) -> Iterable[Batch]:
        return loader  # the DataLoader's workers already run ahead of the loop


def choose_route(
    decode: str, loaded: LoadedModel, paths: Sequence[str], collate: Callable[[list[Any]], Batch]
) -> DeviceRoute | CpuRoute:
    """`cpu`: workers decode. `gpu`: the device decodes JPEGs (on a CPU device, the same code through torchvision's
    CPU decoder: what the tests run). `auto`: the device route where it wins, a CUDA model and mostly JPEG inputs."""
    if decode not in DECODE_CHOICES:
        raise UserError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
    cfg = dict(getattr(loaded.model.visual, "preprocess_cfg", {}) or {})
    supported = DevicePreprocess.supports(cfg)
    if decode == "gpu" and not supported:
        raise UserError(
            f"--decode gpu: model {loaded.name}'s preprocessing ({cfg.get('resize_mode')}, "
            f"{cfg.get('interpolation')}) has no device version; use --decode cpu"
        )
    mostly_jpeg = sum(map(looks_jpeg, paths)) * 2 >= len(paths) > 0
    if decode == "gpu" or (decode == "auto" and supported and loaded.device.type == "cuda" and mostly_jpeg):
        return DeviceRoute(loaded.device, cfg)
    return CpuRoute(collate)
