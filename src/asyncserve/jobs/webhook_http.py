"""The HTTP side of webhooks: where they may go, a client pinned to checked addresses, what answers mean.

A host passes when every address it resolves to is public. Loopback, private (RFC 1918),
link-local (169.254/16, where cloud metadata services live), unique-local, unspecified,
multicast, reserved and shared (100.64/10) addresses are refused, and so are IPv6 addresses that
carry one of them inside (IPv4-mapped, 6to4, NAT64). Names are resolved with the event loop's
``getaddrinfo``, which also reads the odd numeric forms (``2130706433``, ``127.1``) the way the
connection would.

Checking at submission alone is not enough: a name may resolve to a public address then and to a
private one at delivery (DNS rebinding). So the HTTP client made here resolves, checks and connects
in one step, to the very address it checked (:class:`PinnedBackend`).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast
from urllib.parse import urlsplit

from asyncserve.exceptions import ConfigurationError, InvalidRequest

if TYPE_CHECKING:
    import httpcore
    import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_URL_CHARS = 2048
_MAX_RESPONSE_BYTES = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressPolicy(Protocol):
    """Which hosts skip the check (``WebhookSettings`` is one)."""

    @property
    def allow_private(self) -> bool: ...

    @property
    def allowed_hosts(self) -> frozenset[str]: ...


_REASONS: tuple[tuple[str, Callable[[Address], bool]], ...] = (
    ("a loopback address", lambda a: a.is_loopback),
    ("an unspecified address", lambda a: a.is_unspecified),
    ("a link-local address (where cloud metadata services live)", lambda a: a.is_link_local),
    ("a multicast address", lambda a: a.is_multicast),
    ("a private address", lambda a: a.is_private),
    ("a reserved address", lambda a: a.is_reserved),
    ("not a public address", lambda a: not a.is_global),
)


def split_webhook_url(url: str) -> tuple[str, int]:
    """The host and port of a well-formed webhook URL.

    Raises:
        InvalidRequest: not http(s), no host, credentials in it, or characters URLs may not hold.
    """
    if len(url) > _MAX_URL_CHARS:
        raise InvalidRequest(f"webhook URL must be at most {_MAX_URL_CHARS} characters, got {len(url)}")
    if any(char.isspace() or not char.isprintable() or char == "\\" for char in url):
        raise InvalidRequest(f"webhook URL {url!r} contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidRequest(f"webhook URL {url!r} is malformed: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequest(f"webhook URL must start with http:// or https://, got {url[:40]!r}")
    if "@" in parts.netloc:
        raise InvalidRequest(
            "webhook URL must not contain credentials (user:password@); "
            "receivers authenticate webhooks by their signature header"
        )
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise InvalidRequest(f"webhook URL {url!r} has an invalid port") from None
    if not parts.hostname:
        raise InvalidRequest(f"webhook URL {url!r} has no host")
    return normal_host(parts.hostname), port


async def checked_addresses(host: str, port: int, policy: AddressPolicy) -> list[Address] | None:
    """The addresses of ``host``, all of them public; None when the policy exempts the host.

    Raises:
        InvalidRequest: the host cannot be resolved, or one of its addresses is not public.
    """
    host = normal_host(host)
    if policy.allow_private or host in policy.allowed_hosts:
        return None
    literal = _ip_literal(host)
    addresses = [literal] if literal is not None else await _resolve(host, port)
    for address in addresses:
        reason = _refusal(address)
        if reason is not None:
            where = f"{address} is" if literal is not None else f"{host} resolves to {address},"
            raise InvalidRequest(
                f"webhook URL refused: {where} {reason}; set ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE=true to allow "
                "such addresses, or list the host in ASYNCSERVE_WEBHOOK_ALLOWED_HOSTS"
            )
    return addresses


def normal_host(host: str) -> str:
    """``host`` as compared: lowercase, no brackets around an IPv6 literal."""
    return host.strip().strip("[]").lower()


def _ip_literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def _resolve(host: str, port: int) -> list[Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidRequest(f"webhook URL refused: cannot resolve host {host!r} ({exc.strerror})") from None
    # Scope ids ("fe80::1%eth0") go: the check is about the address alone.
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


def _refusal(address: Address) -> str | None:
    """Why ``address`` (or the IPv4 address inside it) is not public, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            address = address.ipv4_mapped or address.sixtofour or address
    return next((reason for reason, applies in _REASONS if applies(address)), None)


class PinnedBackend:
    """An httpcore network backend that connects only to addresses it has just checked.

    Checking and connecting in one step is what defeats DNS rebinding: the address checked is the
    address connected to. TLS is still verified against the URL's host name, which httpcore passes
    to ``start_tls`` itself. httpcore duck-types its backends, so this need not subclass theirs.
    """

    def __init__(self, policy: AddressPolicy) -> None:
        import httpcore

        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await checked_addresses(host, port, self._policy)
        targets = [host] if addresses is None else [str(address) for address in addresses]
        errors: list[Exception] = []
        for target in targets:
            try:
                return await self._inner.connect_tcp(target, port, timeout, local_address, socket_options)
            except Exception as exc:
                errors.append(exc)
        raise errors[-1]

    async def connect_unix_socket(self, path: str, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise InvalidRequest("webhooks are not sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def open_pinned_client(policy: AddressPolicy) -> httpx.AsyncClient:
    """A pooled client that connects only through :class:`PinnedBackend`; never follows redirects or
    uses a proxy, and has no time limits of its own (callers set theirs). Blocks: it loads CA files."""
    try:
        import httpcore
        import httpx
    except ImportError:
        raise ConfigurationError("webhooks need httpx: pip install 'asyncserve[client]'") from None
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx has no public way to give its transport a network backend, so its pool is replaced
    # by an equivalent one that has ours (httpx 0.27 and 0.28 both keep the pool in ``_pool``).
    # A release that keeps it elsewhere would connect without the address checks: refuse it.
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise ConfigurationError(
            f"httpx {httpx.__version__} keeps its connection pool elsewhere, so webhooks could not check the "
            "addresses they connect to; install the release asyncserve declares: pip install 'asyncserve[client]'"
        )
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=cast("httpcore.AsyncNetworkBackend", PinnedBackend(policy)),
    )
    return httpx.AsyncClient(transport=transport, timeout=None, follow_redirects=False, trust_env=False)


# --- answers ------------------------------------------------------------------------------------


class Reply(NamedTuple):
    """What one attempt came to: the status (if any), the error (if any), and whether to retry."""

    status_code: int | None
    error: str | None
    retry: bool = False
    retry_after_s: float | None = None


async def post(client: httpx.AsyncClient, url: str, body: bytes, headers: Mapping[str, str]) -> Reply:
    """POST ``body`` and judge the answer: 2xx succeeds; 408, 429 and 5xx are worth a retry; the rest are final."""
    async with client.stream("POST", url, content=body, headers=headers) as response:
        status = response.status_code
        received = await _read_some(response)
        if 200 <= status < 300:
            return Reply(status, None)
        retry = status in (408, 429) or status >= 500
        retry_after_s = _retry_after_s(response.headers.get("retry-after")) if retry else None
        return Reply(status, _status_error(status, received, response.headers.get("location")), retry, retry_after_s)


async def _read_some(response: httpx.Response) -> bytes:
    """Up to 64 KiB of the answer: enough to keep a short answer's connection alive, no more."""
    received = b""
    async for chunk in response.aiter_raw():
        received += chunk
        if len(received) >= _MAX_RESPONSE_BYTES:
            break
    return received


def _status_error(status: int, received: bytes, location: str | None) -> str:
    if 300 <= status < 400:
        return f"HTTP {status}: redirect to {location!r} not followed; give the job the final URL"
    text = received[:200].decode(errors="replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds, leniently a float, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def failed_reply(exc: Exception, timeout_s: float) -> Reply:
    """The attempt that raised ``exc``: a refusal is final, anything else (unreachable, timed out) is retried."""
    if isinstance(exc, InvalidRequest):  # refused at connect time: final
        return Reply(None, exc.message)
    if isinstance(exc, TimeoutError):
        return Reply(None, f"timed out after {timeout_s:g}s", retry=True)
    return Reply(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, retry=True)
