"""The EMB_DIR the subset tests share: 24 loose images of varied formats and 24 captioned WebDataset tar members,
embedded once per session by the real `clip-hpc embed --captions` with the random-weight tiny model, in units of
8 (6 units, so two ranks each scan three)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.formats.emb_dir import EmbDir
from conftest import make_images, run_cli
from tar_fixtures import write_wds_tars

TINY = ("--model", "clip-hpc-tiny", "--pretrained", "none")
N_LOOSE, N_TARRED, PER_TAR, UNIT = 24, 24, 12, 8


@dataclass
class Source:
    """The embedded set, with every input's original bytes to check a subset against."""

    root: Path
    originals: dict[str, bytes]  # input line (a path, or TARPATH::MEMBER) -> its bytes

    @property
    def emb(self) -> Path:
        return self.root / "emb"

    def stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(ids, float32 vectors, caption similarity, paths) of every shard, in id order: brute force's input."""
        shards = list(EmbDir(self.emb).iter_shards())
        return (
            np.concatenate([s.ids for s in shards]),
            np.concatenate([s.embeddings for s in shards]).astype(np.float32),
            np.concatenate([s.similarity for s in shards]),
            [p for s in shards for p in s.paths],
        )


def _originals(root: Path) -> dict[str, bytes]:
    found = {str(p): p.read_bytes() for p in (root / "loose").rglob("*") if p.is_file()}
    for tar_path in sorted((root / "tars").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                found[f"{tar_path}::{member.name}"] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


_BUILT: list[Source] = []  # the test modules each import the fixture, so pytest would otherwise build it twice


@pytest.fixture(scope="session")
def mixed_source(tmp_path_factory) -> Source:
    if _BUILT:
        return _BUILT[0]
    root = tmp_path_factory.mktemp("subsets")
    make_images(root / "loose", N_LOOSE, seed=11)
    write_wds_tars(make_images(root / "for-tars", N_TARRED, seed=12), root / "tars", PER_TAR)
    run_cli(
        "embed", root / "loose", root / "tars", "--out", root / "emb", *TINY,
        "--workers", "0", "--shard-size", str(UNIT), "--captions", check=True,
    )  # fmt: skip
    _BUILT.append(Source(root, _originals(root)))
    return _BUILT[0]
