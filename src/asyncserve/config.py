"""Settings: every server knob in one frozen value object, also readable from ``ASYNCSERVE_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from asyncserve.exceptions import ConfigurationError

ExecutorKind = Literal["thread", "process"]
_EXECUTORS = ("thread", "process")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_FORMATS = ("text", "json")


_WEBHOOK_ENV_PREFIX = "ASYNCSERVE_WEBHOOK_"
_MIN_SECRET_CHARS = 16


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """How webhooks are signed, sent and retried, and where they may go.

    Example::

        WebhookSettings(secret=secrets.token_hex(32), max_attempts=3)
        WebhookSettings.from_env()   # ASYNCSERVE_WEBHOOK_SECRET=... ASYNCSERVE_WEBHOOK_ALLOW_PRIVATE=true
    """

    secret: str = dataclasses.field(default="", repr=False)
    """Shared with receivers to sign requests; empty means webhooks are refused at submission."""
    timeout_s: float = 5.0
    """Time limit of one attempt, from resolving the host to reading the answer."""
    max_attempts: int = 5
    backoff_s: float = 1.0
    """Delay before the first retry; doubled for each later one, times a random factor in [0.5, 1]."""
    max_backoff_s: float = 60.0
    """Cap on any delay between attempts, a receiver's Retry-After included."""
    allow_private: bool = False
    """Allow URLs that resolve to loopback, private or link-local addresses (only on a network you trust)."""
    allowed_hosts: frozenset[str] = frozenset()
    """Host names (or IP literals) exempt from the address check; a string is read as comma-separated."""
    max_body_bytes: int = 4 * 1024 * 1024
    close_timeout_s: float = 10.0
    """How long closing waits for running deliveries before cancelling them."""

    def __post_init__(self) -> None:
        hosts: Iterable[str] = self.allowed_hosts
        if isinstance(hosts, str):
            hosts = hosts.split(",")
        object.__setattr__(self, "allowed_hosts", frozenset(h.strip().strip("[]").lower() for h in hosts if h.strip()))
        _require_webhook(not self.secret or len(self.secret) >= _MIN_SECRET_CHARS, "secret",
                 f"at least {_MIN_SECRET_CHARS} characters (make one with: python -c "
                 "'import secrets; print(secrets.token_hex(32))')", f"{len(self.secret)} characters")  # fmt: skip
        _require_webhook(self.timeout_s > 0, "timeout_s", "a number of seconds > 0", self.timeout_s)
        _require_webhook(self.max_attempts >= 1, "max_attempts", "an integer >= 1", self.max_attempts)
        _require_webhook(self.backoff_s >= 0, "backoff_s", "a number of seconds >= 0", self.backoff_s)
        _require_webhook(self.max_backoff_s >= self.backoff_s, "max_backoff_s", "a number of seconds >= backoff_s",
                 self.max_backoff_s)  # fmt: skip
        _require_webhook(self.max_body_bytes >= 1, "max_body_bytes", "an integer >= 1", self.max_body_bytes)
        _require_webhook(self.close_timeout_s >= 0, "close_timeout_s", "a number of seconds >= 0", self.close_timeout_s)

    @property
    def enabled(self) -> bool:
        """Whether webhooks can be sent at all (a secret is set)."""
        return bool(self.secret)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WebhookSettings:
        """Read ``ASYNCSERVE_WEBHOOK_{FIELD}`` variables; ``overrides`` win over them."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = _WEBHOOK_ENV_PREFIX + field.name.upper()
            if variable in environ:
                values[field.name] = _cast_webhook(variable, environ[variable], field.default)
        return cls(**{**values, **overrides})


def _require_webhook(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigurationError(f"webhook setting {name} must be {rule}, got {value!r}")


def _cast_webhook(variable: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigurationError(f"{variable}={raw!r} is not a valid bool; use true or false")
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int | float):
        try:
            return type(default)(raw)
        except ValueError:
            raise _not_a_number(variable, raw, type(default)) from None
    return raw  # str, or the comma-separated allowed_hosts


def _usable_cores() -> int:
    # The cores this process may run on (taskset, cgroups' cpusets), where the system tells.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
"""Variables by which a user already chose the threads of the native libraries."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How the server runs. Build it directly, or from the environment with :meth:`from_env`.

    Example::

        Settings(port=9000, executor="process")
        Settings.from_env()          # ASYNCSERVE_PORT=9000 ASYNCSERVE_EXECUTOR=process
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    """Server processes sharing the port."""
    grpc_port: int = -1
    """The port of the Open Inference Protocol over gRPC (``pip install 'asyncserve[grpc]'``); -1: off, 0: any."""
    executor: ExecutorKind = "thread"
    """Where plain (CPU-bound) ``predict`` functions run: a thread pool or a process pool."""
    executor_workers: int = 0
    """Threads or processes in the pool; 0 means one per CPU core."""
    compute_threads: int = 0
    """Threads one predict call's native libraries (BLAS, OpenMP) may use; 0: the cores shared out among the
    executor's workers, so that workers computing at once never oversubscribe the cores."""
    max_body_bytes: int = 64 * 1024 * 1024
    decode_off_loop_bytes: int = 1024 * 1024
    """Inference bodies larger than this are decoded in a thread, so that the event loop keeps serving."""
    max_url_bytes: int = 8 * 1024
    max_header_count: int = 100
    max_header_bytes: int = 16 * 1024
    """The size of a request's header names and values together."""
    keep_alive_s: float = 5.0
    """How long an idle connection stays open."""
    head_timeout_s: float = 10.0
    """How long a request's head may take to arrive once it has begun (a slow client gets 408)."""
    body_timeout_s: float = 60.0
    """How long a request's body may take to arrive once its head has (a slow client gets 408)."""
    answer_half_closed: bool = False
    """Answer clients that shut their sending side after their requests (a half-close); by default its end
    of stream means a client went away, and its requests' work is withdrawn. See ``HttpProtocol.eof_received``."""
    max_held_body_bytes: int = 512 * 1024 * 1024
    """Request bodies held at once across connections; a body that would go past it waits, unread."""
    max_connections: int = 10_000
    """Open connections at most; one more is answered 503 and closed (keep it under the process's file limit)."""
    access_log: bool = False
    """Log one line per request on the ``asyncserve.access`` logger."""
    ssl_certfile: str = ""
    """A PEM certificate chain: with ``ssl_keyfile``, the server speaks HTTPS."""
    ssl_keyfile: str = ""
    api_keys_file: str = ""
    """A file of API keys (``asyncserve keys new`` makes them), read again when it changes; with keys, each
    route needs a key with its scope (see ``asyncserve/http/auth.py``)."""
    api_keys: str = ""
    """API keys given in the environment, in the keys file's format, one per line or separated by ``;``."""
    allowed_hosts: str = ""
    """Host names the server answers to, comma-separated (``*``: any). Empty: loopback names only when it
    listens on loopback (a web page cannot reach it by DNS rebinding), any name otherwise."""
    insecure: bool = False
    """Serve beyond loopback without API keys (refused otherwise)."""
    grace_period_s: float = 30.0
    """How long SIGTERM waits for in-flight requests before cancelling them."""
    loop_lag_interval_s: float = 0.05
    """How often the event-loop lag probe wakes up."""
    log_level: str = "info"
    log_format: str = "text"
    """How log lines look on stderr: ``text`` (one readable line) or ``json`` (one JSON object a line, with the
    request id, model, status, duration and error code where known; ``asyncserve/logs.py``)."""
    otlp_endpoint: str = ""
    """Where OpenTelemetry spans go: an OTLP/HTTP endpoint (``http://collector:4318``); empty uses the standard
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) variable, and with neither set
    tracing is off and costs nothing (``asyncserve/tracing.py``; needs the ``otel`` extra)."""
    prediction_log: str = ""
    """Where every prediction is logged: ``jsonl:///path``, ``sqlite:///path.db``, ``postgresql://...``,
    ``redis://...?stream=name``; empty turns logging off."""
    prediction_log_inputs: str = "full"
    """What a record keeps of the inputs: ``full``, ``hash`` (SHA-256) or ``redact``."""
    prediction_log_redact: str = ""
    """Comma-separated input names replaced by "<redacted>" when prediction_log_inputs is ``redact``."""
    prediction_log_overflow: str = "drop"
    """When the log's buffer is full: ``drop`` new records (counted) or ``refuse`` new predictions (503)."""
    prediction_log_buffer: int = 10_000
    prediction_log_spill: str = "var/predlog-spill.jsonl"
    prediction_log_write_timeout_s: float = 2.0
    """A write to the log's store that takes longer is spilled to the spill file at once (and replayed later)."""
    prediction_log_replay_interval_s: float = 1.0
    """How often a failing store is tried again; once it answers, the spill file is replayed into it."""
    prediction_cache: str = ""
    """Cache answers of deterministic models: ``memory`` (this process) or ``redis://...`` (shared by
    every server); empty turns caching off (identical requests in flight are still coalesced)."""
    prediction_cache_ttl_s: float = 60.0
    prediction_cache_size: int = 10_000
    jobs: str = "sqlite://var/jobs.db"
    """Where asynchronous jobs are kept: ``sqlite://relative.db`` or ``sqlite:///absolute.db`` (the durable
    embedded default), ``redis://host:6379/0`` (many servers and workers), ``memory://`` (tests); empty
    turns the jobs API off."""
    job_workers: int = 1
    """In-process job workers of this server (0: only standalone ``asyncserve worker`` processes run jobs)."""
    job_concurrency: int = 64
    """Jobs one worker runs at once (their rows join the models' batches)."""
    job_lease_s: float = 30.0
    max_batch_jobs: int = 10_000
    deferred_ttl_s: float = 300.0
    """How long a deferred prediction (``Prefer: lazy``) stays readable."""
    max_deferred: int = 10_000
    """Most deferred predictions kept at once; past that, ``Prefer: lazy`` is refused with 503."""
    deferred_when_idle: bool = False
    """Compute unread deferred predictions while no inference request is in flight, so that their
    first read finds them ready (at the cost of computing some that are never read)."""
    webhooks: WebhookSettings = dataclasses.field(default_factory=WebhookSettings)
    """How job webhooks are signed, sent and retried (``ASYNCSERVE_WEBHOOK_*`` variables)."""

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535 or self.port == 0, "port", "an integer from 0 to 65535", self.port)
        _require(self.workers >= 1, "workers", "an integer >= 1", self.workers)
        _require(-1 <= self.grpc_port <= 65535, "grpc_port", "-1 (off) or an integer from 0 to 65535", self.grpc_port)
        _require(self.grpc_port != 0 or self.workers == 1, "grpc_port", "a fixed port with --workers > 1 (every "
                 "worker listens on it)", self.grpc_port)  # fmt: skip
        _require(self.executor in _EXECUTORS, "executor", "'thread' or 'process'", self.executor)
        _require(self.executor_workers >= 0, "executor_workers", "an integer >= 0", self.executor_workers)
        _require(self.compute_threads >= 0, "compute_threads", "an integer >= 0", self.compute_threads)
        _require(self.max_body_bytes >= 1024, "max_body_bytes", "an integer >= 1024", self.max_body_bytes)
        for name in ("max_url_bytes", "max_header_count", "max_header_bytes"):
            _require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        _require(self.keep_alive_s > 0, "keep_alive_s", "a number of seconds > 0", self.keep_alive_s)
        _require(self.head_timeout_s > 0, "head_timeout_s", "a number of seconds > 0", self.head_timeout_s)
        _require(self.body_timeout_s > 0, "body_timeout_s", "a number of seconds > 0", self.body_timeout_s)
        _require(self.max_connections >= 1, "max_connections", "an integer >= 1", self.max_connections)
        _require(self.max_held_body_bytes >= self.max_body_bytes, "max_held_body_bytes",
                 f"at least max_body_bytes ({self.max_body_bytes})", self.max_held_body_bytes)  # fmt: skip
        _require(bool(self.ssl_certfile) == bool(self.ssl_keyfile), "ssl_certfile and ssl_keyfile",
                 "both given or both empty", (self.ssl_certfile, self.ssl_keyfile))  # fmt: skip
        _require(self.grace_period_s >= 0, "grace_period_s", "a number of seconds >= 0", self.grace_period_s)
        _require(
            self.loop_lag_interval_s > 0, "loop_lag_interval_s", "a number of seconds > 0", self.loop_lag_interval_s
        )
        _require(self.prediction_log_inputs in ("full", "hash", "redact"), "prediction_log_inputs",
                 "'full', 'hash' or 'redact'", self.prediction_log_inputs)  # fmt: skip
        _require(self.prediction_log_overflow in ("drop", "refuse"), "prediction_log_overflow",
                 "'drop' or 'refuse'", self.prediction_log_overflow)  # fmt: skip
        _require(self.prediction_log_write_timeout_s > 0, "prediction_log_write_timeout_s", "a number of seconds > 0",
                 self.prediction_log_write_timeout_s)  # fmt: skip
        _require(self.prediction_log_replay_interval_s > 0, "prediction_log_replay_interval_s",
                 "a number of seconds > 0", self.prediction_log_replay_interval_s)  # fmt: skip
        _require(
            self.prediction_log_buffer >= 1, "prediction_log_buffer", "an integer >= 1", self.prediction_log_buffer
        )
        _require(self.log_level in _LOG_LEVELS, "log_level", f"one of {', '.join(_LOG_LEVELS)}", self.log_level)
        _require(self.log_format in _LOG_FORMATS, "log_format", "'text' or 'json'", self.log_format)

    @property
    def pool_size(self) -> int:
        return self.executor_workers or os.cpu_count() or 1

    @property
    def threads_per_call(self) -> int:
        """``compute_threads``, or by default the cores this process may use shared among the workers; 0 (leave
        the libraries alone) when the environment sets their threads (``OMP_NUM_THREADS`` and the like)."""
        if self.compute_threads:
            return self.compute_threads
        if any(name in os.environ for name in _THREAD_VARIABLES):
            return 0
        return max(1, _usable_cores() // self.pool_size)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, prefix: str = "ASYNCSERVE_", **overrides: Any
    ) -> Settings:
        """Read ``{prefix}{FIELD}`` variables (``ASYNCSERVE_PORT=9000``); ``overrides`` win over them."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {"webhooks": WebhookSettings.from_env(environ)}
        for field in dataclasses.fields(cls):
            if field.name == "webhooks":
                continue
            raw = environ.get(prefix + field.name.upper())
            if raw is not None:
                values[field.name] = _cast(prefix + field.name.upper(), raw, cls._field_type(field.name))
        values.update({name: value for name, value in overrides.items() if value is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown setting(s) {sorted(unknown)}")
        return cls(**values)

    @classmethod
    def _field_type(cls, name: str) -> type:
        default = getattr(cls, name)
        return type(default)


_NUMBERS: dict[type, str] = {int: "give a whole number, like 8", float: "give a number, like 0.5"}
"""How to fix a setting that is not a number."""


def _not_a_number(variable: str, raw: str, kind: type) -> ConfigurationError:
    fix = _NUMBERS.get(kind, "see src/asyncserve/config.py")
    return ConfigurationError(f"settings: {variable}={raw!r} is not a valid {kind.__name__}; {fix}")


def _cast(variable: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigurationError(f"{variable}={raw!r} is not a valid bool; use true or false")
        return raw.lower() in ("1", "true", "yes")
    try:
        return kind(raw)
    except ValueError:
        raise _not_a_number(variable, raw, kind) from None


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigurationError(f"setting {name} must be {rule}, got {value!r}")
