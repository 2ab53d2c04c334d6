"""Operators' commands on the tenants' database, no server needed:

    python -m server tenants create NAME [--quota '{"requests_per_minute": 60}'] [--weight N]
    python -m server tenants list | show NAME | delete NAME
    python -m server keys create --tenant NAME [--description TEXT] [--expires-at ISO] | keys create --admin
    python -m server keys list [--tenant NAME] | keys revoke KEY_ID
    python -m server usage [--since 24h|ISO] [--until ISO] [--tenant NAME]
    python -m server audit [--limit N]

The database is --database-url, else SVDSERVE_DATABASE_URL, else the SQLite file in the store (--store, else
SVDSERVE_STORE, else ./adapters-store) — the same one the server uses with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

COMMANDS = ("tenants", "keys", "usage", "audit")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=None, help="default: SVDSERVE_DATABASE_URL, else the store's SQLite")
    common.add_argument("--store", default=None, help="the server's --store (default: SVDSERVE_STORE or ./adapters-store)")
    p = argparse.ArgumentParser(prog="python -m server", description="svdserve tenants, keys, usage and audit",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    tenants = _Sub(sub.add_parser("tenants").add_subparsers(dest="action", required=True), common)
    create = tenants.add_parser("create")
    create.add_argument("name")
    create.add_argument("--quota", default=None, help="JSON object, e.g. '{\"requests_per_minute\": 60}'")
    create.add_argument("--weight", type=int, default=1)
    tenants.add_parser("list")
    tenants.add_parser("show").add_argument("name")
    tenants.add_parser("delete").add_argument("name")
    keys = _Sub(sub.add_parser("keys").add_subparsers(dest="action", required=True), common)
    kc = keys.add_parser("create")
    who = kc.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--admin", action="store_true", help="an admin key (stored hashed, like tenant keys)")
    kc.add_argument("--description", default=None)
    kc.add_argument("--expires-at", default=None, help="ISO 8601 time")
    keys.add_parser("list").add_argument("--tenant", default=None)
    keys.add_parser("revoke").add_argument("key_id")
    usage = sub.add_parser("usage", parents=[common])
    usage.add_argument("--since", default="24h", help="24h, 7d, 30m or an ISO time (default 24h)")
    usage.add_argument("--until", default=None)
    usage.add_argument("--tenant", default=None)
    audit = sub.add_parser("audit", parents=[common])
    audit.add_argument("--limit", type=int, default=50)
    return p


class _Sub:
    """Sub-commands that all take the common options (--database-url, --store)."""

    def __init__(self, sub, common: argparse.ArgumentParser):
        self.sub, self.common = sub, common

    def add_parser(self, name: str) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, parents=[self.common])


def database_url(args: argparse.Namespace) -> str:
    from server.config import default_database_url

    return (args.database_url or os.environ.get("SVDSERVE_DATABASE_URL")
            or default_database_url(store_root(args), os.environ.get("SVDSERVE_STORE_CACHE_DIR")))


def store_root(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("SVDSERVE_STORE") or "./adapters-store"


def run(argv: list[str]) -> int:
    from server.tenancy.database import Database
    from server.tenancy.quotas import Quota
    from server.tenancy.service import DEFAULT_TENANT, TenancyError, TenancyService

    args = parser().parse_args(argv)
    db = Database(database_url(args))
    db.migrate()
    service = TenancyService(db, Quota())
    service.ensure_tenant(DEFAULT_TENANT)
    try:
        _dispatch(args, service)
    except TenancyError as exc:
        print(f"python -m server {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0


def _dispatch(args: argparse.Namespace, service) -> None:
    from server.tenancy.service import parse_time, since

    cmd = (args.command, getattr(args, "action", None))
    if cmd == ("tenants", "create"):
        quota = json.loads(args.quota) if args.quota else None
        _print_json(service.create_tenant(args.name, quota, args.weight, None))
    elif cmd == ("tenants", "list"):
        _table(service.list_tenants(), ["name", "weight", "quota", "created_at"])
    elif cmd == ("tenants", "show"):
        _print_json(service.get_tenant(args.name))
    elif cmd == ("tenants", "delete"):
        _delete_tenant(args, service)
    elif cmd == ("keys", "create"):
        out = service.create_key(None if args.admin else args.tenant, args.description,
                                 parse_time(args.expires_at, "--expires-at"), None)
        print("# the key below is shown this once only: store it safely", file=sys.stderr)
        _print_json(out)
    elif cmd == ("keys", "list"):
        _table(service.list_keys(args.tenant), ["id", "tenant", "role", "prefix", "created_at", "expires_at",
                                                "revoked_at", "description"])
    elif cmd == ("keys", "revoke"):
        _print_json(service.revoke_key(args.key_id, None))
    elif args.command == "usage":
        rows = service.usage(since(args.since), parse_time(args.until, "--until"), args.tenant)
        _table(rows, ["hour", "tenant", "adapter", "requests", "prompt_tokens", "completion_tokens", "total_tokens"])
        print(f"total: {sum(r['requests'] for r in rows)} requests, {sum(r['prompt_tokens'] for r in rows)} prompt "
              f"+ {sum(r['completion_tokens'] for r in rows)} completion tokens")
    elif args.command == "audit":
        _table(service.audit_events(args.limit), ["at", "actor", "key_id", "action", "target", "detail"])


def _delete_tenant(args: argparse.Namespace, service) -> None:
    """Keys and the database row first, then the adapter files (a running server forgets them on their
    next use: the files are gone)."""
    import shutil

    from server.tenancy.service import DEFAULT_TENANT, Invalid

    if args.name == DEFAULT_TENANT:
        raise Invalid("the default tenant cannot be deleted")
    service.delete_tenant(args.name, None)
    shutil.rmtree(os.path.join(store_root(args), args.name), ignore_errors=True)
    print(f"deleted tenant {args.name!r}")


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, indent=2))


def _table(rows: list[dict], cols: list[str]) -> None:
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(v) -> str:
    if v is None:
        return "-"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)
