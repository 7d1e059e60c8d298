"""Packed text encoding for open_clip's causal text towers: a batch's texts run as one sequence, each over its own
prefix (up to its pooled token), with a block-diagonal causal mask, through weights packed once for oneDNN.

Why: at query lengths a CPU text encode is matrix products with few rows, where MKL re-packs the whole weight on
every call (ViT-B-32, 13 tokens: 16 ms of products, 10 ms with weights packed once); and a padded batch costs
batch x longest text, a packed one only its real tokens. Each token still sees exactly the tokens it saw at the
full context (its own text's, before it), so the features are the same up to float summation order; the probe in
text_context.py checks that before this path is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clip_hpc.model.open_clip_types import OpenClipModel

ELEMENTWISE_ACTIVATIONS = ("GELU", "QuickGELU", "SiLU", "ReLU")


def cannot_pack(model: OpenClipModel) -> str | None:
    """Why this (already structurally causal) tower cannot be run packed, or None when it can."""
    for block in model.transformer.resblocks:
        attn = block.attn
        if (
            not isinstance(attn, torch.nn.MultiheadAttention)
            or not attn._qkv_same_embed_dim
            or attn.bias_k is not None
            or attn.add_zero_attn
            or attn.in_proj_bias is None
        ):
            return "attention with extra key/value biases or separate projections"
        if not (isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)):
            return "layer scale in the text blocks"
        if (
            hasattr(block, "ln_1_kv")
            or list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"]
            or type(block.mlp.gelu).__name__ not in ELEMENTWISE_ACTIVATIONS
        ):
            return "a non-standard MLP or cross-attention in the text blocks"
    return None


def pooled_positions(model: OpenClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's pooled position (argmax = EOT for CLIP's tokenizer)."""
    pool = model.text_pool_type
    if pool == "first":
        return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    if pool == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def project_text(model: OpenClipModel, pooled: torch.Tensor) -> torch.Tensor:
    """open_clip's last text step: the projection, a matrix or a Linear (or none)."""
    projection = model.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN weight packing: CPU, float32, and the op present in this torch build."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def linear_fn(
    layer_weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool, gelu: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x @ W.T + b`, through a weight packed once for oneDNN when `prepack` (the packing fits any row count); with
    `gelu` ("none" or "tanh", prepacked only) the GELU is applied in the same call, not in another pass over memory."""
    if not prepack:
        return lambda x: F.linear(x, layer_weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(layer_weight.detach(), 16)
    if gelu is not None:
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], gelu)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def residual_linear_fn(
    layer_weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`residual + x @ W.T + b`: a block's output projections, with the residual added in the product's own call."""
    if not prepack:
        return lambda x, residual: residual + F.linear(x, layer_weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(layer_weight.detach(), 16)
    return lambda x, residual: torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def fused_gelu(activation: torch.nn.Module, prepack: bool) -> str | None:
    """oneDNN's GELU flavour for this activation when it can be applied inside the product, else None."""
    return activation.approximate if prepack and type(activation) is torch.nn.GELU else None


@dataclass(frozen=True)
class PackedBlock:
    ln_1: torch.nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (attended, residual)
    heads: int
    ln_2: torch.nn.Module
    fc: Callable[[torch.Tensor], torch.Tensor]  # with the activation when it is fused
    act: Callable[[torch.Tensor], torch.Tensor]
    proj: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, residual)

    def attention_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values stacked: (3, heads, tokens, head width)."""
        tokens, width = x.shape
        return self.qkv(self.ln_1(x)).view(tokens, 3, self.heads, width // self.heads).permute(1, 2, 0, 3)

    def __call__(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block's output; at `rows` only when given (each text's pooled token, in the last block: the other
        rows' outputs are never read, so their attention output, projection and MLP are skipped). `prefix`: keys
        and values of a first token shared by every text, computed once (`FirstToken`), placed before the keys."""
        q, k, v = self.attention_inputs(x)
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
        causal = mask is None and rows is None  # one text, every row, no prefix: plain causal attention
        if rows is not None:
            q, x, mask = q[:, rows], x[rows], None if mask is None else mask[rows]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = self.out(attended.permute(1, 0, 2).reshape(len(x), x.shape[1]), x)
        return self.proj(self.act(self.fc(self.ln_2(x))), x)


@dataclass(frozen=True)
class FirstToken:
    """Keys and values, in every block, of a token at position 0. It attends only to itself, so they depend on its
    id alone: every text that starts with it (CLIP's start-of-text token starts them all) reuses them, and a batch
    of 8 short queries runs ~8% fewer rows through the products."""

    token: int
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def compute(cls, model: OpenClipModel, blocks: list[PackedBlock], token: int) -> FirstToken:
        cast_dtype = model.transformer.get_cast_dtype()
        ids = torch.tensor([token], device=model.positional_embedding.device)
        x = model.token_embedding(ids).to(cast_dtype) + model.positional_embedding[:1].to(cast_dtype)
        keys_values = []
        for block in blocks:
            _q, k, v = block.attention_inputs(x)
            keys_values.append((k, v))
            x = block(x, None)
        return cls(token, keys_values)


class PackedTextTower:
    """`encode(tokens)`: open_clip's `CLIP.encode_text` features (unnormalised) for padded token rows."""

    def __init__(self, model: OpenClipModel, prepack: bool) -> None:
        self.model, self.prepack = model, prepack
        self.blocks = self._pack()
        self.versions = self._weight_versions()
        self.first_token: FirstToken | None = None

    def _weight_versions(self) -> list[int]:
        """The text blocks' weight versions: changed in place after loading, they must be packed again and the
        cached first token recomputed (even unpacked, where the blocks read the live weights)."""
        return [p._version for p in self.model.transformer.resblocks.parameters()]

    def _pack(self) -> list[PackedBlock]:
        model, prepack = self.model, self.prepack
        blocks = []
        for b in model.transformer.resblocks:
            gelu = fused_gelu(b.mlp.gelu, prepack)
            blocks.append(
                PackedBlock(
                    b.ln_1,
                    linear_fn(b.attn.in_proj_weight, b.attn.in_proj_bias, prepack),
                    residual_linear_fn(b.attn.out_proj.weight, b.attn.out_proj.bias, prepack),
                    b.attn.num_heads,
                    b.ln_2,
                    linear_fn(b.mlp.c_fc.weight, b.mlp.c_fc.bias, prepack, gelu),
                    torch.nn.Identity() if gelu is not None else b.mlp.gelu,
                    residual_linear_fn(b.mlp.c_proj.weight, b.mlp.c_proj.bias, prepack),
                )
            )
        return blocks

    def describe(self) -> str:
        return "packed sequences, shared first token" + (", weights prepacked for oneDNN" if self.prepack else "")

    def shared_first(self, tokens: torch.Tensor, ends: list[int]) -> FirstToken | None:
        """The cached first token when every row starts with the same one and pools after it, else None."""
        if not len(tokens) or min(ends) < 1 or not bool((tokens[:, 0] == tokens[0, 0]).all()):
            return None
        token = int(tokens[0, 0])
        if self.first_token is None or self.first_token.token != token:
            self.first_token = FirstToken.compute(self.model, self.blocks, token)
        return self.first_token

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self._weight_versions() != self.versions:  # packed weights, and the first token's keys and values
            self.blocks, self.versions, self.first_token = self._pack(), self._weight_versions(), None
        ends = pooled_positions(model, tokens).tolist()  # each row's pooled token; its prefix is all it needs
        first = self.shared_first(tokens, ends)
        skip = 0 if first is None else 1  # the first token's rows are not run: its keys and values are cached
        flat = torch.cat([row[skip : end + 1] for row, end in zip(tokens, ends)])
        positions = torch.cat([torch.arange(skip, end + 1, device=tokens.device) for end in ends])
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(flat).to(cast_dtype) + model.positional_embedding[positions].to(cast_dtype)
        lengths = [end + 1 - skip for end in ends]
        mask = None
        if len(ends) > 1 or first is not None:  # as the additive float mask SDPA would build from a boolean one
            allowed = block_causal_mask(lengths, tokens.device, shared_prefix=skip)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        last_rows = torch.tensor(lengths, device=tokens.device).cumsum(0) - 1  # each text's pooled token
        prefixes = [None] * len(self.blocks) if first is None else first.keys_values
        for block, prefix in zip(self.blocks[:-1], prefixes):
            x = block(x, mask, prefix=prefix)
        return project_text(model, model.ln_final(self.blocks[-1](x, mask, last_rows, prefixes[-1])))


def block_causal_mask(lengths: list[int], device: torch.device, shared_prefix: int = 0) -> torch.Tensor:
    """True where a token may attend: earlier (or the same) tokens of its own text only, and the `shared_prefix`
    keys placed before all texts' keys."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    total = int(owner.numel())
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    own = causal & (owner[:, None] == owner[None, :])
    return torch.cat([torch.ones(total, shared_prefix, dtype=torch.bool, device=device), own], dim=1)
