"""Short-context text encoding is exact where it is used, and falls back to the full context where it cannot be
proven: the same features (within 1e-5) for batches of mixed lengths, on the shipped configs and on ViT-B-32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clip_hpc.model import text_context
from clip_hpc.model.loading import load_model

MIXED = [
    "a",
    "a photo of a dog on a red sofa in the morning sun",
    "zebra",
    "",
    " ".join(["a very long caption that runs past the context"] * 12),
    "two cats and a bird",
]


def full_context(loaded):
    return dataclasses.replace(loaded, text_context=text_context.TextContext(False, "test"))


@pytest.mark.parametrize("name", ["clip-hpc-tiny", "clip-hpc-demo", "ViT-B-32"])
def test_short_context_matches_the_full_context(name):
    """~1 s for ViT-B-32 (random weights; building it needs no network)."""
    loaded = load_model(name, "none", device="cpu")
    assert loaded.text_context.short, loaded.text_context.describe()
    assert "packed sequences, shared first token, weights prepacked" in loaded.text_context.describe()  # the fast path
    tokens = loaded.tokenizer(MIXED)
    assert 1 < text_context.needed_length(loaded.model, tokens[[0, 2]]) < tokens.shape[1]  # really shorter
    short, full = loaded.encode_text(MIXED), full_context(loaded).encode_text(MIXED)
    assert np.abs(short - full).max() <= 1e-5
    for i, text in enumerate(MIXED):  # each alone, at its own (shorter) length, too
        assert np.abs(loaded.encode_text([text])[0] - full[i]).max() <= 1e-5


def test_full_context_on_request():
    loaded = load_model("clip-hpc-tiny", "none", device="cpu", full_context=True)
    assert not loaded.text_context.short and "asked for" in loaded.text_context.describe()


def _tiny_clip(**text_overrides):
    from open_clip.model import CLIP

    torch.manual_seed(0)
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, **text_overrides}
    return CLIP(16, {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}, text_cfg).eval()


def test_models_that_cannot_be_proven_exact_fall_back():
    non_causal = text_context.structural_check(_tiny_clip(no_causal_mask=True))
    assert not non_causal.short and "not causal" in non_causal.describe()
    last_pool = text_context.structural_check(_tiny_clip(pool_type="last"))
    assert not last_pool.short and "'last'" in last_pool.reason

    class CustomTower(type(_tiny_clip())):
        def encode_text(self, text, normalize=False):
            return super().encode_text(text, normalize)

    custom = _tiny_clip()
    custom.__class__ = CustomTower
    assert "custom text tower" in text_context.structural_check(custom).reason
    assert text_context.structural_check(_tiny_clip()).short


def test_a_probe_mismatch_falls_back(monkeypatch):
    monkeypatch.setattr(text_context, "encode_text_short", lambda model, tokens: torch.zeros(len(tokens), 16))
    import open_clip

    chosen = text_context.choose_text_context(
        _tiny_clip(), open_clip.get_tokenizer("ViT-B-32"), torch.device("cpu"), torch.float32
    )
    assert not chosen.short and "probe differs" in chosen.reason


def test_the_prefix_path_matches_where_packing_does_not_apply():
    """A tower packing refuses (layer scale) still runs at the short context, on the prefix path, and says why."""
    import open_clip

    model = _tiny_clip(ls_init_value=0.5)
    chosen = text_context.choose_text_context(
        model, open_clip.get_tokenizer("ViT-B-32"), torch.device("cpu"), torch.float32
    )
    assert chosen.short and chosen.packed is None and "layer scale" in chosen.describe()
    tokens = open_clip.get_tokenizer("ViT-B-32")(MIXED)
    with torch.inference_mode():
        assert (chosen.encode(model, tokens) - model.encode_text(tokens)).abs().max() <= 1e-5


def test_packed_texts_see_only_their_own_earlier_tokens():
    from clip_hpc.model.text_packed import block_causal_mask

    mask = block_causal_mask([2, 1, 3], torch.device("cpu")).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
    ]
    shared = block_causal_mask([2, 1], torch.device("cpu"), shared_prefix=1).int().tolist()
    assert shared == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]  # every text also sees the shared first token


def test_the_shared_first_token_is_reused_only_where_it_is_exact():
    """Rows that all start with the start-of-text token reuse its cached keys and values; a batch whose rows start
    differently runs every row; weights changed in place after loading are packed again, first token included."""
    loaded = load_model("clip-hpc-tiny", "none", device="cpu")
    model, tower = loaded.model, loaded.text_context.packed
    tokens = loaded.tokenizer(MIXED)
    with torch.inference_mode():
        assert (tower.encode(tokens) - model.encode_text(tokens)).abs().max() <= 1e-5
        assert tower.first_token is not None and tower.first_token.token == int(tokens[0, 0])
        mixed_start = tokens.clone()
        mixed_start[1, 0] = mixed_start[1, 1]
        assert tower.shared_first(mixed_start, [3, 9, 3, 1, 76, 6]) is None
        assert (tower.encode(mixed_start) - model.encode_text(mixed_start)).abs().max() <= 1e-5
    from clip_hpc.model.text_packed import PackedTextTower

    unpacked = PackedTextTower(model, prepack=False)  # the blocks read the live weights; the first token is cached
    with torch.inference_mode():
        unpacked.encode(tokens)
    cached = tower.first_token
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
    with torch.inference_mode():
        assert (tower.encode(tokens) - model.encode_text(tokens)).abs().max() <= 1e-5
        assert (unpacked.encode(tokens) - model.encode_text(tokens)).abs().max() <= 1e-5
    assert tower.first_token is not None and tower.first_token is not cached


def test_a_packed_probe_mismatch_keeps_the_prefix_path(monkeypatch):
    import open_clip

    from clip_hpc.model import text_packed

    monkeypatch.setattr(text_packed.PackedTextTower, "encode", lambda self, tokens: torch.zeros(len(tokens), 16))
    chosen = text_context.choose_text_context(
        _tiny_clip(), open_clip.get_tokenizer("ViT-B-32"), torch.device("cpu"), torch.float32
    )
    assert chosen.short and chosen.packed is None and "packed probe differs" in chosen.describe()
