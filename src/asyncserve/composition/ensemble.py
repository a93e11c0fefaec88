"""Ensembles: one served model that fans each request out to member models and aggregates their answers.

An :class:`Ensemble` is declared like any model (name, inputs, outputs) plus its ``members`` and an
``aggregate``. It is served like any model too: the registry runs its ``async def predict`` through
its own batcher, and calls ``bind(caller)`` at start so that each member runs through *its* batcher
(:class:`ModelCaller`). The request's deadline travels in the :data:`request_deadline` context
variable; each member gets its own timeout within what remains of it.

With ``min_members=k`` the ensemble answers once every member has an outcome (an answer, an error,
or its timeout: it is then cancelled), provided at least ``k`` answered. The answer names the members
used (``members_used``) and says ``degraded`` when some did not make it. When the quorum can no
longer be met, the members still running are cancelled at once and the request fails with
``DeadlineExceeded`` (504) if a member ran out of time, else ``ModelError`` (500); the message names
each missing member and why.

Stacking (``aggregate="<model name>"``) calls that model with every member's outputs as inputs, named
``<member>_<output>`` (``<name>_<version>_<output>`` for a member pinned to a version).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from asyncserve.calls import ModelCaller, deadline_scope, remaining_s
from asyncserve.exceptions import AsyncServeError, ConfigurationError, DeadlineExceeded, InvalidRequest, ModelError
from asyncserve.model import Model, ModelSpec
from asyncserve.tensors import Columns, Datatype, Tensor

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
V = TypeVar("V")
Aggregator = Callable[[dict[str, Columns]], Columns]
"""A user aggregate: member label -> that member's output columns, to the ensemble's outputs."""

EXTRA_OUTPUTS: Mapping[str, Tensor] = {
    "members_used": Tensor("BYTES", description="comma-separated labels of the members that answered"),
    "degraded": Tensor("BOOL", description="true when not every member answered"),
}


@dataclass(frozen=True)
class Member:
    """One member of an ensemble: a model name, an optional pinned version, a weight and a timeout."""

    name: str
    version: str | None = None
    weight: float = 1.0
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        name: object = self.name
        if not isinstance(name, str) or not name or ":" in name:
            raise ConfigurationError(f"a member is a model name like 'scorer' (no ':'), got {name!r}")
        weight: object = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
            raise ConfigurationError(f"member {name!r}: weight must be a finite number > 0, got {weight!r}")
        _check_seconds(f"member {name!r}", "timeout_s", self.timeout_s)

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"

    @property
    def prefix(self) -> str:
        """The prefix of this member's outputs among a stacking model's inputs."""
        return self.name if self.version is None else f"{self.name}_{self.version}"


# Aggregators: pure functions over the members' arrays (members first, then rows).


def mean(arrays: Sequence[Array]) -> Array:
    """Element-wise mean of the members' arrays."""
    return np.asarray(np.mean(np.stack(arrays).astype(np.float64), axis=0))


def weighted_mean(arrays: Sequence[Array], weights: Sequence[float]) -> Array:
    """Element-wise mean weighted by member: ``weighted_mean([a, b], [3, 1]) == (3a + b) / 4``."""
    return np.asarray(np.average(np.stack(arrays).astype(np.float64), axis=0, weights=weights))


def majority(labels: Sequence[Array], weights: Sequence[float] | None = None) -> Array:
    """Per row, the label with the most (weighted) votes; a tie goes to the tied label voted first."""
    stacked = np.stack(labels)
    members, rows = stacked.shape[:2]
    if rows == 0:
        return np.asarray(stacked[0])
    flat = stacked.reshape(members, rows, -1)
    agree = np.stack([(flat == flat[j]).all(axis=2) for j in range(members)]).astype(np.float64)
    w = np.ones(members) if weights is None else np.asarray(weights, dtype=np.float64)
    votes = np.einsum("jkr,k->jr", agree, w)  # votes[j, r]: weight of the members agreeing with member j
    return np.asarray(stacked[votes.argmax(axis=0), np.arange(rows)])  # argmax takes the first member among equals


def soft_vote(
    probabilities: Sequence[Array], weights: Sequence[float] | None = None, labels: Sequence[str] | None = None
) -> Array:
    """Argmax of the (weighted) mean class probabilities: a class index, or its name from ``labels``."""
    averaged = np.average(np.stack(probabilities).astype(np.float64), axis=0, weights=weights)
    index = np.asarray(averaged.argmax(axis=-1), dtype=np.int64)
    if labels is None:
        return index
    if averaged.shape[-1] != len(labels):
        raise ValueError(f"soft vote over {averaged.shape[-1]} classes but {len(labels)} labels")
    return np.asarray(np.asarray(labels, dtype=object)[index])


_BUILTINS: dict[str, Callable[[list[Array], list[float], Sequence[str] | None], Array]] = {
    "mean": lambda arrays, weights, labels: mean(arrays),
    "weighted_mean": lambda arrays, weights, labels: weighted_mean(arrays, weights),
    "majority": lambda arrays, weights, labels: majority(arrays, weights),
    "soft_vote": soft_vote,
}
BUILTIN_AGGREGATES = tuple(_BUILTINS)


def stacking_inputs(outputs: Mapping[Member, Mapping[str, V]]) -> dict[str, V]:
    """The members' outputs as a stacking model's inputs: ``<member prefix>_<output>``."""
    return {f"{member.prefix}_{name}": array for member, columns in outputs.items() for name, array in columns.items()}


@dataclass
class _Round:
    """One request's fan-out: what every member task shares."""

    caller: ModelCaller
    columns: Columns
    started: float
    budgets: dict[str, float]
    """Member label -> its seconds: its own timeout, capped by what was left of the request's deadline."""
    outcomes: dict[str, _Outcome] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass(frozen=True)
class _Outcome:
    member: Member
    columns: Columns | None = None
    timed_out: bool = False
    reason: str = ""


class Ensemble(Model):
    """A model whose answer aggregates the answers of member models, run concurrently.

    Example::

        class Churn(Ensemble):
            name = "churn"
            inputs = {"x": Tensor("FP32", shape=(4,))}
            outputs = {"score": Tensor("FP32")}  # members_used and degraded are added
            members = ["gbm", Member("mlp", weight=2.0), Member("slow", timeout_s=0.05)]
            aggregate = "weighted_mean"  # or "mean", "majority", "soft_vote", a function, a model name
            output = "score"  # the members' output to aggregate (default: the ensemble's one output)
            min_members = 2
            member_timeout_s = 0.2

    Built-in aggregates read the members' ``output`` and write the ensemble's single declared
    output; ``soft_vote`` reads probabilities (rows of shape ``(classes,)``) and writes the class
    index, or its name when ``labels`` are given. A function gets ``{member label: columns}`` and
    returns the declared outputs; it runs on the event loop, so keep it light. Stacking needs every
    member's outputs, so ``min_members`` must then be left at None.
    """

    platform: ClassVar[str] = "ensemble"
    members: ClassVar[Sequence[str | Member]] = ()
    aggregate: ClassVar[str | Aggregator] = "mean"
    output: ClassVar[str | None] = None
    labels: ClassVar[Sequence[str] | None] = None
    min_members: ClassVar[int | None] = None
    member_timeout_s: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("outputs")
        if isinstance(declared, Mapping):
            clash = sorted(set(declared) & set(EXTRA_OUTPUTS))
            if clash:
                raise ConfigurationError(f"{cls.__name__}.outputs must not declare {clash}: ensembles add them")
            cls.outputs = {**declared, **EXTRA_OUTPUTS}

    def __init__(self) -> None:
        owner = type(self).__name__
        self._members = _checked_members(owner, self.members)
        self._quorum = _checked_quorum(owner, self.min_members, len(self._members))
        self._timeout_s = _check_seconds(owner, "member_timeout_s", self.member_timeout_s)
        aggregate = _checked_aggregate(owner, inspect.getattr_static(type(self), "aggregate"))
        self._function = None if isinstance(aggregate, str) else aggregate
        self._stacker = aggregate if isinstance(aggregate, str) and aggregate not in _BUILTINS else None
        self._kind = "function" if self._function else "stacking" if self._stacker else str(aggregate)
        self._results = [name for name in getattr(self, "outputs", {}) if name not in EXTRA_OUTPUTS]
        self._output = self._checked_output(owner)
        self._member_inputs: dict[str, tuple[str, ...]] = {}
        self._stacker_inputs: tuple[str, ...] | None = None
        self._caller: ModelCaller | None = None
        self.answers = self.degraded_answers = self.quorum_failures = 0

    def _checked_output(self, owner: str) -> str:
        if self._kind not in _BUILTINS:
            if self._stacker is not None and self._quorum < len(self._members):
                raise ConfigurationError(f"{owner}: stacking needs every member's outputs; leave min_members at None")
            return ""
        if len(self._results) != 1:
            raise ConfigurationError(
                f"{owner}: aggregate {self._kind!r} writes one output, but outputs declare {self._results}"
            )
        if self.labels is not None and (self._kind != "soft_vote" or not all(self.labels)):
            raise ConfigurationError(f"{owner}.labels must be non-empty class names, for soft_vote only")
        return self.output or self._results[0]

    def bind(self, caller: ModelCaller) -> None:
        """Give the ensemble the way to run its members (the registry calls this at start)."""
        super().bind(caller)
        self._caller = caller

    def dependencies(self) -> dict[str, tuple[str, str | None]]:
        """Label -> (name, version) of every model this ensemble calls: members, then a stacking model."""
        found = {m.label: (m.name, m.version) for m in self._members}
        if self._stacker is not None:
            found[self._stacker] = (self._stacker, None)
        return found

    def check_members(self, specs: Mapping[str, ModelSpec]) -> None:
        """Check the members' declarations (keyed as in ``dependencies()``) against this ensemble's."""
        owner = type(self).__name__
        fields = {name: tensor for feature in self.features for name, tensor in feature.fields.items()}
        for member in self._members:
            spec = _spec(owner, specs, member.label)
            _check_inputs(owner, self.inputs, fields, spec)
            self._member_inputs[member.label] = tuple(spec.inputs)
        if self._output:
            member_specs = [specs[m.label] for m in self._members]
            _check_aggregated(owner, self._kind, self._output, member_specs, self.outputs[self._results[0]])
            if self.labels is not None:
                _check_labels(owner, self.labels, member_specs[0].outputs[self._output])
        elif self._stacker is not None:
            stacker = _spec(owner, specs, self._stacker)
            offered = stacking_inputs({m: specs[m.label].outputs for m in self._members})
            _check_stacker(owner, stacker, offered, {n: self.outputs[n] for n in self._results})
            self._stacker_inputs = tuple(stacker.inputs)

    async def predict(self, **columns: Array) -> Columns:
        if self._caller is None:
            raise ConfigurationError(f"ensemble {self.name!r} is not bound: the registry calls bind(caller) at start")
        outcomes = await self._fan_out(self._caller, columns)
        used = [o for o in outcomes if o.columns is not None]
        if len(used) < self._quorum:
            self.quorum_failures += 1
            raise self._quorum_error(outcomes, len(used))
        result = await self._combine(self._caller, {o.member: o.columns for o in used if o.columns is not None})
        self.answers += 1
        self.degraded_answers += len(used) < len(self._members)
        return {**result, **self._provenance(used, len(next(iter(columns.values()))))}

    async def _fan_out(self, caller: ModelCaller, columns: Columns) -> list[_Outcome]:
        left_s = remaining_s()
        budgets = {m.label: min(m.timeout_s or self._timeout_s or math.inf, left_s) for m in self._members}
        fan = _Round(caller, columns, time.monotonic(), budgets)
        # Member tasks record their outcome and never raise; the one that makes the quorum unreachable
        # cancels the others (a cancelled child is no error to a TaskGroup). Cancelling predict()
        # cancels them all through the TaskGroup.
        try:
            async with asyncio.TaskGroup() as group:
                fan.tasks += [group.create_task(self._settle(fan, member)) for member in self._members]
        except* InvalidRequest as refused:
            raise refused.exceptions[0] from None
        return [fan.outcomes.get(m.label) or self._cut_short(fan, m) for m in self._members]

    async def _settle(self, fan: _Round, member: Member) -> None:
        fan.outcomes[member.label] = await self._call(fan, member)
        if sum(o.columns is None for o in fan.outcomes.values()) > len(self._members) - self._quorum:
            for task in fan.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _call(self, fan: _Round, member: Member) -> _Outcome:
        budget_s = fan.budgets[member.label]
        names = self._member_inputs.get(member.label, tuple(fan.columns))
        inputs = {name: fan.columns[name] for name in names}
        try:
            with deadline_scope(fan.started + budget_s):
                async with asyncio.timeout(budget_s if math.isfinite(budget_s) else None):
                    result = await fan.caller.predict(member.name, inputs, version=member.version)
        except (TimeoutError, DeadlineExceeded):
            return self._late(fan, member)
        except InvalidRequest:
            raise  # the request is wrong (a key with no row, say), whichever member says so: a 400, not a failure
        except Exception as exc:
            return _Outcome(member, reason=_failure(member, exc))
        missing = [self._output] if self._output and self._output not in result else []
        return _Outcome(member, reason=f"did not return output {missing}") if missing else _Outcome(member, result)

    def _cut_short(self, fan: _Round, member: Member) -> _Outcome:
        if fan.started + fan.budgets[member.label] <= time.monotonic():
            return self._late(fan, member)  # cancelled by the quorum's loss just as its own time ran out
        return _Outcome(member, reason="was cancelled once the quorum could no longer be met")

    def _late(self, fan: _Round, member: Member) -> _Outcome:
        own_s = member.timeout_s or self._timeout_s or math.inf
        why = (
            f"ran past its timeout of {own_s:g}s"
            if own_s <= fan.budgets[member.label]
            else "ran out of the request's deadline"
        )
        return _Outcome(member, timed_out=True, reason=f"{why} ({time.monotonic() - fan.started:.3f}s)")

    def _quorum_error(self, outcomes: list[_Outcome], answered: int) -> AsyncServeError:
        missing = [o for o in outcomes if o.columns is None]
        detail = "; ".join(f"{o.member.label!r} {o.reason}" for o in missing)
        message = (
            f"ensemble {self.name!r} needs {self._quorum} of {len(outcomes)} members but {answered} answered: {detail}"
        )
        return DeadlineExceeded(message) if any(o.timed_out for o in missing) else ModelError(message)

    async def _combine(self, caller: ModelCaller, used: dict[Member, Columns]) -> Columns:
        if self._stacker is not None:
            return await self._stack(caller, self._stacker, used)
        try:
            return self._aggregated(used)
        except AsyncServeError:
            raise
        except Exception as exc:
            logger.exception("ensemble %s: aggregating %s failed", self.name, [m.label for m in used])
            raise ModelError(f"ensemble {self.name!r} could not aggregate its members' outputs") from exc

    def _aggregated(self, used: dict[Member, Columns]) -> Columns:
        if self._function is not None:
            result = self._function({member.label: columns for member, columns in used.items()})
            return {name: result[name] for name in self._results}
        arrays = [columns[self._output] for columns in used.values()]
        aggregate = _BUILTINS[self._kind]
        return {self._results[0]: aggregate(arrays, [member.weight for member in used], self.labels)}

    async def _stack(self, caller: ModelCaller, stacker: str, used: dict[Member, Columns]) -> Columns:
        inputs = stacking_inputs(used)
        if self._stacker_inputs is not None:
            inputs = {name: inputs[name] for name in self._stacker_inputs}
        result = await caller.predict(stacker, inputs)
        missing = [name for name in self._results if name not in result]
        if missing:
            raise ModelError(f"ensemble {self.name!r}: stacking model {stacker!r} did not return {missing}")
        return {name: result[name] for name in self._results}

    def _provenance(self, used: list[_Outcome], rows: int) -> Columns:
        members_used = np.empty(rows, dtype=object)
        members_used[:] = ",".join(o.member.label for o in used)
        degraded = np.full(rows, len(used) < len(self._members), dtype=np.bool_)
        return {"members_used": members_used, "degraded": degraded}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(members={[m.label for m in self._members]}, quorum={self._quorum}, "
            f"answers={self.answers}, degraded={self.degraded_answers}, quorum_failures={self.quorum_failures})"
        )


def _failure(member: Member, exc: Exception) -> str:
    if isinstance(exc, AsyncServeError):
        return f"failed ({exc.code}: {exc.message})"
    # Not ours: its text may hold internals, so it goes to the log only.
    logger.warning("ensemble member %s failed", member.label, exc_info=exc)
    return f"failed ({type(exc).__name__})"


# Declaration checks: each raises ConfigurationError stating the rule, the bad value and the fix.


def _check_seconds(owner: str, what: str, value: object) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
        raise ConfigurationError(f"{owner}.{what} must be None or a number of seconds > 0, got {value!r}")
    return None if value is None else float(value)


def _checked_members(owner: str, declared: object) -> tuple[Member, ...]:
    items = list(declared) if isinstance(declared, Sequence) and not isinstance(declared, str) else []
    members = tuple(Member(item) if isinstance(item, str) else item for item in items)
    if not members or not all(isinstance(member, Member) for member in members):
        raise ConfigurationError(f"{owner}.members must be a non-empty list of model names or Member(...)")
    labels = [member.label for member in members]
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"{owner}.members must name each model (and version) once, got {labels}")
    return members


def _checked_quorum(owner: str, min_members: object, count: int) -> int:
    if min_members is None:
        return count
    if isinstance(min_members, bool) or not isinstance(min_members, int) or not 1 <= min_members <= count:
        raise ConfigurationError(f"{owner}.min_members must be None or 1..{count} (its members), got {min_members!r}")
    return min_members


def _checked_aggregate(owner: str, aggregate: object) -> str | Aggregator:
    if isinstance(aggregate, staticmethod):
        aggregate = aggregate.__func__
    if (isinstance(aggregate, str) and aggregate) or callable(aggregate):
        return aggregate
    raise ConfigurationError(
        f"{owner}.aggregate must be one of {', '.join(_BUILTINS)}, a function, or the name of a stacking model, "
        f"got {aggregate!r}"
    )


def _spec(owner: str, specs: Mapping[str, ModelSpec], label: str) -> ModelSpec:
    if label not in specs:
        raise ConfigurationError(f"{owner} uses model {label!r}, which the service does not have")
    return specs[label]


def _fits(owner: str, what: str, tensor: Tensor | None, wanted: Tensor, fix: str) -> None:
    if tensor is None or tensor.dtype is not wanted.dtype or tensor.shape != wanted.shape:
        got = "nothing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
        raise ConfigurationError(f"{owner}: {what} is {got}, not {wanted.dtype} {list(wanted.shape)}; {fix}")


def _check_inputs(owner: str, inputs: Mapping[str, Tensor], fields: Mapping[str, Tensor], spec: ModelSpec) -> None:
    """Each input of a member must be an input of the ensemble or a field of the ensemble's features.

    A member's own features need no declaration here: it looks them up itself, by its keys.
    """
    for name, tensor in spec.inputs.items():
        offered = inputs.get(name, fields.get(name))
        if offered is None:
            raise ConfigurationError(
                f"{owner}: member {spec.label!r} takes {name!r} ({tensor.dtype} {list(tensor.shape)}), which the "
                f"ensemble neither takes nor looks up; declare it in {owner}.inputs, or as a field of a Feature in "
                f"{owner}.features (members receive the ensemble's looked-up fields), or let the member declare "
                "the Feature itself and take only its key"
            )
        where = "input" if name in inputs else "feature field"
        _fits(owner, f"the ensemble's {where} {name!r}", offered, tensor, f"member {spec.label!r} takes it so")


def _check_aggregated(owner: str, kind: str, output: str, specs: list[ModelSpec], result: Tensor) -> None:
    member = specs[0].outputs.get(output)
    if member is None:
        raise ConfigurationError(f"{owner}: member {specs[0].label!r} has no output {output!r} to aggregate")
    for spec in specs[1:]:
        _fits(owner, f"output {output!r} of {spec.label!r}", spec.outputs.get(output), member, "members must agree")
    numeric = member.dtype is not Datatype.BYTES
    if kind in ("mean", "weighted_mean"):
        ok = numeric and result.shape == member.shape and result.dtype is not Datatype.BYTES
    elif kind == "majority":
        ok = result.dtype is member.dtype and result.shape == member.shape
    else:
        ok = numeric and len(member.shape) == 1 and result.shape == ()
    if not ok:
        wanted = f"{result.dtype} {list(result.shape)}"
        raise ConfigurationError(
            f"{owner}: {kind} cannot make {wanted} of {output!r} ({member.dtype} {list(member.shape)})"
        )


def _check_labels(owner: str, labels: Sequence[str], probabilities: Tensor) -> None:
    classes = probabilities.shape[0]
    if classes not in (-1, len(labels)):
        raise ConfigurationError(f"{owner}.labels names {len(labels)} classes but the members give {classes}")


def _check_stacker(
    owner: str, stacker: ModelSpec, offered: Mapping[str, Tensor], results: Mapping[str, Tensor]
) -> None:
    for name, tensor in stacker.inputs.items():
        fix = f"the members offer {sorted(offered)}"
        _fits(owner, f"the members' {name!r} for stacking model {stacker.label!r}", offered.get(name), tensor, fix)
    for name, tensor in results.items():
        fix = "stacking answers with the ensemble's outputs"
        _fits(owner, f"output {name!r} of stacking model {stacker.label!r}", stacker.outputs.get(name), tensor, fix)
