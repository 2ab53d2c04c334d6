"""The fleet's two Ray Serve deployments.

* `Replica` (N of them): the unchanged svdserve FastAPI app (`server.app.create_app`) with its engine, run
  in-process; `relay` answers one HTTP request through it (server.fleet.bridge). It declares the adapter it is
  asked for to Ray Serve's model multiplexing (`serve.multiplexed`, keyed `tenant/id`), so Ray's router sends
  later requests for that adapter to a replica that already holds it. Holding an adapter means its parsed file
  is in this replica's store cache; the engine puts it in a device slot on admission, as on one server.
* `Ingress` (one): the HTTP entry behind Ray Serve's proxy. It resolves each request's routing key (the
  `serve_multiplexed_model_id` of the request: `tenant/id` from the API key and `adapter_id`/`model`, see
  routing.py) and relays the request to a replica with it; streams pass through, and a client that hangs up
  cancels the replica's call, which tells the app `http.disconnect`, which aborts the engine request. A replica
  that died before answering is retried on another. Replicas report their counters to it every second:
  `GET /fleet/replicas` (admin) shows them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.types import Message, Receive, Scope, Send

from server.config import Config
from server.errors import error_response
from server.fleet.bridge import Head, forward, serve_asgi
from server.fleet.routing import Principals, bearer, routing_key

log = logging.getLogger("server.fleet")

APP_NAME = "svdserve"
REPLICA_HEADER = b"x-svdserve-replica"  # on every response: which replica answered
REPORT_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0  # a replica silent this long is left out of /fleet/replicas (dead or replaced)
ATTEMPTS = 3  # a request whose replica died before answering is sent again, this many times in all
ROUTINGS = ("affinity", "random")


class Held:
    """An adapter a replica holds for Ray Serve's multiplexing. Ray calls `__del__` when it evicts the id
    (least recently used beyond `max_num_models_per_replica`)."""

    def __init__(self, name: str, held: dict[str, Held]):
        self.name, self._held = name, held
        held[name] = self

    def __del__(self) -> None:  # called by Ray at eviction, and again by the garbage collector later
        if self._held.get(self.name) is self:  # not a newer Held of the same adapter, loaded since
            del self._held[self.name]


@serve.deployment(name="Replica")
class Replica:
    async def __init__(self, config: Config, cpus: float, max_models: int):
        import torch

        from server.app import create_app

        torch.set_num_threads(max(1, int(cpus)))
        self.app = create_app(config)
        lifespan = self.app.router.lifespan_context(self.app)
        await lifespan.__aenter__()  # loads the model, opens the store and the database, starts the engine
        self._lifespan = lifespan
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.started = time.time()
        self.requests, self.loads = 0, 0
        self.by_adapter: Counter[str] = Counter()
        self.held: dict[str, Held] = {}

        async def load(name: str) -> Held:  # a plain function: Ray keeps its cache as an attribute on it
            return await self._load(name)

        self.hold = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self._ingress = serve.get_deployment_handle("Ingress", context.app_name)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _load(self, name: str) -> Held:
        store = self.app.state.store
        await asyncio.to_thread(store.get, name)  # parsed into host memory; raises for a missing adapter
        self.loads += 1
        return Held(name, self.held)

    async def relay(self, head: Head, body: bytes) -> AsyncIterator[list[Message]]:
        """Answer one HTTP request with the app; yields its ASGI messages (streamed by the caller)."""
        name = serve.get_multiplexed_model_id()
        self.requests += 1
        if name:
            self.by_adapter[name] += 1
            try:
                await self.hold(name)
            except Exception as exc:  # not stored (any more), or unreadable: the app answers with the right error
                log.info("replica %s does not hold %s: %s: %s", self.id, name, type(exc).__name__, exc)
        async for messages in serve_asgi(self.app, head, body, [(REPLICA_HEADER, self.id.encode())]):
            yield messages

    async def base_model(self) -> str:
        return self.app.state.served.name

    def snapshot(self) -> dict:
        engine, counters = self.app.state.engine, getattr(self.app.state.store, "counters", None)
        return {"replica": self.id, "pid": os.getpid(), "started": self.started, "requests": self.requests,
                "multiplexed_loads": self.loads, "held": sorted(self.held),
                "requests_by_adapter": dict(self.by_adapter.most_common(256)), "engine": engine.stats(),
                "store": dict(vars(counters)) if counters is not None else {}}

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._ingress.report.remote(self.snapshot())
            except Exception as exc:  # the ingress restarting: report again next time
                log.debug("replica %s: report failed: %s", self.id, exc)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:  # Ray Serve calls it at a graceful stop, even after a failed __init__
        if hasattr(self, "_reporter"):
            self._reporter.cancel()
        if hasattr(self, "_lifespan"):
            await self._lifespan.__aexit__(None, None, None)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, replica: DeploymentHandle, config: Config, routing: str = "affinity"):
        from server.tenancy.database import Database
        from server.tenancy.service import TenancyService

        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        self.replica, self.routing, self.config = replica, routing, config
        t = config.tenancy
        self.db = Database(t.database_url)  # the replicas migrate it; routing only reads keys
        self.principals = Principals(TenancyService(self.db, t.default_quota, t.admin_key), t.open_allowed)
        self.reports: dict[str, tuple[float, dict]] = {}
        self.base: str | None = None
        h = config.http
        self.max_body = max(h.max_request_bytes, h.max_adapter_bytes)
        self.body_timeout_s = h.upload_timeout_seconds

    def __serve_build_asgi_app__(self) -> _Asgi:
        return _Asgi(self)

    async def report(self, snapshot: dict) -> None:
        self.reports[snapshot["replica"]] = (time.monotonic(), snapshot)

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, on_shutdown=self.db.dispose)
        elif scope["type"] != "http":
            return
        elif scope["path"] == "/fleet/replicas" and scope["method"] == "GET":
            await self._replicas(scope, receive, send)
        else:
            await self._forward(scope, receive, send)

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await forward(scope, receive, tracked, self._call, max_bytes=self.max_body, timeout_s=self.body_timeout_s)
        except (RayActorError, ActorUnavailableError) as exc:
            log.warning("fleet: %s %s failed on its replica: %s", scope["method"], scope["path"], exc)
            if not started:
                await error_response(503, "no replica could answer the request; try again",
                                     headers={"Retry-After": "1"})(scope, receive, send)

    async def _call(self, head: Head, body: bytes) -> AsyncIterator[list[Message]]:
        handle = self.replica.options(stream=True, multiplexed_model_id=await self._key(head, body))
        for attempt in range(ATTEMPTS):
            answered, responses = False, handle.relay.remote(head, body)
            try:
                async for messages in responses:
                    answered = True
                    yield messages
                return
            except (RayActorError, ActorUnavailableError) as exc:
                if answered or attempt == ATTEMPTS - 1:
                    raise
                log.warning("fleet: replica gone before answering (%s); trying another", type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
            finally:
                responses.cancel()  # a no-op once it finished; else the replica's call ends (client left)

    async def _key(self, head: Head, body: bytes) -> str:
        if self.routing != "affinity":
            return ""
        if self.base is None:
            self.base = await self.replica.base_model.remote()
        return await asyncio.to_thread(routing_key, self.principals, head.method, head.path,
                                       head.header(b"authorization"), body, self.base)

    async def _replicas(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = bearer(Head.of(scope).header(b"authorization"))
        principal = await asyncio.to_thread(self.principals.of, key)
        if principal is None or not principal.is_admin:
            status, message = (401, "invalid or missing API key") if principal is None else (403, "admin only")
            await error_response(status, message)(scope, receive, send)
            return
        now = time.monotonic()
        live = [dict(s, age_s=round(now - t, 3)) for t, s in self.reports.values() if now - t < STALE_AFTER_S]
        body = json.dumps({"routing": self.routing, "replicas": sorted(live, key=lambda s: s["replica"])}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _Asgi:
    """The ingress's ASGI app (a callable object: uvicorn's interface detection takes a bound method for ASGI 2)."""

    def __init__(self, ingress: Ingress):
        self.ingress = ingress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.ingress.asgi(scope, receive, send)


async def _lifespan(receive: Receive, send: Send, on_shutdown) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
