"""What `SearchEngine` needs from a model: the `Encoder` interface, and its default, an open_clip model that loads
on first use. torch loads with the model, never on import: a client or an id-only query never pays for it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from clip_hpc.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


class Encoder(Protocol):
    """Texts or images in, one L2-normalised float32 row of length `dim` per input out."""

    dim: int

    @property
    def image_size(self) -> int:
        """The model's input side in pixels: queries decode JPEGs at the same draft size as `clip-hpc embed`."""
        ...

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """`images` are decoded already (RGB); preprocessing (resize, crop, normalise) is the encoder's job."""
        ...


class ModelEncoder:
    """The default `Encoder`: `loading.load_model(name, pretrained)` on first use, checked against the index's dim."""

    def __init__(
        self,
        name: str | None,
        pretrained: str | None,
        device: str = "auto",
        *,
        dim: int,
        model: Any = None,
        full_context: bool = False,
    ) -> None:
        self.name, self.pretrained, self.device = name, pretrained, device
        self.full_context = full_context  # text at the model's full context even where the short one is exact
        self.dim = int(dim)
        self._model = model
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from clip_hpc.model.loading import load_model

                if self.name is None:
                    raise UserError("index.json records no model: give --model")

                self._model = load_model(self.name, self.pretrained, device=self.device, full_context=self.full_context)
            if int(self._model.dim) != self.dim:
                raise UserError(
                    f"model {self._model.name} gives {self._model.dim}-d vectors, the index holds {self.dim}-d"
                )
            return self._model

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def text_context(self) -> str:
        """How text is encoded: "short (...)" where that is exact, else "full (why)"; see text_context.py."""
        return self.model.text_context.describe()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_text(list(texts))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        model = self.model
        pixels = torch.stack([model.preprocess(image.convert("RGB")) for image in images])
        return model.encode_images(pixels)
