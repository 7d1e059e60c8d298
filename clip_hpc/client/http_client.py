"""The HTTP client: an httpx client for a server (by URL or unix socket), and the CLI's client-mode search."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from clip_hpc.client.endpoint import Endpoint
from clip_hpc.errors import UserError

GET_TEXT_CHARS = 1000  # a longer text goes in a POST body: a URL holds at most 64 KiB (httpx refuses more)


def make_client(
    base_url: str | None = None, *, uds: str | None = None, token: str | None = None, timeout: float = 30.0
) -> httpx.Client:
    """An httpx client for a server reached by URL or, on the node itself, by unix socket."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.HTTPTransport(uds=uds) if uds else None
    return httpx.Client(
        base_url=base_url or "http://localhost", headers=headers, transport=transport, timeout=timeout, trust_env=False
    )


def client_for(endpoint: Endpoint, timeout: float = 30.0) -> httpx.Client:
    return make_client(endpoint.base_url, uds=endpoint.uds, token=endpoint.token, timeout=timeout)


def remote_search(endpoint: Endpoint, text: str | None = None, *, image: str | None = None, k: int = 10) -> dict:
    """The CLI's client mode: text (GET /api/search; POST when it is too long for a URL), an image (upload), or
    both (POST /api/search)."""
    if not text and not image:
        raise UserError("give a text query, --image PATH, or both")
    data, file_name = None, ""
    if image:
        file_name = Path(image).name
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {image}: {exc.strerror}") from None
    with client_for(endpoint) as client:
        try:
            if data is not None and text:
                payload = {"text": text, "image_b64": base64.b64encode(data).decode(), "k": k}
                resp = client.post("/api/search", json=payload)
            elif data is not None:
                resp = client.post("/api/search/image", params={"k": k}, files={"file": (file_name, data)})
            elif text and len(text) > GET_TEXT_CHARS:  # the server's own length limit then answers in one line
                resp = client.post("/api/search", json={"text": text, "k": k})
            else:
                resp = client.get("/api/search", params={"q": text, "k": k})
        except httpx.HTTPError as exc:
            raise UserError(
                f"cannot reach {endpoint.base_url}: {exc}; run clip-hpc check-ports to find the broken hop"
            ) from None
    if resp.status_code != 200:
        raise UserError(f"server answered {resp.status_code}: {error_text(resp)}")
    return resp.json()


def error_text(resp: httpx.Response) -> str:
    """The server's `{"error": ...}` message, or the start of whatever else it sent."""
    try:
        return str(resp.json().get("error", resp.text))[:200]
    except ValueError:
        return resp.text[:200]
