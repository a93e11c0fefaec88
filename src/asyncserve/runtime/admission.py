"""Admission: what every inference request goes through before its inputs are decoded, whatever
protocol carried it (HTTP, gRPC).

The server must not be shutting down, the model must exist and be READY, and the request's deadline
is fixed once, here: its arrival plus the shorter of the time the client asked for (``X-Request-Timeout``,
the gRPC deadline) and the model's ``timeout_s``.

Example::

    admission = Admission(registry)
    entry, deadline = admission.admit("adder", None, asked_s=0.5, arrived=time.monotonic())
"""

from __future__ import annotations

from asyncserve._utils import is_count
from asyncserve.exceptions import SchemaViolation, ShuttingDown
from asyncserve.runtime.batching import PRIORITY_LEVELS
from asyncserve.runtime.registry import ModelEntry, ModelRegistry


class Admission:
    """Admits inference requests to the registry's models; refuses them all once shutdown begins."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.shutting_down = False
        """Set when shutdown begins: new predictions are refused (503), in-flight ones go on."""

    def admit(self, model: str, version: str | None, asked_s: float | None, arrived: float) -> tuple[ModelEntry, float]:
        """The READY model and the request's deadline (a ``time.monotonic()`` value).

        Args:
            model: The model's name.
            version: Its version, or None for the highest.
            asked_s: The seconds the client gave the request, or None: the model's ``timeout_s`` caps it.
            arrived: When the request arrived, on ``time.monotonic()``'s clock.

        Raises:
            ShuttingDown: The server is shutting down.
            ModelNotFound: No such model or version.
            ModelNotReady: The model is loading or unavailable.
        """
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down; send the request to another replica")
        entry = self.registry.get_ready(model, version)
        timeout_s = entry.spec.timeout_s
        if asked_s is not None:
            timeout_s = min(timeout_s, asked_s)
        return entry, arrived + timeout_s


def parse_priority(value: object, where: str) -> int:
    """A priority lane: 0 (the default) to 9, served first; from V2 parameters or the X-Priority header."""
    if type(value) is int and 0 <= value < PRIORITY_LEVELS:
        return value  # the common case (the default 0), decided by the checks below in fewer steps
    if isinstance(value, str) and is_count(value.strip().lstrip("-")):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < PRIORITY_LEVELS:
        raise SchemaViolation(
            where, f"a priority is an integer from 0 to {PRIORITY_LEVELS - 1} (higher first), got {value!r}"
        )
    return value
