"""Fixtures for the real PostgreSQL and Redis servers (tests of those integrations never mock them).

Outside CI a missing server skips the test; under CI=true it fails it.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_DSN = os.environ.get("ASYNCSERVE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ASYNCSERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    message = f"{name} does not answer on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must have it running (.ci/run starts it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_DSN


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_server("Redis", "127.0.0.1", 6379)
    return REDIS_URL
