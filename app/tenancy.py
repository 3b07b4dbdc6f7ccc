"""Tenants: API keys -> tenant, per-tenant limits, and the prefix-cache salt that isolates tenants.

Life cycle: the ingress builds one `TenantDirectory` from config at start. Each request's
`Authorization: Bearer <key>` resolves to a tenant (401 when auth is on and the key is missing or
wrong; every key is compared in constant time and no key is ever logged or echoed). The tenant then
- salts vLLM's prefix cache (`cache_salt`), so a tenant's prompt never hits blocks cached from another
  tenant's identical prompt, while the same tenant's repeat does;
- binds any `kv_cache_id` it parks, so another tenant cannot use, or even detect, it;
- holds a slot of its concurrency limit for the request's lifetime (429 with Retry-After past it).
With auth off every request belongs to the tenant `default`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.api.protocol import OpenAIError

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    name: str
    max_concurrent_requests: int | None = None
    max_parked_kv: int | None = None

    @property
    def cache_salt(self) -> str:
        """Opaque per-tenant salt for vLLM's prefix cache (the name itself never reaches the engine)."""
        return hashlib.sha256(f"pdserve-tenant:{self.name}".encode()).hexdigest()[:32]


def parse_keys(text: str) -> dict[str, str]:
    """`{"tenant": ["key", ...]}` JSON, or `tenant:key,tenant:key` -> {key: tenant}."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        data = json.loads(text)
        return {key: tenant for tenant, keys in data.items() for key in ([keys] if isinstance(keys, str) else keys)}
    mapping = {}
    for item in text.split(","):
        tenant, sep, key = item.strip().partition(":")
        if not sep or not tenant or not key:
            raise ValueError("API keys must look like 'tenant:key,tenant:key' (or a JSON object tenant -> keys)")
        mapping[key] = tenant
    return mapping


class TenantDirectory:
    def __init__(self, enabled: bool, keys: dict[str, str], limits: dict[str, Tenant] | None = None,
                 default_limits: Tenant | None = None):
        if enabled and not keys:
            raise ValueError("auth is enabled but no API keys are configured (auth.keys_file or auth.keys_env)")
        self.enabled = enabled
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]
        self._limits = limits or {}
        self._default = default_limits or Tenant(DEFAULT_TENANT)
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, auth) -> TenantDirectory:
        keys: dict[str, str] = {}
        if auth.keys_file:
            keys.update(parse_keys(Path(auth.keys_file).read_text()))
        if auth.keys_env and os.environ.get(auth.keys_env):
            keys.update(parse_keys(os.environ[auth.keys_env]))
        default = Tenant(DEFAULT_TENANT, auth.max_concurrent_requests_per_tenant, auth.max_parked_kv_per_tenant)
        return cls(auth.enabled, keys, default_limits=default)

    def tenant(self, name: str) -> Tenant:
        if name in self._limits:
            return self._limits[name]
        return Tenant(name, self._default.max_concurrent_requests, self._default.max_parked_kv)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; raises a 401 `OpenAIError` when auth is on and the key is not valid."""
        if not self.enabled:
            return self.tenant(DEFAULT_TENANT)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                              code="invalid_api_key")
        offered = token.strip().encode()
        found = None
        for key, tenant in self._keys:  # every key compared, in constant time each
            if hmac.compare_digest(key, offered):
                found = tenant
        if found is None:
            raise OpenAIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        return self.tenant(found)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return {name: count for name, count in self._in_flight.items() if count}

    @contextmanager
    def admit(self, tenant: Tenant) -> Iterator[None]:
        """Hold one of the tenant's concurrent-request slots (429 when none is free)."""
        with self._lock:
            current = self._in_flight.get(tenant.name, 0)
            if tenant.max_concurrent_requests is not None and current >= tenant.max_concurrent_requests:
                raise OpenAIError(429, f"too many concurrent requests for this tenant (limit "
                                  f"{tenant.max_concurrent_requests}); retry later", type="rate_limit_error",
                                  code="tenant_concurrency_limit", headers={"Retry-After": "1"})
            self._in_flight[tenant.name] = current + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[tenant.name] -= 1
