"""`connect`: a served index searched through its HTTP API (the tunnel's http://localhost:PORT, or a connection
file), with the same `search`/`image`/`export` as a local `Index`.

Standard library, httpx and PIL only: a laptop notebook never loads torch, FAISS, h5py or numpy
(tests/test_api_remote.py checks this)."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from clip_hpc.api.query import SearchQuery, export_items, mean_vector, plan_query
from clip_hpc.api.results import THUMB_PX, Hit, Results, SearchFilters
from clip_hpc.client.endpoint import Endpoint, resolve_endpoint
from clip_hpc.client.http_client import client_for, error_text
from clip_hpc.errors import UserError
from clip_hpc.formats.atomic import temp_path
from clip_hpc.server.token_env import TOKEN_ENV

if TYPE_CHECKING:
    from PIL import Image


class RemoteIndex:
    """A running `clip-hpc serve`, reached over HTTP (`clip_hpc.connect`); close it, or use it as a context
    manager."""

    def __init__(self, endpoint: Endpoint, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.client = client_for(endpoint, timeout=timeout)

    def __enter__(self) -> RemoteIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteIndex({self.endpoint.base_url!r})"

    def close(self) -> None:
        """Release the index's files (local) or the HTTP connections (remote)."""
        self.client.close()

    def info(self) -> dict[str, Any]:
        """The server's GET /api/info: the index's size, model and settings."""
        return self._call("GET", "/api/info").json()

    def search(
        self,
        text: str | None = None,
        image: int | str | os.PathLike[str] | bytes | Image.Image | None = None,
        vector: Sequence[float] | None = None,
        k: int = 10,
        weights: dict[str, float] | None = None,
        negatives: Sequence[int | str] | None = None,
        filters: SearchFilters | None = None,
        diversity: float = 0.0,
        min_score: float | None = None,
    ) -> Results:
        """The same search as `Index.search`, answered by the server's POST /api/search."""
        query = plan_query(text, image, vector, k, weights, negatives, filters, diversity, min_score)
        body = self._request_body(query)
        found = self._call("POST", "/api/search", json=body).json()["results"]
        base = self.endpoint.base_url
        hits = [Hit(h["id"], h["score"], h["path"], h.get("caption", ""), base + h["url"]) for h in found]
        return Results(hits, self.thumbnail)

    def _request_body(self, query: SearchQuery) -> dict[str, Any]:
        vector = query.vector
        if query.negative_texts:  # each text's unit vector, as the server encodes it
            vector = mean_vector([self._text_vector(text) for text in query.negative_texts])
        body: dict[str, Any] = {
            "text": query.text,
            "image_id": query.image_id,
            "image_b64": None if query.image is None else base64.b64encode(image_bytes(query.image)).decode("ascii"),
            "vector": vector,
            "negative_ids": query.negative_ids,
            "weights": query.weights_with_negative_texts() or None,
            "k": query.k,
            "min_score": query.min_score,
            "diversity": query.diversity,
            "filters": dict(query.filters) or None,
        }
        return {key: value for key, value in body.items() if value is not None}

    def _text_vector(self, text: str) -> list[float]:
        body = {"text": text, "k": 1, "return_vector": True}
        return self._call("POST", "/api/search", json=body).json()["query_vector"]

    def image_bytes(self, id: int) -> bytes:
        """The image's bytes as the server stores them (GET /api/images/{id})."""
        return self._call("GET", f"/api/images/{int(id)}").content

    def image(self, id: int) -> Image.Image:
        """The image as a PIL image (decoded now, not lazily)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.image_bytes(id))) as image:
            image.load()
            return image

    def thumbnail(self, id: int, size: int = THUMB_PX) -> bytes:
        """The server's JPEG thumbnail (GET /api/images/{id}/thumb), longest side at most `size`."""
        return self._call("GET", f"/api/images/{int(id)}/thumb", params={"size": size}).content

    def export(
        self, ids: Sequence[int], path: str | os.PathLike[str], scores: Sequence[float | None] | None = None
    ) -> Path:
        """POST /api/export's ZIP saved at `path` (under a temporary name, then renamed)."""
        ids, scores = export_items(ids, scores)
        out = Path(path)
        tmp = temp_path(out)
        try:
            with self.client.stream("POST", "/api/export", json={"ids": ids, "scores": scores}) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise UserError(f"server answered {resp.status_code}: {error_text(resp)}")
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
            os.replace(tmp, out)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code != 200:
            raise UserError(f"server answered {resp.status_code}: {error_text(resp)}")
        return resp

    def _unreachable(self, exc: Exception) -> UserError:
        return UserError(
            f"cannot reach {self.endpoint.base_url}: {exc}; run clip-hpc check-ports to find the broken hop"
        )


def image_bytes(image: Any) -> bytes:
    """A query image as bytes to upload: a file read, bytes as they are, a PIL image saved as PNG (lossless)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {image}: {exc.strerror}") from None
    if hasattr(image, "save"):
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
    raise UserError(f"image must be an id, a path, bytes or a PIL image, not {type(image).__name__}")


def connect(
    target: str | os.PathLike[str], token: str | None = None, *, server: bool = False, timeout: float = 60.0
) -> RemoteIndex:
    """A served index: `target` is the server's URL (the tunnel's http://localhost:PORT) or the connection file
    `clip-hpc serve` wrote; the token defaults to $CLIP_HPC_TOKEN or the file's. `server=True` on the node itself
    (its port or unix socket)."""
    token = token or os.environ.get(TOKEN_ENV)
    text = os.fspath(target)
    if text.startswith(("http://", "https://")):
        endpoint = resolve_endpoint(url=text, token=token, server=server)
    else:
        endpoint = resolve_endpoint(connection_file=text, token=token, server=server)
    return RemoteIndex(endpoint, timeout=timeout)
