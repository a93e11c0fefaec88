"""Ensembles: aggregates, quorum, per-member timeouts within the deadline, cancellation, declaration checks.

The members run behind a fake ``ModelCaller``: plain async functions with controllable delays and
failures, standing where the registry's batchers stand in the server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from asyncserve.calls import deadline_scope, remaining_s, request_deadline
from asyncserve.composition.ensemble import (
    Ensemble,
    Member,
    majority,
    mean,
    soft_vote,
    stacking_inputs,
    weighted_mean,
)
from asyncserve.exceptions import ConfigurationError, DeadlineExceeded, ModelError, Overloaded
from asyncserve.model import Model, ModelSpec, check_outputs, describe
from asyncserve.tensors import Columns, Tensor

Behaviour = Callable[[Columns], Awaitable[Columns]]
X = {"x": Tensor("FP32", shape=(2,))}
ROWS = 2


class FakeCaller:
    """Runs named async functions and notes each call's deadline and each cancellation."""

    def __init__(self, **models: Behaviour) -> None:
        self.models = models
        self.deadlines: dict[str, float] = {}
        self.inputs: dict[str, list[str]] = {}
        self.cancelled: list[str] = []

    async def predict(self, name: str, columns: Columns, *, version: str | None = None) -> Columns:
        label = name if version is None else f"{name}:{version}"
        self.deadlines[label] = request_deadline.get(math.inf)
        self.inputs[label] = sorted(columns)
        try:
            return await self.models[label](columns)
        except asyncio.CancelledError:
            self.cancelled.append(label)
            raise


def answers(delay_s: float = 0.0, **row: Any) -> Behaviour:
    """A member that waits ``delay_s`` and gives every row the same ``row`` values."""

    async def run(columns: Columns) -> Columns:
        await asyncio.sleep(delay_s)
        rows = len(next(iter(columns.values())))
        return {
            name: np.array([value] * rows, dtype=object if isinstance(value, str) else None)
            for name, value in row.items()
        }

    return run


def fails(exc: Exception, delay_s: float = 0.0) -> Behaviour:
    async def run(columns: Columns) -> Columns:
        await asyncio.sleep(delay_s)
        raise exc

    return run


def hangs() -> Behaviour:
    return answers(3600.0, y=[0.0, 0.0])


def ensemble(**declaration: Any) -> Ensemble:
    """An ensemble over members a, b, c that averages their ``y`` unless told otherwise."""
    attributes = {"name": "ens", "inputs": X, "outputs": {"y": Tensor("FP32", shape=(2,))}, "members": ["a", "b", "c"]}
    cls: type[Ensemble] = type("Ens", (Ensemble,), {**attributes, **declaration})
    return cls()


def bound(model: Ensemble, caller: FakeCaller) -> Ensemble:
    model.bind(caller)
    return model


def columns(**extra: Any) -> Columns:
    return {"x": np.ones((ROWS, 2), dtype=np.float32), **extra}


def checked(model: Ensemble, result: Columns) -> Columns:
    """The answer, checked against the ensemble's declaration as the registry checks it."""
    return check_outputs(describe(model), result, ROWS)


def assert_close(actual: Any, expected: Any, rtol: float = 1e-6) -> None:
    # np.testing reads files when first used, which the blocking-call detector refuses on the loop.
    assert np.allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol), (actual, expected)


def three(**delays_s: float) -> FakeCaller:
    return FakeCaller(
        a=answers(delays_s.get("a", 0.0), y=[1.0, 0.0]),
        b=answers(delays_s.get("b", 0.0), y=[2.0, 0.0]),
        c=answers(delays_s.get("c", 0.0), y=[6.0, 3.0]),
    )


# Aggregates


async def test_mean_of_three_members_names_them_all() -> None:
    model = bound(ensemble(aggregate="mean"), three())
    result = checked(model, await model.predict(**columns()))
    assert_close(result["y"], [[3.0, 1.0]] * ROWS)
    assert list(result["members_used"]) == ["a,b,c"] * ROWS
    assert not result["degraded"].any()


async def test_weighted_mean_uses_the_members_weights() -> None:
    members = [Member("a", weight=3.0), "b", Member("c", weight=0.5)]
    model = bound(ensemble(aggregate="weighted_mean", members=members), three())
    result = checked(model, await model.predict(**columns()))
    assert_close(result["y"], [[(3 * 1 + 2 + 0.5 * 6) / 4.5, 1.5 / 4.5]] * ROWS, rtol=1e-6)


async def test_majority_vote_over_labels() -> None:
    caller = FakeCaller(a=answers(label="cat"), b=answers(label="dog"), c=answers(label="dog"))
    model = bound(ensemble(aggregate="majority", outputs={"label": Tensor("BYTES")}), caller)
    result = checked(model, await model.predict(**columns()))
    assert list(result["label"]) == ["dog"] * ROWS


async def test_soft_vote_gives_the_label_of_the_highest_mean_probability() -> None:
    caller = FakeCaller(
        a=answers(p=[0.6, 0.4, 0.0]), b=answers(p=[0.1, 0.5, 0.4]), c=answers(p=[0.5, 0.2, 0.3])
    )  # means 0.4, 0.367, 0.233
    declaration = {"aggregate": "soft_vote", "output": "p", "labels": ["setosa", "versicolor", "virginica"]}
    model = bound(ensemble(outputs={"species": Tensor("BYTES")}, **declaration), caller)
    result = checked(model, await model.predict(**columns()))
    assert list(result["species"]) == ["setosa"] * ROWS


async def test_soft_vote_without_labels_gives_the_class_index() -> None:
    caller = FakeCaller(a=answers(p=[0.2, 0.8]), b=answers(p=[0.6, 0.4]), c=answers(p=[0.3, 0.7]))
    model = bound(ensemble(aggregate="soft_vote", output="p", outputs={"cls": Tensor("INT64")}), caller)
    result = checked(model, await model.predict(**columns()))
    assert list(result["cls"]) == [1] * ROWS


async def test_a_function_aggregates_the_members_columns() -> None:
    seen: list[list[str]] = []

    def spread(outputs: dict[str, Columns]) -> Columns:
        seen.append(list(outputs))
        stacked = np.stack([columns["y"] for columns in outputs.values()])
        return {"y": stacked.max(axis=0) - stacked.min(axis=0)}

    model = bound(ensemble(aggregate=spread), three())
    result = checked(model, await model.predict(**columns()))
    assert_close(result["y"], [[5.0, 3.0]] * ROWS)
    assert seen == [["a", "b", "c"]]


class Stacker(Model):
    name = "stacker"
    inputs = {"a_2_y": Tensor("FP32", shape=(2,)), "b_y": Tensor("FP32", shape=(2,))}
    outputs = {"y": Tensor("FP32", shape=(2,))}

    def predict(self, a_2_y: np.ndarray, b_y: np.ndarray) -> np.ndarray:
        return np.asarray(a_2_y + 10 * b_y)


class MemberModel(Model):
    name = "a"
    inputs = X
    outputs = {"y": Tensor("FP32", shape=(2,))}

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x


def member_spec(name: str, version: str | None = None, **declaration: Any) -> ModelSpec:
    cls: type[Model] = type("M", (MemberModel,), {"name": name, "version": version, **declaration})
    return describe(cls())


async def test_stacking_feeds_the_members_outputs_to_a_model_named_member_output() -> None:
    async def stack(columns: Columns) -> Columns:
        return {"y": Stacker().predict(**columns)}

    caller = FakeCaller(**{"a:2": answers(y=[1.0, 2.0]), "b": answers(y=[3.0, 4.0]), "stacker": stack})
    model = bound(ensemble(aggregate="stacker", members=[Member("a", version="2"), "b"]), caller)
    assert model.dependencies() == {"a:2": ("a", "2"), "b": ("b", None), "stacker": ("stacker", None)}
    model.check_members({"a:2": member_spec("a", "2"), "b": member_spec("b"), "stacker": describe(Stacker())})
    result = checked(model, await model.predict(**columns()))
    assert_close(result["y"], [[31.0, 42.0]] * ROWS)
    assert caller.inputs["stacker"] == ["a_2_y", "b_y"]


def test_aggregators_are_pure_functions_of_the_members_arrays() -> None:
    a, b, c = np.array([1.0, 4.0]), np.array([3.0, 0.0]), np.array([2.0, 2.0])
    assert_close(mean([a, b, c]), [2.0, 2.0])
    assert_close(weighted_mean([a, b], [3.0, 1.0]), [1.5, 3.0])
    labels = [np.array(["x", "y", "p"], dtype=object), np.array(["z", "y", "q"], dtype=object)]
    assert list(majority(labels)) == ["x", "y", "p"]  # ties go to the first member's label
    assert list(majority(labels, weights=[1.0, 2.0])) == ["z", "y", "q"]
    assert list(majority([np.array([3, 1]), np.array([2, 2]), np.array([2, 1])])) == [2, 1]
    assert list(majority([np.array([[1, 2], [0, 0]]), np.array([[1, 3], [0, 0]]), np.array([[1, 3], [5, 5]])])[0]) == [
        1,
        3,
    ]
    probabilities = [np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]]), np.array([[0.3, 0.7]])]
    assert list(soft_vote(probabilities)) == [1]
    assert list(soft_vote(probabilities, weights=[5.0, 1.0, 1.0], labels=["no", "yes"])) == ["no"]
    assert stacking_inputs({Member("m"): {"y": 1}, Member("n", version="3"): {"y": 2}}) == {"m_y": 1, "n_3_y": 2}


# Quorum, timeouts, failures


async def test_a_slow_member_past_its_timeout_gives_a_degraded_answer_within_the_deadline() -> None:
    caller = three()
    caller.models["c"] = hangs()
    model = bound(ensemble(members=["a", "b", Member("c", timeout_s=0.05)], min_members=2), caller)
    started = time.perf_counter()
    with deadline_scope(time.monotonic() + 1.0):
        result = checked(model, await model.predict(**columns()))
    assert time.perf_counter() - started < 0.5
    assert_close(result["y"], [[1.5, 0.0]] * ROWS)
    assert list(result["members_used"]) == ["a,b"] * ROWS
    assert result["degraded"].all()
    assert caller.cancelled == ["c"]
    assert (model.answers, model.degraded_answers) == (1, 1)


async def test_quorum_not_met_in_time_is_deadline_exceeded_naming_the_slow_member() -> None:
    caller = three()
    caller.models["c"] = hangs()
    model = bound(ensemble(member_timeout_s=0.05), caller)
    started = time.perf_counter()
    with pytest.raises(
        DeadlineExceeded, match=r"needs 3 of 3 members but 2 answered: 'c' ran past its timeout of 0.05s"
    ):
        await model.predict(**columns())
    assert time.perf_counter() - started < 0.5
    assert model.quorum_failures == 1


async def test_failures_within_the_quorum_still_answer() -> None:
    caller = three()
    caller.models["c"] = fails(RuntimeError("password=hunter2"))
    model = bound(ensemble(min_members=2), caller)
    result = checked(model, await model.predict(**columns()))
    assert list(result["members_used"]) == ["a,b"] * ROWS
    assert result["degraded"].all()


async def test_failures_beyond_the_quorum_are_a_model_error_naming_each_member() -> None:
    caller = three()
    caller.models["b"] = fails(Overloaded("model 'b' is overloaded"))
    caller.models["c"] = fails(RuntimeError("password=hunter2"))
    model = bound(ensemble(min_members=2), caller)
    with pytest.raises(ModelError) as caught:
        await model.predict(**columns())
    message = caught.value.message
    assert "'b' failed (overloaded: model 'b' is overloaded)" in message
    assert "'c' failed (RuntimeError)" in message
    assert "hunter2" not in message


async def test_once_the_quorum_is_lost_the_members_still_running_are_cancelled() -> None:
    caller = three()
    caller.models["b"] = fails(RuntimeError("boom"), delay_s=0.01)
    caller.models["c"] = hangs()
    model = bound(ensemble(), caller)
    started = time.perf_counter()
    with pytest.raises(ModelError, match="'c' was cancelled once the quorum could no longer be met"):
        await model.predict(**columns())
    assert time.perf_counter() - started < 0.5
    assert caller.cancelled == ["c"]


async def test_a_member_missing_the_aggregated_output_counts_as_failed() -> None:
    caller = three()
    caller.models["c"] = answers(z=[1.0, 1.0])
    model = bound(ensemble(min_members=2), caller)
    result = await model.predict(**columns())
    assert list(result["members_used"]) == ["a,b"] * ROWS


async def test_cancelling_the_ensemble_cancels_every_member() -> None:
    caller = FakeCaller(a=hangs(), b=hangs(), c=hangs())
    model = bound(ensemble(), caller)
    task = asyncio.create_task(model.predict(**columns()))
    for _ in range(10):  # a few loop turns: the three member tasks start and reach their sleep
        await asyncio.sleep(0)
    assert len(caller.deadlines) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(caller.cancelled) == ["a", "b", "c"]


async def test_the_request_deadline_caps_every_member_timeout() -> None:
    caller = three()
    caller.models["c"] = hangs()
    members = ["a", Member("b", timeout_s=0.02), "c"]
    model = bound(ensemble(members=members, min_members=2, member_timeout_s=5.0), caller)
    deadline = time.monotonic() + 0.1
    with deadline_scope(deadline):
        assert 0 < remaining_s() <= 0.1
        result = await model.predict(**columns())
    assert time.monotonic() - deadline < 0.05
    assert list(result["members_used"]) == ["a,b"] * ROWS
    assert caller.deadlines["a"] == deadline
    assert caller.deadlines["c"] == deadline
    assert caller.deadlines["b"] < deadline - 0.05  # its own timeout is tighter than the request's
    assert remaining_s() == math.inf  # the scope is gone


async def test_members_out_of_the_requests_time_is_deadline_exceeded() -> None:
    model = bound(ensemble(), FakeCaller(a=hangs(), b=answers(y=[0.0, 0.0]), c=hangs()))
    with deadline_scope(time.monotonic() + 0.05), pytest.raises(DeadlineExceeded) as caught:
        await model.predict(**columns())
    assert "'a' ran out of the request's deadline" in caught.value.message
    assert "'c' ran out of the request's deadline" in caught.value.message


async def test_an_unbound_ensemble_says_what_is_missing() -> None:
    with pytest.raises(ConfigurationError, match=r"bind\(caller\)"):
        await ensemble().predict(**columns())


# Declarations


def test_an_ensemble_is_described_like_any_model_with_its_extra_outputs() -> None:
    spec = describe(ensemble())
    assert spec.is_async
    assert spec.platform == "ensemble"
    assert list(spec.outputs) == ["y", "members_used", "degraded"]
    assert "members=['a', 'b', 'c']" in repr(spec.model)


@pytest.mark.parametrize(
    ("declaration", "problem"),
    [
        ({"aggregate": 3}, "aggregate must be one of mean, weighted_mean, majority, soft_vote"),
        ({"min_members": 4}, r"min_members must be None or 1..3 \(its members\), got 4"),
        ({"min_members": 0}, "min_members must be None or 1..3"),
        ({"members": []}, "members must be a non-empty list"),
        ({"members": ["a", "a"]}, "name each model"),
        ({"members": ["a", 7]}, "members must be a non-empty list of model names or Member"),
        ({"member_timeout_s": -1}, "member_timeout_s must be None or a number of seconds > 0"),
        ({"outputs": {"y": X["x"], "z": X["x"]}}, "writes one output"),
        ({"labels": ["x"]}, "labels must be non-empty class names, for soft_vote only"),
        ({"aggregate": "stacker", "min_members": 2}, "stacking needs every member's outputs"),
    ],
)
def test_bad_declarations_are_refused_with_the_rule(declaration: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        ensemble(**declaration)


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        ({"name": ""}, "a member is a model name"),
        ({"name": "a:1"}, "a member is a model name"),
        ({"name": "a", "weight": 0}, "weight must be a finite number > 0, got 0"),
        ({"name": "a", "weight": math.inf}, "weight must be a finite number > 0"),
        ({"name": "a", "timeout_s": 0}, "timeout_s must be None or a number of seconds > 0"),
    ],
)
def test_bad_members_are_refused(member: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        Member(**member)


def test_declaring_the_extra_outputs_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must not declare"):
        ensemble(outputs={"y": X["x"], "degraded": Tensor("BOOL")})


def test_check_members_accepts_agreeing_members_and_keeps_their_inputs() -> None:
    model = ensemble(inputs={**X, "extra": Tensor("INT64")})
    model.check_members({name: member_spec(name) for name in "abc"})


async def test_each_member_gets_only_its_own_inputs() -> None:
    caller = three()
    model = bound(ensemble(inputs={**X, "extra": Tensor("INT64")}), caller)
    model.check_members({name: member_spec(name) for name in "abc"})
    await model.predict(**columns(extra=np.zeros(ROWS, dtype=np.int64)))
    assert caller.inputs == {"a": ["x"], "b": ["x"], "c": ["x"]}


@pytest.mark.parametrize(
    ("declaration", "specs", "problem"),
    [
        ({}, {"c": None}, "uses model 'c', which the service does not have"),
        ({}, {"c": member_spec("c", outputs={"y": Tensor("INT64", shape=(2,))})}, "output 'y' of 'c' is INT64"),
        ({}, {"c": member_spec("c", outputs={"z": Tensor("FP32", shape=(2,))})}, "output 'y' of 'c' is nothing"),
        ({"inputs": {"x": Tensor("FP64", shape=(2,))}}, {}, "the ensemble's input 'x' is FP64 \\[2\\], not FP32"),
        ({"outputs": {"y": Tensor("BYTES", shape=(2,))}}, {}, "mean cannot make BYTES"),
        (
            {"aggregate": "soft_vote", "output": "y", "labels": ["x", "y", "z"], "outputs": {"c": Tensor("BYTES")}},
            {},
            "labels names 3 classes but the members give 2",
        ),
        ({"aggregate": "majority", "outputs": {"y": Tensor("FP64", shape=(2,))}}, {}, "majority cannot make FP64"),
        ({"aggregate": "stacker"}, {}, "uses model 'stacker'"),
        ({"aggregate": "stacker"}, {"stacker": describe(Stacker())}, "the members' 'a_2_y' for stacking model"),
    ],
)
def test_check_members_refuses_members_that_do_not_fit(
    declaration: dict[str, Any], specs: dict[str, ModelSpec | None], problem: str
) -> None:
    model = ensemble(**declaration)
    merged = {**{name: member_spec(name) for name in "abc"}, **specs}
    with pytest.raises(ConfigurationError, match=problem):
        model.check_members({name: spec for name, spec in merged.items() if spec is not None})
