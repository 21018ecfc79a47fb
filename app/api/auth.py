"""API keys: who may call which route. The whole policy lives in this module.

Routes fall in three classes (:func:`route_access`), decided by path and method, never by each
route remembering to protect itself, so a route added later is protected by default:

* **open**: ``/livez``, ``/readyz``, ``/metrics``, ``/docs``, ``/redoc``, ``/openapi.json`` (probes,
  scrapers and the API documentation must work without a key);
* **admin**: every write under ``/v1/index`` (``POST``/``PUT``/``PATCH``/``DELETE``);
* **read**: everything else.

Keys come from ``MMFUSION_API_KEYS`` / ``MMFUSION_API_KEYS_FILE`` (read keys) and
``MMFUSION_ADMIN_KEYS`` / ``MMFUSION_ADMIN_KEYS_FILE`` (admin keys, also accepted on read routes).
A client sends one as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Which keys are configured decides what is open, chosen so that configuring *some* keys never
leaves the index writable by anyone:

============================  ===========================  ==============================
configured                    read routes                  index writes
============================  ===========================  ==============================
nothing                       open (warning at start)      open
admin keys only               open (public search)         admin key
read keys only                read or admin key            refused (403) for every key
read and admin keys           read or admin key            admin key
============================  ===========================  ==============================

No key / an unknown key where one is needed is 401 with ``WWW-Authenticate: Bearer``; a valid read
key on an admin route is 403.

Comparison is constant-time in the key and in which key matched: the presented key and every
configured key are SHA-256 hashed (so :func:`hmac.compare_digest` always compares 32 bytes and the
key length does not leak), and the presented key is compared with *every* configured key, with no
early exit on the first match.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.api.schemas import ErrorResponse
from app.core.errors import ForbiddenError, MMFusionError, UnauthorizedError

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger("mmfusion.auth")

OPEN_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})
ADMIN_PREFIX = "/v1/index"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MIN_RECOMMENDED_KEY_CHARS = 16
# Header values are visible ASCII; ',' separates keys in the env var and '#' starts a comment in files.
_KEY_PATTERN = re.compile(r"[\x21-\x7e]+")


class Access(enum.IntEnum):
    OPEN = 0
    READ = 1
    ADMIN = 2


class Role(enum.IntEnum):
    """What a presented key may do; ordered, so the better of two presented keys wins."""

    READ = 1
    ADMIN = 2


class KeyConfigError(MMFusionError):
    """Keys that cannot be loaded: the service refuses to start rather than run with partial auth."""

    status_code = 500
    code = "config_invalid"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(key: str) -> str:
    """A short fingerprint for logs (never log a key itself)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def _checked(key: str, where: str) -> str:
    if not _KEY_PATTERN.fullmatch(key) or "," in key or "#" in key:
        raise KeyConfigError(f"{where}: a key must be visible ASCII without spaces, ',' or '#'")
    if len(key) < MIN_RECOMMENDED_KEY_CHARS:
        log.warning("%s: key %s is shorter than %d characters; use a long random key, e.g. "
                    "`python -c \"import secrets; print(secrets.token_urlsafe(32))\"`",
                    where, key_id(key), MIN_RECOMMENDED_KEY_CHARS)
    return key


def parse_key_list(text: str, where: str) -> list[str]:
    """Comma-separated keys (an environment variable); blanks around and between are ignored."""
    return [_checked(part.strip(), where) for part in text.split(",") if part.strip()]


def read_key_file(path: Path, where: str) -> list[str]:
    """One key per line; ``#`` starts a comment, blank lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyConfigError(f"{where}: cannot read key file {path} ({exc})") from None
    keys: list[str] = []
    for number, line in enumerate(lines, start=1):
        content = line.split("#", 1)[0].strip()
        if content:
            keys.append(_checked(content, f"{where} {path} line {number}"))
    return keys


@dataclass(frozen=True)
class KeyRing:
    """SHA-256 digests of the configured keys (the keys themselves are not kept)."""

    read: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_keys(cls, read: Iterable[str] = (), admin: Iterable[str] = ()) -> KeyRing:
        return cls(read=tuple(dict.fromkeys(_digest(k) for k in read)),
                   admin=tuple(dict.fromkeys(_digest(k) for k in admin)))

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        read = parse_key_list(settings.api_keys, "MMFUSION_API_KEYS")
        admin = parse_key_list(settings.admin_keys, "MMFUSION_ADMIN_KEYS")
        if settings.api_keys_file is not None:
            read += read_key_file(settings.api_keys_file, "MMFUSION_API_KEYS_FILE")
        if settings.admin_keys_file is not None:
            admin += read_key_file(settings.admin_keys_file, "MMFUSION_ADMIN_KEYS_FILE")
        return cls.from_keys(read, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.read or self.admin)

    @property
    def reads_open(self) -> bool:
        return not self.read

    @property
    def writes_open(self) -> bool:
        return not self.enabled

    def role_of(self, key: str) -> Role | None:
        """Constant-time lookup: every configured digest is compared, whatever matches first."""
        candidate = _digest(key)
        is_admin = False
        for digest in self.admin:
            is_admin |= hmac.compare_digest(candidate, digest)
        is_reader = False
        for digest in self.read:
            is_reader |= hmac.compare_digest(candidate, digest)
        if is_admin:
            return Role.ADMIN
        return Role.READ if is_reader else None

    def describe(self) -> str:
        """One log line about what is protected (counts, never keys)."""
        if not self.enabled:
            return "no API keys configured (MMFUSION_API_KEYS): every route is open to anyone who can reach it"
        reads = "open to anyone" if self.reads_open else f"need one of {len(self.read) + len(self.admin)} keys"
        writes = (f"need one of {len(self.admin)} admin keys" if self.admin
                  else "are disabled (no MMFUSION_ADMIN_KEYS configured)")
        return f"API keys: read routes {reads}; index writes {writes}"


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``role`` None means anonymous (allowed only where the route is open)."""

    role: Role | None
    key_id: str | None = None


_bearer = HTTPBearer(
    auto_error=False, scheme_name="BearerKey",
    description="An API key as `Authorization: Bearer <key>` (MMFUSION_API_KEYS, or MMFUSION_ADMIN_KEYS for "
    "index writes).",
)
_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="ApiKeyHeader",
    description="The same API key as an `X-API-Key: <key>` header, for clients that cannot set Authorization.",
)


def _key_ring(request: Request) -> KeyRing:
    return request.app.state.service.keys


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header_key: Annotated[str | None, Security(_api_key_header)],
) -> Principal:
    """The best role among the presented keys (both headers may be sent), or anonymous."""
    ring = _key_ring(request)
    presented = [k for k in (bearer.credentials if bearer else None, header_key) if k]
    best: Principal = Principal(role=None, key_id=key_id(presented[0]) if presented else None)
    for key in presented:
        role = ring.role_of(key)
        if role is not None and (best.role is None or role > best.role):
            best = Principal(role=role, key_id=key_id(key))
    request.state.principal = best
    return best


Caller = Annotated[Principal, Depends(authenticate)]


def _unauthorized(principal: Principal) -> UnauthorizedError:
    if principal.key_id is None:
        return UnauthorizedError("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    return UnauthorizedError("invalid API key")


async def require_read(request: Request, principal: Caller) -> Principal:
    """Read routes: any configured key (read or admin), or nothing when no read keys are configured."""
    if _key_ring(request).reads_open or principal.role is not None:
        return principal
    raise _unauthorized(principal)


async def require_admin(request: Request, principal: Caller) -> Principal:
    """Index writes: an admin key, or nothing when no keys at all are configured."""
    ring = _key_ring(request)
    if ring.writes_open or principal.role is Role.ADMIN:
        return principal
    if principal.role is None:
        raise _unauthorized(principal)
    if not ring.admin:
        raise ForbiddenError("index writes are disabled: no admin keys are configured (MMFUSION_ADMIN_KEYS)")
    raise ForbiddenError("this route writes the index and needs an admin key (MMFUSION_ADMIN_KEYS)")


ReadKey = Annotated[Principal, Depends(require_read)]
AdminKey = Annotated[Principal, Depends(require_admin)]


def route_access(path: str, methods: Iterable[str]) -> Access:
    """The policy: open paths, admin for index writes, read for everything else (deny by default)."""
    if path in OPEN_PATHS:
        return Access.OPEN
    if (path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")) and WRITE_METHODS & {m.upper() for m in methods}:
        return Access.ADMIN
    return Access.READ


_AUTH_RESPONSES: dict[Access, dict[int | str, dict[str, Any]]] = {
    Access.OPEN: {},
    Access.READ: {401: {"model": ErrorResponse, "description": "Missing or invalid API key"}},
    Access.ADMIN: {
        401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
        403: {"model": ErrorResponse, "description": "The key is not an admin key (MMFUSION_ADMIN_KEYS)"},
    },
}
_DEPENDENCIES = {Access.OPEN: [], Access.READ: [Depends(require_read)], Access.ADMIN: [Depends(require_admin)]}


def include_protected(app: FastAPI, router: APIRouter) -> None:
    """Include ``router`` with each route guarded by :func:`route_access`'s class.

    The routes are regrouped by access class and each group is included with its dependency, so
    the OpenAPI schema shows the lock (and the 401/403 responses) exactly where a key is needed.
    """
    groups: dict[Access, APIRouter] = {access: APIRouter() for access in Access}
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"route {getattr(route, 'path', route)!r} is not an APIRoute; auth cannot guard it")
        groups[route_access(route.path, route.methods)].routes.append(route)
    for access, group in groups.items():
        if group.routes:
            app.include_router(group, dependencies=_DEPENDENCIES[access], responses=_AUTH_RESPONSES[access])
