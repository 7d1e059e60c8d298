"""`SearchEngine` takes its encoder as an argument: a query reaches exactly the encoder it was given, and one that
does not fit the index is refused up front. The default is the lazy model encoder."""

from __future__ import annotations

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.index.build import build_index
from clip_hpc.model.encoders import ModelEncoder
from clip_hpc.search.engine import SearchEngine
from clip_hpc.server.runtime import ServingRuntime
from clip_hpc.server.shared_encoder import SharedEncoder
from index_fixtures import synthetic_emb_dir


class RecordingEncoder:
    """Answers every text with one of the index's own vectors, and remembers what it was asked."""

    def __init__(self, vector: np.ndarray) -> None:
        self.dim = len(vector)
        self.vector = vector
        self.texts: list[str] = []

    def encode_text(self, texts):
        self.texts += list(texts)
        return np.tile(self.vector, (len(texts), 1))

    def encode_images(self, images):
        return np.tile(self.vector, (len(images), 1))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    _, vectors = synthetic_emb_dir(root / "emb", 300, clusters=5)
    build_index(root / "emb", root / "index", progress=False)
    return root / "index", vectors


def test_queries_go_through_the_given_encoder(index_dir):
    path, vectors = index_dir
    encoder = RecordingEncoder(vectors[42])
    engine = SearchEngine(path, encoder=SharedEncoder(encoder, ServingRuntime.start(), cache_size=4))
    try:
        assert engine.search_text("anything", k=1)[0].id == 42
        assert engine.search_text("anything", k=1)[0].id == 42  # the second time from the shared cache
        assert encoder.texts == ["anything"] and engine.encoder.cache_counts() == {"hit": 1, "miss": 1}
    finally:
        engine.close()


def test_an_encoder_of_the_wrong_dim_is_refused(index_dir):
    path, vectors = index_dir
    with pytest.raises(UserError, match="encoder gives 7-d vectors, the index holds 32-d"):
        SearchEngine(path, encoder=RecordingEncoder(np.ones(7, np.float32)))


def test_the_default_encoder_is_the_recorded_model_loaded_lazily(index_dir):
    engine = SearchEngine(index_dir[0], model_name="clip-hpc-tiny", pretrained="none")
    try:
        assert isinstance(engine.encoder, ModelEncoder) and engine.encoder._model is None
        assert (engine.encoder.name, engine.encoder.pretrained, engine.encoder.dim) == ("clip-hpc-tiny", "none", 32)
        with pytest.raises(UserError, match="model clip-hpc-tiny gives 128-d vectors, the index holds 32-d"):
            engine.search_text("a photo")
    finally:
        engine.close()
