"""Small private helpers with no better home."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asyncserve.exceptions import ConfigurationError, StartupError


def import_string(target: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected 'module:attribute' (like 'mymodule:service'), got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise StartupError(
                f"service {target}", f"cannot import module {module_name!r} ({exc})",
                "run from the directory that holds it, or add that directory to PYTHONPATH",
            ) from None  # fmt: skip
        raise _import_failed(target, module_name, exc) from exc
    except Exception as exc:
        raise _import_failed(target, module_name, exc) from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r}") from None


def _import_failed(target: str, module_name: str, exc: Exception) -> StartupError:
    return StartupError(
        f"service {target}", f"importing {module_name} raised {type(exc).__name__}: {cause_of(exc)}",
        "fix the module (--log-level debug shows the traceback)",
    )  # fmt: skip


def display_url(url: str) -> str:
    """``url`` as it may be shown in a log or an error: without its password (``redis://:***@host/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def cause_of(exc: BaseException) -> str:
    """One line that says what went wrong: the error's message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def settle(
    target: asyncio.Future[Any], source: asyncio.Future[Any], result: Callable[[Any], Any] | None = None
) -> None:
    """Give ``target`` the outcome of the done ``source`` (its result through ``result``), unless ``target``
    is done already: a done callback, as ``source.add_done_callback(functools.partial(settle, target))``."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result() if result is None else result(source.result()))


def is_count(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits (str.isdigit also takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()
