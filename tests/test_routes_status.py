"""The status and gallery routers in process: /health is open, /api/info says what index.json records, /metrics
counts the requests the routers answered, "/" is the gallery; the OpenAPI schema keeps its routes and models."""

from __future__ import annotations

from clip_hpc.server.routes.gallery import WEB_DIR


def test_health_is_open_and_info_is_what_the_index_records(routes_app):
    assert routes_app.anonymous.get("/health").json() == {"status": "ok"}
    assert routes_app.anonymous.get("/api/info").status_code == 401
    info = routes_app.client.get("/api/info").json()
    engine = routes_app.served.engine
    assert info["n"] == engine.n and info["dim"] == engine.encoder.dim
    assert info["model"] == "clip-hpc-tiny" and info["vectors"] == engine.info.vectors
    assert info["text_context"] == engine.encoder.text_context


def test_metrics_count_requests_by_route_template(routes_app):
    routes_app.client.get("/api/images/3/thumb", params={"size": 16})
    text = routes_app.client.get("/metrics").text
    assert routes_app.client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'route="/api/images/{image_id}/thumb"' in text
    assert f"clip_hpc_index_vectors {routes_app.served.engine.n}" in text


def test_the_gallery_and_its_static_files_are_served_with_the_token(routes_app):
    page = routes_app.client.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert page.content == (WEB_DIR / "index.html").read_bytes()
    assert routes_app.client.get("/static/app.js").content == (WEB_DIR / "app.js").read_bytes()
    assert routes_app.anonymous.get("/").status_code == 401


def test_the_openapi_schema_keeps_every_route_and_its_response_model(routes_app):
    schema = routes_app.client.get("/openapi.json").json()
    methods = {path: sorted(ops) for path, ops in schema["paths"].items()}
    assert methods == {
        "/health": ["get"],
        "/api/info": ["get"],
        "/api/search": ["get", "post"],
        "/api/search/image": ["post"],
        "/api/random": ["get"],
        "/api/images/{image_id}": ["get"],
        "/api/images/{image_id}/thumb": ["get"],
        "/api/export": ["post"],
        "/metrics": ["get"],
    }

    def model(path: str, method: str) -> str:
        return schema["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert model("/api/search", "get").endswith("/Results") and model("/api/random", "get").endswith("/Results")
    assert model("/api/search", "post").endswith("/VectorResults")
    assert model("/api/search/image", "post").endswith("/VectorResults")
