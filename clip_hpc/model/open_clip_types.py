"""The one name for an open_clip model in signatures: open_clip ships no type information, and its towers'
attributes (`visual.preprocess_cfg`, `transformer.resblocks`, `text_projection`) are open_clip's, not
`torch.nn.Module`'s, so typing them as a Module only makes every attribute a `Tensor | Module` union."""

from __future__ import annotations

from typing import Any, TypeAlias

OpenClipModel: TypeAlias = Any  # an `open_clip.model.CLIP` (or a custom text tower's model): a torch.nn.Module
