"""The tenants' database schema (SQLAlchemy 2 declarative). Alembic migrations in migrations/ create it; a
change here needs a new revision there.

Usage and audit rows name the tenant by its name, not by a foreign key: deleting a tenant removes its keys and
adapters but never the record of what it used or did (billing and audit outlive the account).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    quota: Mapped[dict] = mapped_column(JSON, default=dict)  # overrides of the server-wide defaults
    weight: Mapped[int] = mapped_column(Integer, default=1)  # share in fair admission
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    """An API key, kept only as the sha256 of the key; `tenant_id` None is an admin key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))  # the first characters, to recognise a key in listings
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PublicAdapter(Base):
    """Adapters an admin made visible (read and use, never write) to every tenant."""

    __tablename__ = "public_adapters"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(64), primary_key=True)


class UsageRecord(Base):
    """One finished API request: what it cost, as its response's `usage` said."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_tenant_hour", "tenant", "hour"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    hour: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # `at` truncated to the hour
    tenant: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str | None] = mapped_column(String(130), nullable=True)  # owner/id; None = base model
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    requests: Mapped[int] = mapped_column(Integer, default=1)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)


class AuditEvent(Base):
    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # who; None = the command line
    actor: Mapped[str] = mapped_column(String(64))  # "admin", a tenant's name, or "cli"
    action: Mapped[str] = mapped_column(String(32))  # adapter.put, adapter.replace, adapter.delete, tenant.create, ...
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class AdapterVersion(Base):
    """The S3 store's index: the version (sha256 of the bytes, the name of an immutable object) each adapter
    `tenant/id` is published at now, with what listings show. One row per adapter: publishing a version is one
    upsert, unpublishing one delete, each its own transaction that every replica sharing the database sees."""

    __tablename__ = "adapter_versions"
    __table_args__ = (Index("ix_adapter_versions_sha256", "sha256"),)

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[str] = mapped_column(String(32))
    rank: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
