"""The OpenAPI document tells the truth: every route lists the statuses it really answers with OpenAI's error
body (never FastAPI's unused 422: validation errors are 400), the generation routes' 200 includes
`text/event-stream`, and the bearer key is declared — so generated clients and schema-driven fuzzers agree with
the server."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}},
}
WHY = {400: "invalid request", 401: "missing, unknown, revoked or expired API key",
       403: "not allowed (admin route, or a storage quota)", 404: "no such adapter, model, tenant or key",
       405: "method not allowed", 408: "the request body stalled", 409: "already exists",
       413: "body too large", 429: "rate limit, concurrency limit or full queue (Retry-After)",
       500: "the engine failed this request (generation_failed)", 503: "uploads busy (Retry-After)",
       507: "the store's disk is full"}
AUTHED = (401, 429)  # every route behind a key: rate-limit headers and 429 apply to tenants
BODY = (400, 408, 413)
GENERATION = BODY + (404, 500)


def statuses(path: str, method: str) -> tuple[int, ...]:
    """The error statuses one operation can answer."""
    if path.startswith("/health") or path == "/metrics":
        return ()
    extra: tuple[int, ...] = AUTHED + (400,)
    if path in ("/v1/completions", "/v1/chat/completions"):
        extra += GENERATION
    elif path.startswith("/adapters"):
        extra += (404,) + ({"put": (403, 408, 413, 503, 507), "patch": BODY + (403,)}.get(method, ()))
    elif path.startswith("/admin"):
        extra += (403, 404) + (BODY + (409,) if method in ("post", "patch") else ())
    elif path.startswith("/v1/models/"):
        extra += (404,)
    return tuple(sorted(set(extra)))


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = doc.setdefault("components", {})
        comps.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        comps.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                _fix(path, method, op)
        comps["schemas"].pop("HTTPValidationError", None)
        comps["schemas"].pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _fix(path: str, method: str, op: dict) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    for status in statuses(path, method):
        responses.setdefault(str(status), {"description": WHY[status], "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    if 401 in statuses(path, method):
        op["security"] = [{"bearer": []}]
    if path == "/adapters/{name}" and method == "put":  # the route reads the raw body itself
        op["requestBody"] = {"required": True, "description": "the adapter's safetensors file (curl --data-binary)",
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}
    if path in ("/v1/completions", "/v1/chat/completions"):
        ok = responses.setdefault("200", {"description": "the response"})
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"type": "string", "description": "with stream: true, `data: {chunk}` events ending "
                                                         "with `data: [DONE]`"}}
