"""One decode path: an EXIF-rotated JPEG and a partly transparent PNG give the same vector whether embedded by
`clip-hpc embed`, used as a query by `clip-hpc search --image`, or uploaded to the server (multipart or base64).
The old bare-PIL query decode (no EXIF rotation, alpha dropped) is shown to give different vectors, so the
equality below is not vacuous."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from clip_hpc.ingest.images import as_query_image
from clip_hpc.model.loading import load_model
from conftest import run_cli
from server_fixtures import start_server

TINY = ("--model", "clip-hpc-tiny", "--pretrained", "none")
SAME = 1e-6


def write_query_images(out: Path) -> dict[str, Path]:
    """A 640x480 JPEG stored sideways with EXIF orientation 6 (large enough that embed's draft decode shrinks it),
    an RGBA PNG whose transparent half hides a saturated green, and one plain image so the index has company."""
    out.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 255, 640, dtype=np.float32)
    y = np.linspace(0, 255, 480, dtype=np.float32)
    arr = np.stack(
        [x[None, :] + 0 * y[:, None], y[:, None] + 0 * x[None, :], (x[None, :] * y[:, None]) / 255], axis=-1
    ).astype(np.uint8)
    arr[40:200, 60:300] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = out / "rotated.jpg"
    Image.fromarray(arr, "RGB").save(rotated, quality=92, exif=exif.tobytes())
    rgba = np.zeros((200, 300, 4), dtype=np.uint8)
    rgba[..., :3] = (20, 230, 40)
    rgba[:, :150, 3] = 0  # transparent: white on compositing, green under a bare convert("RGB")
    rgba[:, 150:, :3], rgba[:, 150:, 3] = (30, 30, 200), 255
    rgba[60:140, 100:200, 3] = 128
    transparent = out / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(transparent)
    Image.fromarray(arr[::-1].copy(), "RGB").save(out / "plain.png")
    return {"rotated": rotated, "transparent": transparent}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Real `clip-hpc embed --dtype float32` (one DataLoader worker) and `clip-hpc index` of the query images."""
    root = tmp_path_factory.mktemp("query-decode")
    files = write_query_images(root / "images")
    run_cli("embed", root / "images", "--out", root / "emb", *TINY, "--dtype", "float32", "--workers", "1", check=True)
    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    vectors = {}
    for shard in sorted((root / "emb" / "shards").glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            assert f["embeddings"].dtype == np.float32
            for path, vector in zip(f["paths"].asstr()[:], f["embeddings"][:]):
                vectors[Path(path).name] = vector
    return root, files, {name: vectors[path.name] for name, path in files.items()}


def cli_query_vector(index_dir: Path, image: Path) -> np.ndarray:
    proc = run_cli("search", index_dir, "--image", image, "--json", "--with-vector", "-k", "1", check=True)
    return np.asarray(json.loads(proc.stdout)["query_vector"], dtype=np.float32)


def test_every_route_gives_the_embed_vector(embedded, tmp_path):
    root, files, embed_vectors = embedded
    with start_server(root / "index", tmp_path / "srv") as srv, srv.client() as client:
        for name, path in files.items():
            expected = embed_vectors[name]
            data = path.read_bytes()
            upload = client.post(
                "/api/search/image", params={"return_vector": "true", "k": 1}, files={"file": (path.name, data)}
            )
            assert upload.status_code == 200, upload.text
            b64 = client.post(
                "/api/search", json={"image_b64": base64.b64encode(data).decode(), "k": 1, "return_vector": True}
            )
            assert b64.status_code == 200, b64.text
            routes = {
                "cli": cli_query_vector(root / "index", path),
                "upload": np.asarray(upload.json()["query_vector"], dtype=np.float32),
                "image_b64": np.asarray(b64.json()["query_vector"], dtype=np.float32),
            }
            for route, vector in routes.items():
                assert vector.shape == expected.shape, (name, route)
                assert np.abs(vector - expected).max() <= SAME, (name, route, np.abs(vector - expected).max())
            assert upload.json()["results"][0]["path"] == str(path)
        plain = client.post("/api/search/image", params={"k": 1}, files={"file": ("x.jpg", data)})
        assert "query_vector" not in plain.json()  # only when asked for


def test_the_old_bare_pil_decode_gives_other_vectors(embedded):
    """What `search.open_image` did (Image.open(f).convert("RGB")) differs from the embed vector, and the shared
    decode in-process reproduces it: the equality above is about the decode, not a constant model."""
    _, files, embed_vectors = embedded
    model = load_model("clip-hpc-tiny", "none", device="cpu")

    def vector(image: Image.Image) -> np.ndarray:
        return model.encode_images(torch.stack([model.preprocess(image)]))[0]

    for name, path in files.items():
        with Image.open(path) as img:
            bare = img.convert("RGB")
        assert np.abs(vector(bare) - embed_vectors[name]).max() > 1e-3, name
        shared = as_query_image(path, min_size=model.image_size)
        assert np.abs(vector(shared) - embed_vectors[name]).max() <= SAME, name
    full_size = as_query_image(files["rotated"])  # without embed's draft size: other pixels, another vector
    assert full_size.size == (480, 640)
    assert np.abs(vector(full_size) - embed_vectors["rotated"]).max() > 1e-5
