"""Name resolution per principal: who may read, use and write which adapter; everything else is a 404."""

from __future__ import annotations

import pytest

from server.store import AdapterNotFound, InvalidAdapterId
from server.tenancy.access import resolve
from server.tenancy.quotas import Quota
from server.tenancy.service import Principal

ALPHA = Principal("tenant", "alpha", "k1", Quota())
ADMIN = Principal("admin", "default", "k0", Quota())
PUBLIC = {("beta", "shared")}


def is_public(tenant: str, adapter_id: str) -> bool:
    return (tenant, adapter_id) in PUBLIC


CASES = [  # principal, name, write, canonical name (None: 404), shown name
    (ALPHA, "bot", False, "alpha/bot", "bot"),
    (ALPHA, "alpha/bot", True, "alpha/bot", "bot"),
    (ALPHA, "beta/bot", False, None, None),
    (ALPHA, "beta/bot", True, None, None),
    (ALPHA, "beta/shared", False, "beta/shared", "beta/shared"),
    (ALPHA, "beta/shared", True, None, None),
    (ADMIN, "bot", True, "default/bot", "bot"),
    (ADMIN, "beta/bot", True, "beta/bot", "beta/bot"),
]


@pytest.mark.parametrize("principal,name,write,canonical,shown", CASES)
def test_resolve(principal, name, write, canonical, shown):
    if canonical is None:
        with pytest.raises(AdapterNotFound) as exc:
            resolve(principal, name, write=write, is_public=is_public)
        assert str(exc.value) == f"adapter {name!r} not found"
        return
    ref = resolve(principal, name, write=write, is_public=is_public)
    assert (ref.name, ref.shown) == (canonical, shown)


@pytest.mark.parametrize("name", ["", "a/b/c", "../x", "x\n", "a b", "./x", "x/..", "/x", "é"])
def test_malformed_names_are_invalid(name):
    with pytest.raises(InvalidAdapterId):
        resolve(ADMIN, name, write=False, is_public=is_public)
