"""API keys: who may call which routes, how often, and how many at once.

A key is a random token the server knows only by its SHA-256 digest. The keys file (or the
``ASYNCSERVE_API_KEYS`` variable) holds one key per line, made by ``asyncserve keys new``::

    # name    scopes                      digest of the key             limits (optional)
    name=alice scopes=infer,jobs sha256=9f86d0...  rate=50 burst=100 concurrency=16

A client sends its key as ``Authorization: Bearer <key>`` (or ``X-API-Key: <key>``). Each route
needs a scope: ``infer`` (inference, metadata, deferred predictions), ``jobs`` (submit, read and
cancel one's own jobs), ``admin`` (the model repository, and every client's jobs), ``metrics``
(``/metrics``); health checks and the API docs are open. With no keys configured, every route is
open: a server that listens beyond loopback then refuses to start unless told ``insecure``.

The keys file is read again when it changes (keys rotate without a restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from asyncserve.exceptions import ConfigurationError, Forbidden, RateLimited, Unauthorized

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("asyncserve.audit")

SCOPES = ("infer", "jobs", "admin", "metrics")
KEY_PREFIX = "as_"
MAX_REMEMBERED_TOKENS = 4096
"""Valid keys remembered by their token, so that each request does not hash its key again."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One client's key, as the server knows it: its name, scopes, digest and limits."""

    name: str
    scopes: frozenset[str]
    sha256: str
    rate_per_s: float = math.inf
    """Requests per second on average (a token bucket); inf: no limit."""
    burst: int = 0
    """Requests allowed at once above the rate; 0 means one second's worth."""
    concurrency: int = 0
    """Requests in flight at once; 0: no limit."""

    def line(self) -> str:
        """This key as a line of the keys file."""
        limits = ""
        if self.rate_per_s != math.inf:
            limits += f" rate={self.rate_per_s:g}" + (f" burst={self.burst}" if self.burst else "")
        if self.concurrency:
            limits += f" concurrency={self.concurrency}"
        return f"name={self.name} scopes={','.join(sorted(self.scopes))} sha256={self.sha256}{limits}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str, scopes: Iterable[str]) -> tuple[str, ApiKey]:
    """A fresh random key (shown once) and how the server will know it."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, ApiKey(name, _checked_scopes(scopes, name), digest(key))


def parse_keys(text: str, where: str) -> list[ApiKey]:
    """The keys of a keys file (or of the variable), each line ``name=... scopes=... sha256=...``."""
    keys = []
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            keys.append(_parse_line(line, f"{where} line {number}"))
    names = [key.name for key in keys]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigurationError(f"{where}: key name(s) {duplicates} appear twice; give each key its own name")
    return keys


def _parse_line(line: str, where: str) -> ApiKey:
    fields = dict(part.partition("=")[::2] for part in line.split())
    unknown = set(fields) - {"name", "scopes", "sha256", "rate", "burst", "concurrency"}
    if unknown or not {"name", "scopes", "sha256"} <= set(fields):
        raise ConfigurationError(
            f"{where}: expected 'name=NAME scopes=infer,jobs sha256=HEX [rate=N] [burst=N] [concurrency=N]' "
            f"(make keys with `asyncserve keys new`), got {line[:80]!r}"
        )
    sha = fields["sha256"].lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ConfigurationError(f"{where}: sha256 must be 64 hex digits (the digest of the key, never the key)")
    try:
        rate = float(fields.get("rate", "inf"))
        burst, concurrency = int(fields.get("burst", "0")), int(fields.get("concurrency", "0"))
    except ValueError:
        raise ConfigurationError(f"{where}: rate, burst and concurrency must be numbers") from None
    if not rate > 0 or burst < 0 or concurrency < 0:
        raise ConfigurationError(f"{where}: rate must be > 0, burst and concurrency >= 0")
    scopes = _checked_scopes(fields["scopes"].split(","), where)
    return ApiKey(fields["name"], scopes, sha, rate, burst, concurrency)


def _checked_scopes(scopes: Iterable[str], where: str) -> frozenset[str]:
    chosen = frozenset(scope.strip() for scope in scopes if scope.strip())
    unknown = sorted(chosen - set(SCOPES))
    if unknown or not chosen:
        raise ConfigurationError(f"{where}: scopes must be some of {', '.join(SCOPES)}, got {sorted(chosen)}")
    return chosen


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Bucket:
    __slots__ = ("in_flight", "stamp", "tokens")

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens
        self.stamp = -math.inf
        self.in_flight = 0


class Authenticator:
    """Checks each request's key against the route's scope and the key's limits.

    Example::

        auth = Authenticator(parse_keys(text, "keys.txt"))
        key = auth.identify(headers)          # Unauthorized if a key is needed and missing or wrong
        auth.authorize(key, "infer")           # Forbidden without the scope
        auth.admit(key, now)                   # RateLimited past its rate or concurrency
    """

    def __init__(self, keys: Iterable[ApiKey] = (), *, source: Path | None = None) -> None:
        self._source = source
        self.enabled = source is not None
        """Whether requests need keys: some are configured, or a keys file is (read on every request, so a
        plain attribute, kept by :meth:`replace`)."""
        self._by_digest: dict[str, ApiKey] = {}
        self._by_token: dict[str, ApiKey] = {}
        """Tokens seen recently that are valid keys: a client's next request skips the hash."""
        self._buckets: dict[str, _Bucket] = {}
        self._source_stamp: tuple[float, int] | None = None
        self.replace(keys)

    @classmethod
    def from_settings(cls, keys_file: str, keys_text: str) -> Authenticator:
        """From the keys file and the ``ASYNCSERVE_API_KEYS`` text (blocking: call before serving)."""
        keys = parse_keys(keys_text, "ASYNCSERVE_API_KEYS") if keys_text else []
        authenticator = cls(keys, source=Path(keys_file) if keys_file else None)
        if authenticator.source is not None:
            authenticator.reload()
        return authenticator

    @property
    def source(self) -> Path | None:
        """The keys file, read again by :meth:`reload` when it changes."""
        return self._source

    def replace(self, keys: Iterable[ApiKey]) -> None:
        by_digest = {key.sha256: key for key in keys}
        self._by_digest = by_digest
        self.enabled = bool(by_digest) or self._source is not None
        self._by_token = {}  # a key that was revoked must not be found here
        names = {key.name for key in by_digest.values()}
        self._buckets = {name: bucket for name, bucket in self._buckets.items() if name in names}

    def reload(self) -> bool:
        """Read the keys file again if it changed (blocking: run it off the event loop). Returns whether it did.

        A file that cannot be read or parsed keeps the keys in force, with an error in the log.
        """
        if self.source is None:
            return False
        try:
            stat = self.source.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if stamp == self._source_stamp:
                return False
            keys = parse_keys(self.source.read_text(), str(self.source))
        except (OSError, ConfigurationError) as exc:
            if self._source_stamp is None:
                raise ConfigurationError(
                    f"API keys: cannot read the keys file: {exc}; give a file made by `asyncserve keys new NAME "
                    "--scopes infer --file FILE` (--api-keys-file FILE)"
                ) from None
            logger.error("the API keys file %s could not be read again; the keys in force stay: %s", self.source, exc)
            return False
        self._source_stamp = stamp
        self.replace(keys)
        logger.info("API keys loaded from %s: %d key(s)", self.source, len(keys))
        return True

    def identify(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The request's key; None when no keys are configured. Unauthorized if it has none or a wrong one."""
        if not self.enabled:
            return None
        token = _token(headers)
        if token is None:
            raise Unauthorized("this route needs an API key: send it as 'Authorization: Bearer <key>'")
        key = self._by_token.get(token)
        if key is not None:
            return key
        key = self._by_digest.get(digest(token))
        if key is None:
            raise Unauthorized("the API key is not valid (revoked, mistyped, or for another server)")
        if len(self._by_token) >= MAX_REMEMBERED_TOKENS:
            self._by_token.clear()  # (only valid keys are remembered: a flood of wrong ones grows nothing)
        self._by_token[token] = key
        return key

    @staticmethod
    def authorize(key: ApiKey | None, scope: str | None) -> None:
        if key is None or scope is None or scope in key.scopes or ("admin" in key.scopes and scope == "jobs"):
            return
        raise Forbidden(f"the key {key.name!r} lacks the {scope!r} scope this route needs; it has {sorted(key.scopes)}")

    def admit(self, key: ApiKey, now: float) -> None:
        """Take one request against the key's rate and concurrency; RateLimited if over. Call :meth:`release`
        when the request ends."""
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = self._buckets[key.name] = _Bucket(_capacity(key))
        if key.concurrency and bucket.in_flight >= key.concurrency:
            raise RateLimited(f"the key {key.name!r} has {key.concurrency} requests in flight, its limit", 1.0)
        if key.rate_per_s != math.inf:
            capacity = _capacity(key)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * key.rate_per_s)
            bucket.stamp = now
            if bucket.tokens < 1:
                wait_s = (1 - bucket.tokens) / key.rate_per_s
                raise RateLimited(f"the key {key.name!r} is over its rate of {key.rate_per_s:g} requests/s", wait_s)
            bucket.tokens -= 1
        bucket.in_flight += 1

    def release(self, key: ApiKey) -> None:
        bucket = self._buckets.get(key.name)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def __repr__(self) -> str:
        return f"Authenticator(keys={len(self._by_digest)}, source={self.source})"


def _capacity(key: ApiKey) -> float:
    if key.rate_per_s == math.inf:
        return math.inf
    return float(key.burst or max(1, math.ceil(key.rate_per_s)))


def _token(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key else None


def with_limits(key: ApiKey, *, rate_per_s: float | None, burst: int | None, concurrency: int | None) -> ApiKey:
    """``key`` with the limits given (None leaves one as it is)."""
    changes: dict[str, float | int] = {}
    if rate_per_s is not None:
        changes["rate_per_s"] = rate_per_s
    if burst is not None:
        changes["burst"] = burst
    if concurrency is not None:
        changes["concurrency"] = concurrency
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]
