"""The fleet's request relay without a cluster: a request carried as ASGI messages streams through, a consumer
that stops tells the app `http.disconnect`, an app that raises answers 500, bodies are bounded; and the routing
key is the adapter a replica will use, as `tenant/id`."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.fleet.bridge import Head, forward, serve_asgi
from server.fleet.routing import Principals, routing_key
from server.tenancy.database import Database
from server.tenancy.quotas import Quota
from server.tenancy.service import TenancyService


def _app(events: list[str]) -> Starlette:
    async def echo(request: Request):
        return JSONResponse({"body": (await request.body()).decode(), "q": request.url.query,
                             "auth": request.headers.get("authorization")})

    async def stream(request: Request):
        async def chunks():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream)])


def _head(method: str, path: str, query: bytes = b"", headers=()) -> Head:
    return Head(method=method, path=path, raw_path=path.encode(), query_string=query, headers=list(headers))


def _run(coro):
    return asyncio.run(coro)


async def _collect(gen) -> list[dict]:
    return [m async for batch in gen for m in batch]


def test_a_request_and_its_response_cross_intact():
    head = _head("POST", "/echo", b"x=1", [(b"authorization", b"Bearer k")])
    messages = _run(_collect(serve_asgi(_app([]), head, b"hello", [(b"x-svdserve-replica", b"r1")])))
    start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
    assert start["status"] == 200 and (b"x-svdserve-replica", b"r1") in start["headers"]
    assert json.loads(body) == {"body": "hello", "q": "x=1", "auth": "Bearer k"}


def test_a_stream_streams_and_a_consumer_that_leaves_disconnects_the_app():
    events: list[str] = []

    async def main() -> int:
        gen, seen = serve_asgi(_app(events), _head("GET", "/stream"), b""), 0
        async for batch in gen:
            seen += sum(1 for m in batch if m.get("body"))
            if seen >= 3:
                break
        await gen.aclose()  # what Ray Serve does when the client's call is cancelled
        return seen

    assert 3 <= _run(main()) < 1000  # chunks came one by one, not the whole stream at the end
    assert events == ["stream closed"]  # the app's own disconnect handling ran


def test_an_app_that_raises_before_answering_answers_500_in_openai_shape():
    async def boom(scope, receive, send):
        raise RuntimeError("bug")

    messages = _run(_collect(serve_asgi(boom, _head("GET", "/boom"), b"")))
    assert messages[0]["status"] == 500
    assert json.loads(messages[1]["body"])["error"]["type"] == "server_error"


def test_forward_refuses_a_body_over_the_limit_before_calling_a_replica():
    sent, called = [], []

    async def main() -> None:
        chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}] * 2

        async def receive():
            return chunks.pop(0)

        async def send(message):
            sent.append(message)

        async def call(head, body):
            called.append(body)
            yield []

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await forward(scope, receive, send, call, max_bytes=1000, timeout_s=5)

    _run(main())
    assert not called and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"


@pytest.fixture
def principals(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/tenants.db")
    db.migrate()
    service = TenancyService(db, Quota())
    service.create_tenant("acme", None, 1, None)
    service.create_tenant("zeta", None, 1, None)
    keys = {t: service.create_key(t, None, None, None)["key"] for t in ("acme", "zeta")}
    service.set_public("zeta", "shared", True, None)
    yield Principals(service), keys
    db.dispose()


@pytest.mark.parametrize("key_of,body,path,expected", [
    ("acme", {"model": "pirate"}, "/v1/completions", "acme/pirate"),
    ("zeta", {"model": "pirate"}, "/v1/chat/completions", "zeta/pirate"),  # same id, another tenant: another key
    ("acme", {"model": "acme/pirate"}, "/v1/completions", "acme/pirate"),  # named two ways: one key
    ("acme", {"model": "tiny", "adapter_id": "pirate"}, "/v1/completions", "acme/pirate"),
    ("acme", {"model": "zeta/shared"}, "/v1/completions", "zeta/shared"),  # another tenant's public adapter
    ("acme", {"model": "zeta/private"}, "/v1/completions", ""),  # not visible: no affinity, the replica 404s
    ("acme", {"model": "tiny"}, "/v1/completions", ""),  # the base model
    ("acme", {"model": "../etc"}, "/v1/completions", ""),  # invalid: the replica answers 400
    (None, {"model": "pirate"}, "/v1/completions", ""),  # no key (and keys exist: not open mode)
    ("acme", {"model": "pirate"}, "/v1/models", ""),  # not a generation route
])
def test_routing_key_is_the_adapter_a_replica_will_use(principals, key_of, body, path, expected):
    p, keys = principals
    auth = f"Bearer {keys[key_of]}".encode() if key_of else None
    assert routing_key(p, "POST", path, auth, json.dumps(body).encode(), "tiny") == expected


def test_routing_key_of_a_body_that_is_not_json_is_empty(principals):
    p, keys = principals
    assert routing_key(p, "POST", "/v1/completions", f"Bearer {keys['acme']}".encode(), b"{nope", "tiny") == ""
