"""Tenants, keys, public adapters, usage and audit over the database. Synchronous (SQLAlchemy sessions);
the HTTP layer calls it from a thread pool, the CLI directly.

Names: tenants are 1–64 characters of [A-Za-z0-9._-], not starting with '.', matched in full. Every
write that changes tenants or keys is audited in the same transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from server.tenancy import keys
from server.tenancy.database import Database
from server.tenancy.models import ApiKey, AuditEvent, PublicAdapter, Tenant, UsageRecord
from server.tenancy.quotas import Quota, check_quota

DEFAULT_TENANT = "default"  # owns the adapters of open mode and of a store from before tenants
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


class TenancyError(Exception):
    status = 400
    code = "invalid_request"


class NotFound(TenancyError):
    status, code = 404, "not_found"


class Conflict(TenancyError):
    status, code = 409, "conflict"


class Invalid(TenancyError, ValueError):
    status, code = 400, "invalid_request"


@dataclass(frozen=True)
class Principal:
    """Who a request is: the admin, or one tenant. `tenant` is the home tenant whose adapters plain ids
    name (the admin's is `default`)."""

    role: Literal["admin", "tenant"]
    tenant: str
    key_id: str | None
    quota: Quota
    weight: int = 1

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        return "admin" if self.is_admin else self.tenant


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(t: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; everything we store is UTC."""
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def check_name(name: object, what: str = "tenant name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise Invalid(f"invalid {what} {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')")
    return name


def iso(t: datetime | None) -> str | None:
    return as_utc(t).astimezone(timezone.utc).isoformat() if t is not None else None


def tenant_out(t: Tenant, defaults: Quota) -> dict:
    return {"id": t.id, "object": "tenant", "name": t.name, "quota": dict(t.quota or {}),
            "effective_quota": defaults.override(t.quota or {}).as_dict(), "weight": t.weight,
            "created_at": iso(t.created_at)}


def key_out(k: ApiKey, tenant: str | None) -> dict:
    return {"id": k.id, "object": "api_key", "tenant": tenant, "role": "admin" if tenant is None else "tenant",
            "prefix": k.prefix, "description": k.description, "created_at": iso(k.created_at),
            "expires_at": iso(k.expires_at), "revoked_at": iso(k.revoked_at)}


class TenancyService:
    def __init__(self, db: Database, defaults: Quota, admin_key: str | None = None):
        self.db, self.defaults = db, defaults
        self._admin_hash = keys.hash_key(admin_key) if admin_key else None

    # ---- identity -----------------------------------------------------------------------------------
    def open_mode(self) -> bool:
        """No admin key configured and no live key in the database: every (loopback) client is the admin."""
        if self._admin_hash is not None:
            return False
        now = utcnow()
        with self.db.session() as s:
            live = s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))
            if not live:
                return True
            rows = s.scalars(select(ApiKey.expires_at).where(ApiKey.revoked_at.is_(None))).all()
        return all(e is not None and as_utc(e) <= now for e in rows)

    def open_principal(self) -> Principal:
        return Principal("admin", DEFAULT_TENANT, None, self.defaults)

    def authenticate(self, key: str) -> Principal | None:
        """The principal a key names, or None (unknown, revoked or expired key)."""
        digest = keys.hash_key(key)
        if self._admin_hash is not None and keys.same_hash(digest, self._admin_hash):
            return Principal("admin", DEFAULT_TENANT, "config", self.defaults)
        with self.db.session() as s:
            row = s.execute(select(ApiKey, Tenant).outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
                            .where(ApiKey.key_hash == digest)).first()
        if row is None:
            return None
        k, t = row
        if not keys.same_hash(k.key_hash, digest) or k.revoked_at is not None:
            return None
        if k.expires_at is not None and as_utc(k.expires_at) <= utcnow():
            return None
        if k.tenant_id is None:
            return Principal("admin", DEFAULT_TENANT, k.id, self.defaults)
        return Principal("tenant", t.name, k.id, self.defaults.override(t.quota or {}), t.weight)

    # ---- tenants ------------------------------------------------------------------------------------
    def ensure_tenant(self, name: str) -> None:
        with self.db.session() as s:
            if s.scalar(select(Tenant.id).where(Tenant.name == name)) is None:
                s.add(Tenant(name=name, quota={}, weight=1, created_at=utcnow()))
                try:
                    s.commit()
                except IntegrityError:  # another replica made it meanwhile
                    s.rollback()

    def create_tenant(self, name: str, quota: dict | None, weight: int, by: Principal | None) -> dict:
        check_name(name)
        quota = _check_quota(quota or {})
        _check_weight(weight)
        with self.db.session() as s:
            t = Tenant(name=name, quota=quota, weight=weight, created_at=utcnow())
            s.add(t)
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"tenant {name!r} already exists") from None
            self._audit(s, by, "tenant.create", name, {"quota": quota, "weight": weight})
            s.commit()
            return tenant_out(t, self.defaults)

    def list_tenants(self) -> list[dict]:
        with self.db.session() as s:
            return [tenant_out(t, self.defaults) for t in s.scalars(select(Tenant).order_by(Tenant.name))]

    def get_tenant(self, name: str) -> dict:
        with self.db.session() as s:
            return tenant_out(self._tenant(s, name), self.defaults)

    def weights(self) -> dict[str, int]:
        with self.db.session() as s:
            return dict(s.execute(select(Tenant.name, Tenant.weight)).all())

    def update_tenant(self, name: str, quota: dict | None, weight: int | None, by: Principal | None) -> dict:
        with self.db.session() as s:
            t = self._tenant(s, name)
            if quota is not None:
                merged = {**(t.quota or {}), **_check_quota(quota)}
                t.quota = {k: v for k, v in merged.items() if v is not None or k in quota}
            if weight is not None:
                t.weight = _check_weight(weight)
            self._audit(s, by, "tenant.update", name, {"quota": quota, "weight": weight})
            s.commit()
            return tenant_out(t, self.defaults)

    def delete_tenant(self, name: str, by: Principal | None) -> None:
        """Remove the tenant and its keys (the caller removes its adapters); usage and audit stay."""
        with self.db.session() as s:
            t = self._tenant(s, name)
            s.execute(delete(ApiKey).where(ApiKey.tenant_id == t.id))
            s.execute(delete(PublicAdapter).where(PublicAdapter.tenant == name))
            s.delete(t)
            self._audit(s, by, "tenant.delete", name, {})
            s.commit()

    def tenant_exists(self, name: str) -> bool:
        with self.db.session() as s:
            return s.scalar(select(Tenant.id).where(Tenant.name == name)) is not None

    def _tenant(self, s, name: str) -> Tenant:
        t = s.scalar(select(Tenant).where(Tenant.name == name)) if isinstance(name, str) else None
        if t is None:
            raise NotFound(f"tenant {name!r} not found")
        return t

    # ---- keys ---------------------------------------------------------------------------------------
    def create_key(self, tenant: str | None, description: str | None, expires_at: datetime | None,
                   by: Principal | None) -> dict:
        """A new key for `tenant` (None: an admin key). The answer is the only place the key appears."""
        key = keys.new_key()
        with self.db.session() as s:
            tenant_id = self._tenant(s, tenant).id if tenant is not None else None
            k = ApiKey(id=keys.new_key_id(), tenant_id=tenant_id, key_hash=keys.hash_key(key),
                       prefix=keys.shown_prefix(key), description=description, created_at=utcnow(),
                       expires_at=as_utc(expires_at))
            s.add(k)
            self._audit(s, by, "key.create", k.id, {"tenant": tenant, "prefix": k.prefix})
            s.commit()
            return {**key_out(k, tenant), "key": key}

    def list_keys(self, tenant: str | None) -> list[dict]:
        """Keys of a tenant (None: every key); never the key itself."""
        with self.db.session() as s:
            q = select(ApiKey, Tenant.name).outerjoin(Tenant, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at)
            if tenant is not None:
                q = q.where(ApiKey.tenant_id == self._tenant(s, tenant).id)
            return [key_out(k, name) for k, name in s.execute(q)]

    def revoke_key(self, key_id: str, by: Principal | None) -> dict:
        with self.db.session() as s:
            row = s.execute(select(ApiKey, Tenant.name).outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
                            .where(ApiKey.id == key_id)).first()
            if row is None:
                raise NotFound(f"key {key_id!r} not found")
            k, name = row
            if k.revoked_at is None:
                k.revoked_at = utcnow()
                self._audit(s, by, "key.revoke", k.id, {"tenant": name})
            s.commit()
            return key_out(k, name)

    # ---- public adapters ----------------------------------------------------------------------------
    def is_public(self, tenant: str, adapter_id: str) -> bool:
        with self.db.session() as s:
            return s.get(PublicAdapter, (tenant, adapter_id)) is not None

    def public_adapters(self) -> set[tuple[str, str]]:
        with self.db.session() as s:
            return set(s.execute(select(PublicAdapter.tenant, PublicAdapter.adapter_id)).all())

    def set_public(self, tenant: str, adapter_id: str, public: bool, by: Principal | None) -> None:
        with self.db.session() as s:
            row = s.get(PublicAdapter, (tenant, adapter_id))
            if public and row is None:
                s.add(PublicAdapter(tenant=tenant, adapter_id=adapter_id))
            elif not public and row is not None:
                s.delete(row)
            self._audit(s, by, "adapter.visibility", f"{tenant}/{adapter_id}",
                        {"visibility": "public" if public else "private"})
            s.commit()

    def drop_public(self, tenant: str, adapter_id: str) -> None:
        """Forget the visibility of a deleted adapter (a new adapter of that id starts private)."""
        with self.db.session() as s:
            s.execute(delete(PublicAdapter).where(PublicAdapter.tenant == tenant,
                                                  PublicAdapter.adapter_id == adapter_id))
            s.commit()

    # ---- usage --------------------------------------------------------------------------------------
    def record_usage(self, tenant: str, adapter: str | None, key_id: str | None, prompt_tokens: int,
                     completion_tokens: int, at: datetime | None = None) -> None:
        at = at or utcnow()
        with self.db.session() as s:
            s.add(UsageRecord(at=at, hour=at.replace(minute=0, second=0, microsecond=0), tenant=tenant,
                              adapter=adapter, key_id=key_id, requests=1, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens))
            s.commit()

    def usage(self, start: datetime | None, end: datetime | None, tenant: str | None) -> list[dict]:
        """Requests and tokens per tenant, adapter and hour in [start, end); `tenant` None: every tenant."""
        cols = (UsageRecord.tenant, UsageRecord.adapter, UsageRecord.hour)
        q = (select(*cols, func.sum(UsageRecord.requests), func.sum(UsageRecord.prompt_tokens),
                    func.sum(UsageRecord.completion_tokens)).group_by(*cols)
             .order_by(UsageRecord.hour, UsageRecord.tenant, UsageRecord.adapter.asc().nulls_first()))
        if start is not None:
            q = q.where(UsageRecord.at >= start)
        if end is not None:
            q = q.where(UsageRecord.at < end)
        if tenant is not None:
            q = q.where(UsageRecord.tenant == tenant)
        with self.db.session() as s:
            rows = s.execute(q).all()
        return [{"tenant": t, "adapter": a, "hour": iso(h), "requests": int(r), "prompt_tokens": int(p),
                 "completion_tokens": int(c), "total_tokens": int(p) + int(c)} for t, a, h, r, p, c in rows]

    # ---- audit --------------------------------------------------------------------------------------
    def audit(self, by: Principal | None, action: str, target: str, detail: dict) -> None:
        with self.db.session() as s:
            self._audit(s, by, action, target, detail)
            s.commit()

    def audit_events(self, limit: int, tenant: str | None = None, action: str | None = None) -> list[dict]:
        q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if tenant is not None:
            q = q.where((AuditEvent.actor == tenant) | AuditEvent.target.startswith(tenant + "/")
                        | (AuditEvent.target == tenant))
        if action is not None:
            q = q.where(AuditEvent.action == action)
        with self.db.session() as s:
            return [{"id": e.id, "object": "audit_event", "at": iso(e.at), "key_id": e.key_id, "actor": e.actor,
                     "action": e.action, "target": e.target, "detail": e.detail} for e in s.scalars(q)]

    @staticmethod
    def _audit(s, by: Principal | None, action: str, target: str, detail: dict) -> None:
        s.add(AuditEvent(at=utcnow(), key_id=by.key_id if by else None, actor=by.actor if by else "cli",
                         action=action, target=target, detail=detail))


def _check_quota(values: object) -> dict:
    try:
        return check_quota(values)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _check_weight(weight: object) -> int:
    if type(weight) is not int or not 1 <= weight <= 1000:
        raise Invalid("weight must be an integer in [1, 1000]")
    return weight


def parse_time(value: str | None, what: str) -> datetime | None:
    """ISO 8601 (a date, or a date and time; UTC when no zone is given), or None."""
    if value is None or value == "":
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, TypeError):
        raise Invalid(f"{what} must be an ISO 8601 date or time, e.g. 2026-12-03 or 2026-12-03T10:00:00Z") from None
    return as_utc(t)


def since(spec: str) -> datetime:
    """'24h', '7d', '30m' ago, or an ISO time."""
    m = re.fullmatch(r"(\d+)([mhd])", spec.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return utcnow() - timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: n})
    t = parse_time(spec, "--since")
    assert t is not None
    return t
