"""A Service checks what it is given, and says what to do when it is not a model instance."""

from __future__ import annotations

import pytest

from asyncserve import ConfigurationError, Service
from tests.models import Adder


def test_a_model_class_instead_of_an_instance_says_to_pass_an_instance() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Service(Adder)  # type: ignore[arg-type]
    assert raised.value.message == (
        "Adder is a class, and a service serves model instances: pass an instance, as in Service(Adder())"
    )


def test_something_that_is_not_a_model_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"a service serves asyncserve.Model instances, got 'adder'"):
        Service("adder")  # type: ignore[arg-type]


def test_a_model_instance_is_served() -> None:
    assert [spec.name for spec in Service(Adder())] == ["adder"]
