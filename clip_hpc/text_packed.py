"""Packed text encoding for open_clip's causal text towers: a batch's texts run as one sequence, each over its own
prefix (up to its pooled token), with a block-diagonal causal mask, through weights packed once for oneDNN.

Why: at query lengths a CPU text encode is matrix products with few rows, where MKL re-packs the whole weight on
every call (ViT-B-32, 13 tokens: 16 ms of products, 10 ms with weights packed once); and a padded batch costs
batch x longest text, a packed one only its real tokens. Each token still sees exactly the tokens it saw at the
full context (its own text's, before it), so the features are the same up to float summation order; the probe in
text_context.py checks that before this path is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ELEMENTWISE_ACTIVATIONS = ("GELU", "QuickGELU", "SiLU", "ReLU")


def cannot_pack(model: torch.nn.Module) -> str | None:
    """Why this (already structurally causal) tower cannot be run packed, or None when it can."""
    for block in model.transformer.resblocks:
        attn = block.attn
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim or \
                attn.bias_k is not None or attn.add_zero_attn or attn.in_proj_bias is None:
            return "attention with extra key/value biases or separate projections"
        if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
            return "layer scale in the text blocks"
        if hasattr(block, "ln_1_kv") or list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"] or \
                type(block.mlp.gelu).__name__ not in ELEMENTWISE_ACTIVATIONS:
            return "a non-standard MLP or cross-attention in the text blocks"
    return None


def pooled_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's pooled position (argmax = EOT for CLIP's tokenizer)."""
    pool = model.text_pool_type
    if pool == "first":
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    if pool == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def project_text(model: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """open_clip's last text step: the projection, a matrix or a Linear (or none)."""
    projection = model.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN weight packing: CPU, float32, and the op present in this torch build."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def linear_fn(layer_weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x @ W.T + b`, through a weight packed once for oneDNN when `prepack` (the packing fits any row count)."""
    if not prepack:
        return lambda x: F.linear(x, layer_weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(layer_weight.detach(), 16)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass(frozen=True)
class PackedBlock:
    ln_1: torch.nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    ln_2: torch.nn.Module
    fc: Callable[[torch.Tensor], torch.Tensor]
    act: torch.nn.Module
    proj: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output; at `rows` only when given (each text's pooled token, in the last block: the other
        rows' outputs are never read, so their attention output, projection and MLP are skipped)."""
        tokens, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(tokens, 3, self.heads, width // self.heads).permute(1, 2, 0, 3)
        causal = mask is None and rows is None  # one text, every row: plain causal attention
        if rows is not None:
            q, x, mask = q[:, rows], x[rows], None if mask is None else mask[rows]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.out(attended.permute(1, 0, 2).reshape(len(x), width))
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class PackedTextTower:
    """`encode(tokens)`: open_clip's `CLIP.encode_text` features (unnormalised) for padded token rows."""

    def __init__(self, model: torch.nn.Module, prepack: bool) -> None:
        self.model, self.prepack = model, prepack
        self.blocks = self._pack()
        self.versions = self._weight_versions()

    def _weight_versions(self) -> list[int]:
        """The text blocks' weight versions: changed in place after loading, they must be packed again."""
        return [p._version for p in self.model.transformer.resblocks.parameters()]

    def _pack(self) -> list[PackedBlock]:
        model, prepack = self.model, self.prepack
        return [PackedBlock(b.ln_1, linear_fn(b.attn.in_proj_weight, b.attn.in_proj_bias, prepack),
                            linear_fn(b.attn.out_proj.weight, b.attn.out_proj.bias, prepack),
                            b.attn.num_heads, b.ln_2, linear_fn(b.mlp.c_fc.weight, b.mlp.c_fc.bias, prepack),
                            b.mlp.gelu, linear_fn(b.mlp.c_proj.weight, b.mlp.c_proj.bias, prepack))
                for b in model.transformer.resblocks]

    def describe(self) -> str:
        return "packed sequences" + (", weights prepacked for oneDNN" if self.prepack else "")

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.prepack and self._weight_versions() != self.versions:
            self.blocks, self.versions = self._pack(), self._weight_versions()
        ends = pooled_positions(model, tokens).tolist()  # each row's pooled token; its prefix is all it needs
        flat = torch.cat([row[:end + 1] for row, end in zip(tokens, ends)])
        positions = torch.cat([torch.arange(end + 1, device=tokens.device) for end in ends])
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(flat).to(cast_dtype) + model.positional_embedding[positions].to(cast_dtype)
        lengths = [end + 1 for end in ends]
        mask = None
        if len(ends) > 1:  # as the additive float mask SDPA would otherwise build from the boolean one in every block
            allowed = block_causal_mask(lengths, tokens.device)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        last_rows = torch.tensor(lengths, device=tokens.device).cumsum(0) - 1  # each text's pooled token
        for block in self.blocks[:-1]:
            x = block(x, mask)
        return project_text(model, model.ln_final(self.blocks[-1](x, mask, last_rows)))


def block_causal_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """True where a token may attend: earlier (or the same) tokens of its own text only."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = int(owner.numel())
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    return causal & (owner[:, None] == owner[None, :])
