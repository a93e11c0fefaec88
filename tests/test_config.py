"""Settings: validated when built, readable from ASYNCSERVE_* variables."""

from __future__ import annotations

import pytest

from asyncserve import ConfigurationError, Settings
from asyncserve.config import WebhookSettings


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


def test_webhook_settings_are_part_of_the_one_settings_object() -> None:
    secret = "s" * 32
    settings = Settings.from_env({"ASYNCSERVE_WEBHOOK_SECRET": secret, "ASYNCSERVE_WEBHOOK_MAX_ATTEMPTS": "2"})
    assert (settings.webhooks.secret, settings.webhooks.max_attempts) == (secret, 2)
    assert Settings(webhooks=WebhookSettings(allow_private=True)).webhooks.allow_private
    with pytest.raises(ConfigurationError, match="webhook setting secret must be at least 16 characters"):
        Settings.from_env({"ASYNCSERVE_WEBHOOK_SECRET": "short"})


def test_http_limits_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="setting keep_alive_s must be a number of seconds > 0, got 0"):
        Settings(keep_alive_s=0)
    with pytest.raises(ConfigurationError, match="ssl_certfile and ssl_keyfile must be both given or both empty"):
        Settings(ssl_certfile="cert.pem")


def test_the_grpc_port_is_off_by_default_and_checked() -> None:
    assert Settings().grpc_port == -1
    assert Settings.from_env({"ASYNCSERVE_GRPC_PORT": "8001"}).grpc_port == 8001
    with pytest.raises(ConfigurationError, match=r"grpc_port must be -1 \(off\) or an integer from 0 to 65535"):
        Settings(grpc_port=70000)
    with pytest.raises(ConfigurationError, match="grpc_port must be a fixed port with --workers > 1"):
        Settings(grpc_port=0, workers=2)
