"""open_clip loading by name plus pretrained tag, local checkpoint or `none`, without ever surprising a
compute node with a download: missing weights become a one-line error that says how to prefetch them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clip_hpc.errors import UserError
from clip_hpc.model.open_clip_types import OpenClipModel
from clip_hpc.model.text_context import TextContext, choose_text_context
from clip_hpc.model.weights_cache import offline, url_weights_missing, weights_dir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = {"ViT-B-32": "laion2b_s34b_b79k"}
BUNDLED_TAG = "bundled"  # the pretrained tag of a model's shipped weights, read through the weights cache
RANDOM_SEED = 0  # random weights are seeded so that every rank builds the same model


class ModelError(UserError):
    """The model cannot be loaded; the message is one line the user can act on."""


def register_model_configs() -> None:
    """Make the configs shipped in the package (clip-hpc-tiny, clip-hpc-demo) known to open_clip by name, and the
    shipped weights a pretrained tag, BUNDLED_TAG, fetched (copied) into a cache like any other: the offline path
    of `fetch-model` and the jobs is then testable without a download."""
    import open_clip
    from open_clip import pretrained as open_clip_pretrained

    if "clip-hpc-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    for name in ("clip-hpc-demo",):
        checkpoint = bundled_checkpoint(name)
        if checkpoint is not None:  # open_clip has no public call to register a tag
            open_clip_pretrained._PRETRAINED.setdefault(name, {})[BUNDLED_TAG] = {"url": checkpoint.as_uri()}


def bundled_checkpoint(name: str) -> Path | None:
    """Models trained by this project ship their weights inside the package (see scripts/train_demo_model.py)."""
    for ext in (".safetensors", ".pt"):
        path = WEIGHTS_DIR / f"{name}{ext}"
        if path.exists():
            return path
    return None


def looks_like_checkpoint(pretrained: str) -> bool:
    """A file path rather than an open_clip tag: it exists, has a directory part or a checkpoint's suffix."""
    path = Path(pretrained).expanduser()
    return path.exists() or os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors")


def resolve_pretrained(name: str, pretrained: str | None) -> str:
    """`None` means the model's natural default: its bundled weights, its well-known tag, else random. A checkpoint
    path comes back absolute: shards and index.json record it, a resumed job compares it, and serve may run from
    another directory (`ckpt.pt` then `/abs/ckpt.pt` were two models, and a resume refused its own weights)."""
    if pretrained not in (None, "", "default"):
        pretrained = str(pretrained)
        if pretrained.lower() != "none" and looks_like_checkpoint(pretrained):
            return str(Path(pretrained).expanduser().resolve())
        return pretrained
    bundled = bundled_checkpoint(name)
    if bundled is not None:
        return str(bundled)
    return DEFAULT_PRETRAINED.get(name, "none")


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks the GPU of this local rank, so that N ranks on a node use N GPUs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: choose auto, fp32, fp16 or bf16")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The --precision value that computes in `dtype` (what a shard records, so runs of two precisions never mix)."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


@dataclass
class LoadedModel:
    """A CLIP model ready for inference, with the matching preprocessing and tokenizer."""

    model: OpenClipModel
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    name: str
    pretrained: str
    dim: int
    image_size: int
    text_context: TextContext = TextContext(False, "not checked")  # short (exact) or full context for text

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels in, L2-normalised float32 embeddings out."""
        with self._autocast():
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalise(feats)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = self.text_context.encode(self.model, tokens)
        return _normalise(feats)


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict, `{'state_dict': ...}` with DDP `module.` prefixes, or safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} holds no state_dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def fetch_hint(name: str, tag: str) -> str:
    cache = weights_dir()
    if cache:
        return (
            f"looked in {cache} (CLIP_HPC_WEIGHTS); on a node with internet run: clip-hpc fetch-model {name} {tag} "
            f"--cache-dir {cache} (or --profile PROFILE, the job's)"
        )
    return (
        f"on a node with internet run: clip-hpc fetch-model {name} {tag} [--profile PROFILE], "
        f"then give jobs the same CLIP_HPC_WEIGHTS (a profile sets it) and HF_HUB_OFFLINE=1"
    )


class _FromOpenClip(logging.Filter):
    """Drops records logged from open_clip's source files (it logs through the root logger, not its own)."""

    def __init__(self, package_dir: str) -> None:
        super().__init__()
        self.package_dir = package_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.package_dir)


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's chatter ("initialized randomly" for `none`, tokenizer notes) while it runs, leaving the root
    logger's level and handlers as they were; a NullHandler stands in meanwhile so `logging.warning` cannot
    basicConfig."""
    import open_clip

    root = logging.getLogger()
    quiet = _FromOpenClip(os.path.dirname(open_clip.__file__) + os.sep)
    stand_in = logging.NullHandler() if not root.handlers else None
    root.addFilter(quiet)
    if stand_in is not None:
        root.addHandler(stand_in)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        if stand_in is not None:
            root.removeHandler(stand_in)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global RNG seeded with `seed` inside, as it was outside (state and `initial_seed()`): open_clip
    initialises weights from the global RNG, and a library call must not reseed its caller's."""
    with torch.random.fork_rng(devices=[]):  # model construction is on the CPU: no CUDA generator to fork
        torch.manual_seed(seed)
        yield


def _create(name: str) -> OpenClipModel:
    """Seeded construction: with `--pretrained none` every rank (every process, every call) builds the same model."""
    import open_clip

    with seeded(RANDOM_SEED):
        return open_clip.create_model(name, pretrained=None)


def _cached_tag_path(name: str, tag: str) -> str:
    """Find (or, with internet, fetch) the weights of a pretrained tag before building anything."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(
            f"{tag!r} is neither a file nor a pretrained tag of {name} (tags: {', '.join(tags) or 'none'}; "
            f"or use --pretrained none)"
        )
    cache = weights_dir()
    missing = url_weights_missing(cfg, cache) if offline() else None
    if missing:  # open_clip would download it, HF_HUB_OFFLINE or not
        raise ModelError(f"weights {name}/{tag} are not in the local cache ({missing}); {fetch_hint(name, tag)}")
    try:
        path = download_pretrained(cfg, cache_dir=cache)
    except Exception as exc:
        raise ModelError(
            f"weights {name}/{tag} are not in the local cache and cannot be downloaded "
            f"({type(exc).__name__}); {fetch_hint(name, tag)}"
        ) from None
    if not path:
        raise ModelError(f"weights {name}/{tag} not found; {fetch_hint(name, tag)}")
    return str(path)


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    local_rank: int = 0,
    *,
    full_context: bool = False,
) -> LoadedModel:
    """Build the model and load its weights from a tag, a file, or nowhere (`none`, seeded random).
    Text is encoded at the short context where that is exact (see text_context.py), unless `full_context`."""
    with quiet_open_clip():
        return _build(name, pretrained, device, precision, local_rank, full_context)


def _build(
    name: str, pretrained: str | None, device: str, precision: str, local_rank: int, full_context: bool = False
) -> LoadedModel:
    import open_clip

    pretrained = resolve_pretrained(name, pretrained)
    dev = resolve_device(device, local_rank)
    dtype = resolve_precision(precision, dev)
    register_model_configs()
    if name not in open_clip.list_models():
        raise ModelError(
            f"unknown model {name!r}; known: clip-hpc-tiny, clip-hpc-demo, ViT-B-32, ... "
            f"(python -c 'import open_clip; print(open_clip.list_models())')"
        )
    state, tag_path = None, None
    if pretrained.lower() != "none":
        path = Path(pretrained).expanduser()
        if looks_like_checkpoint(pretrained):
            if not path.is_file():
                raise ModelError(f"checkpoint file {path} does not exist")
            state = read_checkpoint(path)
        else:
            tag_path = _cached_tag_path(name, pretrained)
    model = _create(name)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            raise ModelError(
                f"checkpoint {pretrained} does not fit model {name}: "
                f"{lines[1].strip() if len(lines) > 1 else lines[0]}"[:300]
            ) from None
    elif tag_path is not None:
        open_clip.load_checkpoint(model, tag_path)
    model.eval().to(dev)
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    dim = (
        int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None
        else int(model.encode_text(tokenizer(["x"])).shape[-1])
    )
    context = (
        TextContext(False, "full context asked for")
        if full_context
        else choose_text_context(model, tokenizer, dev, dtype)
    )
    return LoadedModel(model, preprocess, tokenizer, dev, dtype, name, pretrained, dim, image_size, context)


def fetch_model(name: str, tag: str, cache_dir: str | None = None) -> str:
    """Download weights once (login node, with internet) so that compute nodes can load them offline."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    register_model_configs()
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        raise ModelError(f"{name}/{tag} is not a known open_clip pretrained tag")
    try:
        return str(download_pretrained(cfg, cache_dir=weights_dir(cache_dir)))
    except Exception as exc:
        raise ModelError(
            f"download of {name}/{tag} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
