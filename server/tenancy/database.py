"""The tenants' database: an SQLAlchemy engine on SQLite (embedded, the default) or PostgreSQL (shared by
the replicas of a fleet), brought to the newest schema by Alembic at start-up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
PG_MIGRATION_LOCK = 0x5D5E_7E5A  # pg_advisory_lock id: replicas starting together migrate one at a time


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (the driver we install), as libpq users expect."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def sqlite_url(path: str) -> str:
    return "sqlite:///" + os.path.abspath(path)


class Database:
    """One engine and session factory per process; `migrate()` before first use."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.engine: Engine = _engine(self.url)
        self.session: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> str:
        """Upgrade the schema to the newest revision (a no-op when it is there); returns that revision."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()

    def dispose(self) -> None:
        self.engine.dispose()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    memory = url in ("sqlite://", "sqlite:///:memory:")
    if not memory:
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    # one shared connection for an in-memory database (each new connection would be a new, empty database)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                           **({"poolclass": StaticPool} if memory else {}))

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # WAL: readers never wait for the writer; FKs on
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine
