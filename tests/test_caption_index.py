"""`clip-hpc index --vectors captions` over the swapped-caption set (caption_fixtures.py), served by a real
`clip-hpc serve`: a text finds the image that *carries* the caption (not the image it describes, which is what an
image index finds), an uploaded image finds the images whose captions describe it, `/api/info` says which kind is
served, `min_similarity` filters by the stored image-caption cosine in the HTTP API and the CLI, and the gallery
in real Chromium shows the caption that matched. About 25 s (with the shared embed of caption_fixtures.py)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pytest
from PIL import Image

import test_web as web
from caption_fixtures import NO_CAPTION, N, stored
from clip_hpc.devdata.captioned_shapes import make_example
from clip_hpc.formats.index_dir import IndexDir
from conftest import run_cli
from server_fixtures import start_server


@pytest.fixture(scope="module")
def caption_index(swapped):
    out = swapped.root / "caption-index"
    if not out.exists():
        run_cli("index", swapped.emb, "--out", out, "--vectors", "captions", "--quiet", check=True)
    return out


@pytest.fixture(scope="module")
def caption_server(caption_index, tmp_path_factory):
    with start_server(caption_index, tmp_path_factory.mktemp("caption-serve"), "--port", "0") as srv:
        yield srv


def test_caption_index_holds_the_caption_vectors_of_captioned_rows_only(swapped, caption_index):
    index_dir = IndexDir(caption_index)
    info = index_dir.load_info()
    assert (info.vectors, info.n) == ("captions", N - len(NO_CAPTION))
    assert info.recall["target_met"] and info.recall["served"] >= 0.95  # the same self-check as an image index
    ids, _, text, similarity = stored(swapped.emb)
    captioned = np.isfinite(similarity)
    vectors = np.asarray(index_dir.open_vectors(), np.float32)
    assert np.array_equal(vectors[captioned], text[captioned].astype(np.float32))  # ids are the image ids
    with index_dir.open_metadata() as meta:
        assert sorted(meta.all_ids()) == ids[captioned].tolist()  # caption-less rows left out
        got = meta.similarities_of(ids)
    assert np.allclose([got[i] for i in ids[captioned]], similarity[captioned], atol=1e-6)
    described = json.loads(run_cli("info", caption_index, "--json", check=True).stdout)
    assert described["vectors"] == "captions"


def test_served_caption_index_answers_text_with_the_image_carrying_the_caption(swapped, caption_server):
    swapped_ids = [i for i in range(N) if not swapped.own[i]][:6]
    with caption_server.client() as c:
        assert c.get("/api/info").json()["vectors"] == "captions"
        for i in swapped_ids:
            top = c.get("/api/search", params={"q": swapped.captions[i], "k": 3}).json()["results"][0]
            assert (top["id"], top["caption"]) == (i, swapped.captions[i])
            # the same text through the combined route (the gallery's POST) gives the same first hit
            body = c.post("/api/search", json={"text": swapped.captions[i], "k": 3}).json()["results"][0]
            assert body["id"] == i


def test_served_caption_index_answers_an_image_with_the_captions_that_describe_it(swapped, caption_server):
    """Image -> caption: image a, whose caption went to image b, is found under b (the caption describing a)."""
    found = 0
    pairs = [i for i in range(N) if not swapped.own[i]][:8]
    with caption_server.client() as c:
        for a in pairs:
            pixels, _, _ = make_example(0, a, size=96)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "PNG")
            hits = c.post(
                "/api/search/image", files={"file": ("q.png", buf.getvalue(), "image/png")}, params={"k": 3}
            ).json()["results"]
            holder = int(np.flatnonzero(swapped.source == a)[0])
            found += hits[0]["id"] == holder and hits[0]["id"] != a
    assert found >= 7, found


def test_min_similarity_keeps_only_pairs_that_match(swapped, caption_index, caption_server):
    query = "a red circle"
    with caption_server.client() as c:
        plain = c.post("/api/search", json={"text": query, "k": 40}).json()["results"]
        kept = c.post("/api/search", json={"text": query, "k": 40, "filters": {"min_similarity": 0.4}}).json()[
            "results"
        ]
        bad = c.post("/api/search", json={"text": query, "filters": {"min_similarity": "high"}})
        get = c.get("/api/search", params={"q": query, "k": 40, "min_similarity": 0.4}).json()["results"]
    assert bad.status_code in (400, 422)
    similarity = stored(swapped.emb)[3]
    passing = [h["id"] for h in plain if similarity[h["id"]] >= 0.4]
    assert kept and all(similarity[h["id"]] >= 0.4 - 1e-6 for h in kept) and set(passing) <= {h["id"] for h in kept}
    assert len(passing) < len(plain)  # the filter removed something: mostly the swapped pairs
    print(
        f"\n{query!r}: {sum(swapped.own[h['id']] for h in plain)} of {len(plain)} hits keep their own caption; "
        f"with min_similarity 0.4: {sum(swapped.own[h['id']] for h in kept)} of {len(kept)}"
    )
    assert np.mean([swapped.own[h["id"]] for h in kept]) > 0.9 > np.mean([swapped.own[h["id"]] for h in plain])
    assert [h["id"] for h in get] == [h["id"] for h in kept]
    proc = run_cli("search", caption_index, query, "-k", "40", "--min-similarity", "0.4", "--json", check=True)
    assert [h["id"] for h in json.loads(proc.stdout)["results"]] == [h["id"] for h in kept]


@pytest.mark.browser
@pytest.mark.skipif(not Path(web.CHROMIUM).exists(), reason=f"{web.CHROMIUM} is absent")
def test_gallery_shows_the_caption_that_matched(swapped, caption_server, tmp_path):
    """Real Chromium on the served caption index: the first card is the image carrying the caption searched for,
    and it shows that caption, labelled as the match."""
    i = next(i for i in range(N) if not swapped.own[i])
    url = f"{caption_server.url}/?token={caption_server.token}&q={quote_plus(swapped.captions[i])}&k=4"
    dom = web.chromium(url, tmp_path / "profile", "--dump-dom")
    assert 'data-state="done"' in dom and 'data-vectors="captions"' in dom, dom[-2000:]
    assert web.result_ids(dom)[0] == i
    first = dom[dom.index(f'data-id="{i}"') :]
    first = first[: first.index("</figure>")]
    assert (
        f'<p class="caption matched" title="{html.escape(swapped.captions[i])}"><strong>matched caption: '
        f"</strong>{html.escape(swapped.captions[i], quote=False)}</p>" in first
    )
    assert "matched against captions" in dom
