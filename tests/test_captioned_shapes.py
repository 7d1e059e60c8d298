"""The captioned-shapes generator: seeded, split-disjoint, captions that say what the image shows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clip_hpc.devdata import captioned_shapes as cs


def test_same_seed_and_index_give_the_same_example_whatever_the_batch():
    pixels, captions, attrs = cs.make_dataset(cs.TRAIN_SEED, 12, n_captions=2)
    again, captions2, attrs2 = cs.make_dataset(cs.TRAIN_SEED, 4, n_captions=2, start=8)
    assert np.array_equal(pixels[8:], again)
    assert captions[8:] == captions2 and attrs[8:] == attrs2


def test_heldout_split_is_fixed_and_disjoint_from_training():
    held, _, held_attrs = cs.heldout_split(200)
    train, _, _ = cs.make_dataset(cs.TRAIN_SEED, 2000)
    assert np.array_equal(held, cs.heldout_split(200)[0])
    train_hashes = {p.tobytes() for p in train}
    assert not any(p.tobytes() in train_hashes for p in held)
    assert len({(a.colour, a.shape) for a in held_attrs}) == len(cs.COLOURS) * len(cs.SHAPES)


def test_captions_name_the_colour_the_count_and_a_word_for_the_shape():
    _, captions, attrs = cs.make_dataset(cs.TRAIN_SEED, 300, n_captions=3)
    for caps, a in zip(captions, attrs):
        assert a.background != a.colour
        assert (a.position is None) == (a.count > 1)
        for text in caps:
            assert a.colour in text.split()
            assert any(w in text for w in cs._SHAPE_WORDS[a.shape])
            if a.count > 1:
                assert cs._NUMBER_WORDS[a.count] in text.split()


@pytest.mark.parametrize(
    "colour,shape,count,expected",
    [
        ("red", "circle", 1, "a red circle"),
        ("orange", "square", 1, "an orange square"),
        ("yellow", "square", 2, "two yellow squares"),
        ("blue", "cross", 3, "three blue crosses"),
    ],
)
def test_object_phrase_grammar(colour, shape, count, expected):
    assert cs.object_phrase(colour, shape, count) == expected


def test_the_object_colour_is_actually_drawn():
    """The most common pixel is the background, and the object's colour is present in numbers."""
    pixels, _, attrs = cs.make_dataset(cs.HELDOUT_SEED, 40, size=64)
    for img, a in zip(pixels, attrs):
        if a.texture == "noisy":
            continue
        flat = img.reshape(-1, 3).astype(int)
        near = np.abs(flat - np.array(cs.COLOURS[a.colour])).sum(axis=1) < 30
        assert near.sum() >= 20, a


def test_retrieval_metrics_on_a_hand_made_ranking():
    relevant = np.array([[True, False, False], [False, False, True]])
    ranked = np.array([[0, 1], [1, -1]])
    m = cs.retrieval_metrics(ranked, relevant, ks=(1, 2))
    assert m == {"R@1": 0.5, "R@2": 0.5, "P@2": 0.25}


def test_relevance_is_by_colour_and_shape():
    attrs = [
        cs.Attrs("circle", "red", 3, "small", None, "blue", "plain"),
        cs.Attrs("circle", "blue", 1, "large", "left", "red", "plain"),
        cs.Attrs("square", "red", 1, "large", "top", "white", "dotted"),
    ]
    rel = cs.colour_shape_relevance([("a red circle", "red", "circle")], attrs)
    assert rel.tolist() == [[True, False, False]]
    assert len(cs.colour_shape_queries()) == len(cs.QUERY_TEMPLATES) * len(cs.COLOURS) * len(cs.SHAPES)


def test_write_demo_images(tmp_path):
    rows = cs.write_demo_images(tmp_path / "demo", 5, seed=7, size=96)
    assert [p.name for p, _, _ in rows] == [f"shape-{i:05d}.png" for i in range(5)]
    with Image.open(rows[0][0]) as im:
        assert im.size == (96, 96) and im.mode == "RGB"
    lines = [json.loads(x) for x in (tmp_path / "demo" / "captions.jsonl").read_text().splitlines()]
    assert [x["caption"] for x in lines] == [t for _, t, _ in rows]
    assert lines[2]["colour"] == rows[2][2].colour
