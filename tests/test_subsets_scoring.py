"""The filter's pure parts: the keep rule, the top-N order (equal scores: the lower id), the tar plan and the merge."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clip_hpc.subsets.out_dir import SCHEMA
from clip_hpc.subsets.outputs import select_results
from clip_hpc.subsets.scoring import Scored, best_first, kept, score_rows
from clip_hpc.subsets.tars import extension, tar_numbers


def test_score_rows_is_the_best_positive_and_the_best_negative():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5000, 32)).astype(np.float16)  # more than one CPU block
    positives, negatives = rng.standard_normal((3, 32), np.float32), rng.standard_normal((2, 32), np.float32)
    scored = score_rows(rows, positives, negatives)
    products = rows.astype(np.float32) @ np.concatenate([positives, negatives]).T
    assert np.allclose(scored.score, products[:, :3].max(axis=1), atol=1e-4)
    assert np.array_equal(scored.query, products[:, :3].argmax(axis=1))
    assert np.allclose(scored.negative, products[:, 3:].max(axis=1), atol=1e-4)
    assert np.all(score_rows(rows[:0], positives, negatives[:0]).score.shape == (0,))
    assert np.all(score_rows(rows, positives, negatives[:0]).negative == -np.inf)


def test_keep_rule_threshold_negative_and_caption_similarity():
    scored = Scored(
        np.array([0.3, 0.3, 0.2, 0.5], np.float32), np.zeros(4, np.int32), np.array([0.1, 0.3, 0.0, 0.6], np.float32)
    )
    assert kept(scored, 0.3).tolist() == [True, False, False, False]  # equal to its negative: not kept
    assert kept(scored, None).tolist() == [True, False, True, False]
    similarity = np.array([0.4, 0.4, np.nan, 0.1], np.float32)
    assert kept(scored, None, similarity, 0.2).tolist() == [True, False, False, False]  # no caption: never
    assert not kept(scored, None, None, 0.2).any()  # embedded without captions: nothing passes


def test_top_n_breaks_ties_by_the_lower_id():
    scores, ids = np.array([0.5, 0.9, 0.5, 0.7], np.float32), np.array([40, 10, 20, 30])
    assert ids[best_first(scores, ids)].tolist() == [10, 30, 20, 40]
    assert ids[best_first(scores, ids, 3)].tolist() == [10, 30, 20]


def test_merge_keeps_the_global_top_in_id_order():
    def part(ids, scores):
        n = len(ids)
        return pa.table(
            {"id": ids, "path": [f"p{i}" for i in ids], "url": [""] * n, "caption": [""] * n, "score": scores,
             "query": [0] * n, "offset": [-1] * n, "size": [-1] * n, "identity": [""] * n},
            schema=SCHEMA,
        )  # fmt: skip

    merged = select_results([part([5, 9], [0.8, 0.2]), part([1, 7], [0.8, 0.9])], 3)
    assert merged.column("id").to_pylist() == [1, 5, 7]
    assert select_results([], None).num_rows == 0


def test_tar_plan_and_extensions():
    assert tar_numbers(25, 10, 0, 2) == [0, 2] and tar_numbers(25, 10, 1, 2) == [1] and tar_numbers(0, 10, 0, 1) == []
    assert (
        extension("a/b/IMG.JPG") == "jpg" and extension("x.tar::dir/k.1.png") == "png" and extension("noext") == "bin"
    )
