import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clip_hpc.model.loading import ModelError, load_model, read_checkpoint, resolve_pretrained

TEXTS = ["a photo of a dog", "a red square"]


@pytest.fixture(scope="module")
def perturbed_tiny():
    """The tiny model with weights unlike the seeded `none` ones, so a reload proves the file was used."""
    loaded = load_model("clip-hpc-tiny", "none", device="cpu")
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return loaded


def pixels(n=3):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("form", ["plain", "wrapped_ddp", "safetensors"])
def test_checkpoint_by_path_reproduces_embeddings_exactly(tmp_path, perturbed_tiny, form):
    state = {k: v.clone().contiguous() for k, v in perturbed_tiny.model.state_dict().items()}
    if form == "plain":
        path = tmp_path / "ckpt.pt"
        torch.save(state, path)
    elif form == "wrapped_ddp":
        path = tmp_path / "ckpt.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "ckpt.safetensors"
        save_file(state, str(path))
    reloaded = load_model("clip-hpc-tiny", str(path), device="cpu")
    x = pixels()
    assert np.array_equal(reloaded.encode_images(x), perturbed_tiny.encode_images(x))
    assert np.array_equal(reloaded.encode_text(TEXTS), perturbed_tiny.encode_text(TEXTS))
    fresh = load_model("clip-hpc-tiny", "none", device="cpu")
    assert not np.allclose(fresh.encode_images(x), reloaded.encode_images(x))


def test_random_weights_are_seeded_and_normalised():
    a, b = load_model("clip-hpc-tiny", "none", device="cpu"), load_model("clip-hpc-tiny", "none", device="cpu")
    ea = a.encode_text(TEXTS)
    assert np.array_equal(ea, b.encode_text(TEXTS))
    assert ea.shape == (2, 128) and np.allclose(np.linalg.norm(ea, axis=1), 1, atol=1e-5)


def test_errors_are_one_line_and_actionable(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model", "none", device="cpu")
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        read_checkpoint(corrupt)
    with pytest.raises(ModelError, match="neither a file nor a pretrained tag"):
        load_model("clip-hpc-tiny", "laion2b_s34b_b79k", device="cpu")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("clip-hpc-tiny", str(wrong), device="cpu")


def test_default_pretrained_tags():
    assert resolve_pretrained("ViT-B-32", None) == "laion2b_s34b_b79k"
    assert resolve_pretrained("clip-hpc-tiny", None) == "none"
    assert resolve_pretrained("clip-hpc-tiny", "/x/ckpt.pt") == "/x/ckpt.pt"


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_loading_leaves_the_root_logger_alone(level, caplog):
    """open_clip logs through the root logger; we hide its "initialized randomly" line without touching the root
    logger's level, filters or handlers, so the server's own and other libraries' warnings still show."""
    root = logging.getLogger()
    old_level, old_filters, old_handlers = root.level, list(root.filters), list(root.handlers)
    root.setLevel(level)
    try:
        with caplog.at_level(level):
            load_model("clip-hpc-tiny", "none", device="cpu")
            logging.warning("a warning from elsewhere")
        assert root.level == level
        assert root.filters == old_filters and root.handlers == old_handlers
        assert [r.getMessage() for r in caplog.records] == ["a warning from elsewhere"]
    finally:
        root.setLevel(old_level)


def test_loading_leaves_the_process_rng_and_threads_as_they_were():
    """Random weights come from a private seeded generator state, and no library call sizes the thread pool."""
    torch.manual_seed(1234)
    before_state, threads = torch.get_rng_state(), torch.get_num_threads()
    first = load_model("clip-hpc-tiny", pretrained="none", device="cpu")
    assert torch.initial_seed() == 1234 and torch.equal(torch.get_rng_state(), before_state)
    assert torch.get_num_threads() == threads
    torch.rand(5)  # the caller's RNG moves on; the model's weights must not depend on it
    second = load_model("clip-hpc-tiny", pretrained="none", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))


def test_a_checkpoint_named_relative_or_absolute_is_one_checkpoint(tmp_path, monkeypatch):
    """Shards and index.json record the checkpoint: `ckpt.pt` from one directory and `/abs/ckpt.pt` were two
    models, so a resume that named the same file another way was refused (and serve elsewhere could not load)."""
    from clip_hpc.model.loading import resolve_pretrained

    (tmp_path / "w").mkdir()
    torch.save({}, tmp_path / "w" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "w" / "ckpt.pt")
    assert resolve_pretrained("clip-hpc-tiny", "w/ckpt.pt") == resolve_pretrained("clip-hpc-tiny", absolute) == absolute
    assert resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k") == "laion2b_s34b_b79k"  # a tag stays a tag
    assert resolve_pretrained("clip-hpc-tiny", "None") == "None"
