"""Exact short-context text encoding for open_clip's causal text towers.

CLIP's text transformer is causal: the feature pooled at the end-of-text token depends only on the tokens before
it. Running the transformer on `tokens[:, :L]` (L = the last pooled position in the batch + 1) with
`positional_embedding[:L]` and `attn_mask[:L, :L]` therefore gives the same features as the full 77-token context
(up to float summation order, ~1e-6), in a fraction of the time. Any model where that cannot be proven from its
structure (and then confirmed on a probe) is encoded at its full context, and `TextContext.describe` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clip_hpc.model.open_clip_types import OpenClipModel
from clip_hpc.model.text_packed import PackedTextTower, cannot_pack, pooled_positions, prepack_available, project_text

PROBE_TOLERANCE = 1e-4  # largest difference from the full context accepted on the probe (float32: ~1e-6 seen)
PROBE_TEXTS = ("a photo of a cat", "two dogs playing in the snow on a bright winter morning near the lake", "x")
EXACT_POOLS = ("argmax", "eos", "first")  # pools whose position lies inside the kept prefix


@dataclass(frozen=True)
class TextContext:
    """Whether this model's text is encoded at the short context, and why (or why not)."""

    short: bool
    reason: str
    packed: PackedTextTower | None = field(default=None, compare=False)  # the faster exact path, where it fits
    packed_note: str = ""  # how the short context runs: packed, or why not

    def describe(self) -> str:
        note = f"; {self.packed_note}" if self.short and self.packed_note else ""
        return f"{'short' if self.short else 'full'} ({self.reason}{note})"

    def encode(self, model: OpenClipModel, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features: packed, else the short prefix, else open_clip's own full context."""
        if not self.short:
            return model.encode_text(tokens)
        return self.packed.encode(tokens) if self.packed is not None else encode_text_short(model, tokens)


def structural_check(model: OpenClipModel) -> TextContext:
    """The conditions under which truncation is exact, read off the model; the first one that fails is the reason."""
    from open_clip.model import CLIP
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    if type(model).encode_text is not CLIP.encode_text:
        return TextContext(False, f"custom text tower ({type(model).__name__}): truncation not proven exact")
    mask = getattr(model, "attn_mask", None)
    if mask is None or not is_causal_mask(mask):
        return TextContext(False, "the text tower is not causal (no causal attention mask)")
    if model.text_pool_type not in EXACT_POOLS:
        return TextContext(False, f"text pooling {model.text_pool_type!r} reads past the end-of-text token")
    if type(model.transformer) is not Transformer or not all(
        type(block) is ResidualAttentionBlock for block in model.transformer.resblocks
    ):
        return TextContext(False, "non-standard transformer blocks: truncation not proven exact")
    return TextContext(True, "causal text tower, exact")


def is_causal_mask(mask: torch.Tensor) -> bool:
    """-inf strictly above the diagonal, 0 on and below it: position i sees positions <= i only."""
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.all(torch.isneginf(mask[above]))) and bool(torch.all(mask[~above] == 0))


def needed_length(model: OpenClipModel, tokens: torch.Tensor) -> int:
    """The shortest prefix that holds every row's pooled position."""
    return int(pooled_positions(model, tokens).max()) + 1 if len(tokens) else 1


def encode_text_short(model: OpenClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text` on the needed prefix of the context only (unnormalised features)."""
    from open_clip.model import text_global_pool

    length = needed_length(model, tokens)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return project_text(model, x)


def probe_gap(full: torch.Tensor, other: torch.Tensor) -> float | None:
    """The largest difference from the full context's features, or None when it is within PROBE_TOLERANCE."""
    gap = float((full - other.float()).abs().max())
    return None if gap <= PROBE_TOLERANCE * max(1.0, float(full.abs().max())) else gap


@torch.inference_mode()
def choose_text_context(model: OpenClipModel, tokenizer, device: torch.device, dtype: torch.dtype) -> TextContext:
    """The structural check, then a probe (texts of mixed lengths) that must match the full context; then the
    packed path (text_packed.py), kept only when it matches too."""
    context = structural_check(model)
    if not context.short:
        return context
    tokens = tokenizer(list(PROBE_TEXTS)).to(device)
    full = model.encode_text(tokens).float()
    gap = probe_gap(full, encode_text_short(model, tokens))
    if gap is not None:
        return TextContext(False, f"probe differs from the full context by {gap:.1e}")
    why_not = cannot_pack(model)
    if why_not is not None:
        return TextContext(True, context.reason, packed_note=f"not packed: {why_not}")
    tower = PackedTextTower(model, prepack=prepack_available(device, dtype))
    alone = torch.cat([tower.encode(tokens[i : i + 1]) for i in range(len(tokens))])  # one text: no mask
    gap = probe_gap(full, tower.encode(tokens)) or probe_gap(full, alone)
    if gap is not None:
        return TextContext(True, context.reason, packed_note=f"not packed: the packed probe differs by {gap:.1e}")
    return TextContext(True, context.reason, tower, tower.describe())
