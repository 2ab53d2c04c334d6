"""The FastAPI application: `create_app(config)` builds it; its lifespan loads the model, opens the adapter
store and starts the engine before the first request, and stops the engine at shutdown."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from server.api import routers
from server.api.auth import RateLimitHeaders
from server.api.http_limits import BodyLimit, Options
from server.api.openapi import install_openapi
from server.api.deps import Served
from server.config import Config
from server.errors import install_error_handlers
from server.tools.template import DEFAULT_MODEL_TEMPLATE
from server.logs import RequestId
from server.metrics import Metrics
from server.startup import StartupError, report

log = logging.getLogger(__name__)


def load_model(config: Config):
    """The base model with its SVD factors and adapter slots, as the config asks."""
    import torch

    from adapters.runtime import load_adapted_model

    m = config.model
    return load_adapted_model(m.path, r_max=m.max_rank, cache_dir=m.cache_dir, n_slots=m.n_slots,
                              device=m.device, dtype=getattr(torch, m.dtype), targets=m.targets, progress=False,
                              kernels=m.cpu_kernels, kernel_dir=m.kernel_dir)


def open_tenancy(config: Config, store=None):
    """The tenants' database (migrated to the newest schema), its service, and the `default` tenant that owns
    open mode's adapters and those of a store from before tenants (adopted here, nothing lost)."""
    from server.api.auth import Tenancy
    from server.tenancy.database import Database
    from server.tenancy.service import DEFAULT_TENANT, TenancyService

    t = config.tenancy
    db = Database(t.database_url)
    revision = db.migrate()
    service = TenancyService(db, t.default_quota, t.admin_key)
    service.ensure_tenant(DEFAULT_TENANT)
    if store is not None:
        moved = store.adopt_legacy()
        if moved:
            log.info("adopted %d adapters of an earlier store into tenant %r: %s", len(moved), DEFAULT_TENANT,
                     ", ".join(moved))
    log.info("tenants' database %s (%s, schema %s)", _safe_url(db.url), db.dialect, revision)
    return Tenancy(service, open_allowed=t.open_allowed)


def open_store_and_tenancy(config: Config, spec):
    """The adapter store --store names and the tenants' database. A local store is opened first (its checks
    name an unusable directory before the database, which defaults to a file in it, is touched); an s3:// store
    after the database, which holds its index."""
    from server.config import default_store_cache_dir
    from server.store import is_s3_url, open_store

    def store(engine=None):
        return open_store(config.store, spec, engine=engine, cache_dir=config.store_cache_dir or default_store_cache_dir(),
                          cache_bytes=config.store_cache_bytes, parsed_cache_bytes=config.parsed_adapter_cache_bytes)

    if not is_s3_url(config.store):
        local = store()
        return local, open_tenancy(config, local)
    tenancy = open_tenancy(config)
    try:
        return store(tenancy.service.db.engine), tenancy
    except BaseException:
        tenancy.service.db.dispose()
        raise


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def create_app(config: Config, model=None) -> FastAPI:
    """The app for `config`. `model` (an AdaptedModel whose base carries a tokenizer) skips loading, for
    tests on tiny models; by default the lifespan loads `config.model`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from server.engine import Engine
        from server.heap import freeze_startup_heap, thaw_heap

        started = time.monotonic()
        adapted = model if model is not None else await anyio.to_thread.run_sync(load_model, config)
        tokenizer = adapted.base.tokenizer
        template = config.model.chat_template or (DEFAULT_MODEL_TEMPLATE if model is None and not config.model.path
                                                  else None)
        if template:
            from server.tools import load_chat_template

            tokenizer.chat_template = load_chat_template(template)
        # indexes the headers (local) or checks the bucket (S3); StoreNotWritable names what cannot be used
        try:
            store, tenancy = await anyio.to_thread.run_sync(open_store_and_tenancy, config, adapted.spec)
            engine = Engine(config.engine, adapted, tokenizer, store, weight=tenancy.weight)
        except StartupError as exc:  # what to change, in one line (server/startup.py)
            report(exc)
            raise
        watch(app.state.metrics, engine, store, adapted.base.name, config.engine.max_resident_adapters)
        freeze_startup_heap()  # full GC passes over the model's objects stalled every stream (server/heap.py)
        engine.start()
        app.state.config, app.state.store, app.state.engine, app.state.tokenizer = config, store, engine, tokenizer
        app.state.tenancy = tenancy
        if await tenancy.open_mode():
            log.warning("open mode: no API key is configured, so every client of %s:%d acts as the admin. "
                        "Create a tenant and a key (python -m server tenants create NAME; python -m server keys "
                        "create --tenant NAME) or set SVDSERVE_ADMIN_KEY to require keys.",
                        config.http.host, config.http.port)
        app.state.served = Served(name=adapted.base.name, fingerprint=adapted.base.fingerprint,
                                  created=int(time.time()), max_model_len=config.engine.max_model_len)
        log.info("serving %s (fingerprint %s) on %s in %s (OSoRA rows: %s), store %s; ready in %.1f s",
                 adapted.base.name, adapted.base.fingerprint, config.model.device,
                 str(adapted.dtype).removeprefix("torch."), adapted.kernels, store.location,
                 time.monotonic() - started)
        try:
            yield
        finally:
            engine.shutdown()
            tenancy.service.db.dispose()
            thaw_heap()

    app = FastAPI(title="svdserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-style inference server for SVD-based LLM adapters")
    install_error_handlers(app)
    install_openapi(app)
    app.state.metrics = Metrics(config.http.metrics_max_tenants)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(Options)
    app.add_middleware(BodyLimit, max_bytes=config.http.max_request_bytes, timeout_s=config.http.upload_timeout_seconds)
    if config.http.allowed_origins:  # outermost, so a browser's preflight OPTIONS is answered by CORS
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.http.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-ratelimit-limit-requests",
                           "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                           "retry-after"])
    app.add_middleware(RequestId)  # outermost: every log line of a request carries its id
    for router in routers:
        app.include_router(router)
    return app


def watch(metrics, engine, store, model_name: str, max_lora: int) -> None:
    """Connect the app's metrics to its engine and store: queue times from the engine's steps, adapter load
    times from the store, and the gauges read from both when /metrics is scraped."""
    from server.metrics.router import EngineCollector

    metrics.registry.register(EngineCollector(engine, store, model_name, max_lora))
    engine.observer = metrics
    store.on_load = metrics.adapter_load.observe
