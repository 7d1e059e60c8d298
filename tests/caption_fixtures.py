"""The captioned EMB_DIR the caption tests share (a pytest plugin, see conftest): the demo model's sample tars
(`make_sample_images.py --tars`) with half the captions swapped between images and two captions missing, embedded
once per session with `clip-hpc embed --captions`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.devdata.sample_images import captioned_samples, write_tar
from clip_hpc.formats.emb_dir import EmbDir
from conftest import run_cli

DEMO = ("--model", "clip-hpc-demo", "--workers", "0", "--shard-size", "30")
N, PER_TAR, NO_CAPTION = 80, 40, (5, 61)  # ids 5 and 61 have neither a .txt nor a caption in their .json


@dataclass
class Captioned:
    """The embedded set: `own[i]` whether image i kept its caption, `source[i]` the image its caption describes."""

    root: Path
    own: np.ndarray
    source: np.ndarray
    captions: list[str]

    @property
    def emb(self) -> Path:
        return self.root / "emb"


def swap_half(samples: list, rng: np.random.Generator) -> np.ndarray:
    """Swap the captions (txt and json) of random disjoint pairs covering half the samples, in place; returns
    which image each caption describes (i itself where not swapped)."""
    source = np.arange(len(samples))
    picked = rng.permutation([i for i in range(len(samples)) if i not in NO_CAPTION])[: len(samples) // 2]
    for a, b in zip(picked[::2], picked[1::2]):
        (_, ma), (_, mb) = samples[a], samples[b]
        ma["txt"], mb["txt"] = mb["txt"], ma["txt"]
        ja, jb = json.loads(ma["json"]), json.loads(mb["json"])
        ja["caption"], jb["caption"] = jb["caption"], ja["caption"]
        ma["json"], mb["json"] = json.dumps(ja).encode(), json.dumps(jb).encode()
        source[[a, b]] = b, a
    for i in NO_CAPTION:
        members = samples[i][1]
        del members["txt"]
        meta = json.loads(members["json"])
        del meta["caption"]
        members["json"] = json.dumps(meta).encode()
    return source


@pytest.fixture(scope="session")
def swapped(tmp_path_factory) -> Captioned:
    """Two tars of 40 captioned shapes (`make_sample_images.py --tars`' samples), half the captions swapped,
    embedded with --captions (ids are the sample numbers: one tar after the other)."""
    root = tmp_path_factory.mktemp("captions")
    samples = captioned_samples(N, size=96)
    source = swap_half(samples, np.random.default_rng(7))
    for t in range(N // PER_TAR):
        write_tar(root / "tars" / f"{t:05d}.tar", samples[t * PER_TAR : (t + 1) * PER_TAR])
    run_cli("embed", root / "tars", "--out", root / "emb", *DEMO, "--captions", check=True)
    captions = [m["txt"].decode() if "txt" in m else "" for _, m in samples]
    return Captioned(root, source == np.arange(N), source, captions)


def stored(emb_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, image embeddings, caption embeddings, similarity) of every shard, in id order."""
    shards = list(EmbDir(emb_dir).iter_shards())
    return tuple(
        np.concatenate([getattr(s, name) for s in shards])
        for name in ("ids", "embeddings", "caption_embeddings", "similarity")
    )
