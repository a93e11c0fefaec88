"""Settings: validated when built, readable from ASYNCSERVE_* variables."""

from __future__ import annotations

import pytest

from asyncserve import ConfigurationError, Settings


def test_from_env_reads_and_casts_variables() -> None:
    environ = {"ASYNCSERVE_PORT": "9001", "ASYNCSERVE_EXECUTOR": "process", "ASYNCSERVE_GRACE_PERIOD_S": "2.5"}
    settings = Settings.from_env(environ)
    assert (settings.port, settings.executor, settings.grace_period_s) == (9001, "process", 2.5)


def test_explicit_values_win_over_the_environment() -> None:
    assert Settings.from_env({"ASYNCSERVE_PORT": "9001"}, port=9002).port == 9002


def test_unset_overrides_fall_back_to_the_environment() -> None:
    assert Settings.from_env({"ASYNCSERVE_WORKERS": "3"}, workers=None).workers == 3


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ASYNCSERVE_PORT": "eighty"}, "ASYNCSERVE_PORT='eighty' is not a valid int"),
        ({"ASYNCSERVE_PORT": "70000"}, "setting port must be an integer from 0 to 65535, got 70000"),
        ({"ASYNCSERVE_EXECUTOR": "gpu"}, "setting executor must be 'thread' or 'process', got 'gpu'"),
        ({"ASYNCSERVE_WORKERS": "0"}, "setting workers must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_say_what_is_expected(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(environ)


def test_pool_size_defaults_to_the_cpu_count() -> None:
    assert Settings().pool_size >= 1
    assert Settings(executor_workers=3).pool_size == 3
