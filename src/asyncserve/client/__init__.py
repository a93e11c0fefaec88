"""The Python client of an asyncserve server: ``AsyncClient``, and ``Client``, the same API blocking.

Needs the ``client`` extra (aiohttp): ``pip install 'asyncserve[client]'``. ``import asyncserve`` does
not import this package; ``asyncserve.AsyncClient`` and ``asyncserve.Client`` do, when first used.

Modules: ``asyncclient`` (the API), ``transport`` (one pooled aiohttp session: retries, deadlines,
errors back to their classes), ``v2`` (NumPy arrays over the V2 binary tensor extension and
JSON), ``events`` (Server-Sent Events), ``blocking`` (``Client``: the AsyncClient on a private event
loop in a thread of its own).

Example::

    from asyncserve import Client

    with Client("http://localhost:8000") as client:
        client.predict("iris", {"features": [5.1, 3.5, 1.4, 0.2]})
"""

from __future__ import annotations

try:
    import aiohttp  # noqa: F401  # checked here, so that the error names the extra to install
except ImportError:
    raise ImportError(
        "asyncserve's client needs aiohttp, which is not installed: pip install 'asyncserve[client]'",
        name="aiohttp",
    ) from None

from asyncserve.client.asyncclient import AsyncClient, LazyHandle
from asyncserve.client.blocking import BlockingLazyHandle, Client

__all__ = ["AsyncClient", "BlockingLazyHandle", "Client", "LazyHandle"]
