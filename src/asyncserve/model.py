"""The model API: what a user writes, and the checked description asyncserve builds from it."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from asyncserve.calls import ModelCaller
from asyncserve.exceptions import ConfigurationError, ModelError
from asyncserve.features import Feature
from asyncserve.tensors import Columns, Datatype, Tensor, declared_tensors

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Model:
    """Base class of a served model.

    Declare a name, an optional version, typed ``inputs`` and ``outputs``, load weights in
    ``load()`` and write ``predict`` with one keyword argument per input. ``predict`` always
    receives a batch: each argument is an array whose first dimension is the number of rows, and
    it returns a dict of arrays with as many rows (or one array when there is one output).

    A plain ``def predict`` is treated as CPU-bound and runs in the executor (threads or
    processes), never on the event loop; an ``async def predict`` is awaited on the loop and must
    only do I/O. asyncserve tells them apart, so user code cannot block the loop by accident.

    Example::

        class Doubler(Model):
            name = "doubler"
            inputs = {"x": Tensor("FP32", shape=(3,))}
            outputs = {"y": Tensor("FP32", shape=(3,))}

            def predict(self, x: np.ndarray) -> np.ndarray:
                return x * 2
    """

    name: ClassVar[str]
    version: ClassVar[str | None] = None
    inputs: ClassVar[Mapping[str, Tensor]]
    outputs: ClassVar[Mapping[str, Tensor]]
    platform: ClassVar[str] = "python"
    timeout_s: ClassVar[float] = 30.0
    """The longest a request may take; a client's ``X-Request-Timeout`` can only shorten it."""
    max_batch_size: ClassVar[int] = 64
    """The most rows one ``predict`` call takes; 1 turns batching off."""
    max_wait_s: ClassVar[float] = 0.002
    """Longest a row may wait for more rows to join its batch; spent only when it pays (see batching.py)."""
    max_concurrent_batches: ClassVar[int | None] = None
    """Batches of this model running at once; None means one per executor worker (64 for async models)."""
    weight: ClassVar[float] = 1.0
    """This model's share of the server's executor against other models' when both have work (fair queuing
    by compute time: a model of weight 2 gets twice the compute seconds of one of weight 1)."""
    instances: ClassVar[int | None] = None
    """Workers of this model's own (as Triton's instance groups): None shares the server's executor with the
    other models; a number gives the model that many workers nobody else uses."""
    instance_kind: ClassVar[Literal["thread", "process"]] = "thread"
    """Where the model's own ``instances`` run: threads, or processes of its own (for code that holds the GIL)."""
    max_queue_size: ClassVar[int] = 1024
    """Most rows waiting for this model; more are refused at once with 503 and Retry-After."""
    example: ClassVar[Mapping[str, Any] | None] = None
    """One row of inputs as JSON values; used to warm the model up and in the API docs."""
    features: ClassVar[Sequence[Feature]] = ()
    """Columns looked up per request in feature sources and passed to ``predict`` besides the inputs."""
    deterministic: ClassVar[bool] = False
    """The same inputs always give the same outputs: identical requests in flight then share one
    computation, and answers may be cached (``ASYNCSERVE_PREDICTION_CACHE``)."""

    models: ModelCaller | None = None
    """The service's other models, for a model that calls them (``await self.models.predict("b", columns)``);
    each call runs through that model's batcher under the calling request's deadline. Set at start."""

    def bind(self, caller: ModelCaller) -> None:
        """Receive the way to call the service's other models (the registry calls this at start)."""
        self.models = caller

    def __getstate__(self) -> dict[str, Any]:
        # A copy sent to a worker process leaves the caller behind: it holds this server's registry.
        state = self.__dict__.copy()
        state.pop("models", None)
        return state

    def load(self) -> None:
        """Load weights. Runs once, off the event loop (in each worker process with processes)."""

    def warmup(self) -> None:
        """Run once after ``load()``; the default predicts on ``example`` when one is given."""


@dataclass(frozen=True)
class Capacity:
    """Where a model's batches run and its share there (see ``Model.weight``, ``Model.instances``)."""

    weight: float = 1.0
    instances: int | None = None
    instance_kind: Literal["thread", "process"] = "thread"


@dataclass(frozen=True)
class ModelSpec:
    """A model's declaration, checked once when it is added to a service."""

    name: str
    version: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    platform: str
    timeout_s: float
    max_batch_size: int
    max_wait_s: float
    max_concurrent_batches: int | None
    max_queue_size: int
    capacity: Capacity
    example: Mapping[str, Any] | None
    features: tuple[Feature, ...]
    deterministic: bool
    is_async: bool
    """Whether predict runs on the event loop: an ``async def`` (or ``async def`` generator)."""
    model: Model = field(repr=False, compare=False)
    streams: bool = False
    """Whether predict is a generator (or async generator): its answer is sent part by part, as yielded."""

    @property
    def feature_fields(self) -> dict[str, Tensor]:
        return {name: tensor for feature in self.features for name, tensor in feature.fields.items()}

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.name, self.version)

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def describe(model: Model) -> ModelSpec:
    """Check a model's declaration and describe it; every problem is a ConfigurationError."""
    if isinstance(model, type):
        raise ConfigurationError(
            f"{model.__name__} is a class, and a service serves model instances: pass an instance, "
            f"as in Service({model.__name__}())"
        )
    if not isinstance(model, Model):
        raise ConfigurationError(f"a service serves asyncserve.Model instances, got {model!r}")
    owner = type(model).__name__
    name = getattr(model, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(f"{owner}.name must be a string of letters, digits, '_', '.', '-', got {name!r}")
    version = getattr(model, "version", None)
    if version is not None and (not isinstance(version, str) or not _NAME.match(version)):
        raise ConfigurationError(f"{owner}.version must be None or a string like '1', got {version!r}")
    inputs = declared_tensors(owner, "inputs", getattr(model, "inputs", None))
    outputs = declared_tensors(owner, "outputs", getattr(model, "outputs", None))
    features = _checked_features(owner, model, inputs)
    fields = {name: tensor for feature in features for name, tensor in feature.fields.items()}
    predict = _checked_predict(owner, model, {**inputs, **fields})
    timeout_s: object = model.timeout_s
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ConfigurationError(f"{owner}.timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    max_batch_size = _positive_int(owner, "max_batch_size", model.max_batch_size)
    max_queue_size = _positive_int(owner, "max_queue_size", model.max_queue_size)
    concurrency = model.max_concurrent_batches
    max_concurrent_batches = (
        None if concurrency is None else _positive_int(owner, "max_concurrent_batches", concurrency)
    )
    max_wait_s: object = model.max_wait_s
    if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, int | float) or max_wait_s < 0:
        raise ConfigurationError(f"{owner}.max_wait_s must be a number of seconds >= 0, got {max_wait_s!r}")
    if max_queue_size < max_batch_size:
        raise ConfigurationError(
            f"{owner}.max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})"
        )
    return ModelSpec(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        platform=model.platform,
        timeout_s=float(timeout_s),
        max_batch_size=max_batch_size,
        max_wait_s=float(max_wait_s),
        max_concurrent_batches=max_concurrent_batches,
        max_queue_size=max_queue_size,
        capacity=_checked_capacity(owner, model),
        example=model.example,
        features=features,
        deterministic=bool(model.deterministic),
        is_async=inspect.iscoroutinefunction(predict) or inspect.isasyncgenfunction(predict),
        model=model,
        streams=_streams(predict),
    )


def _checked_capacity(owner: str, model: Model) -> Capacity:
    weight: object = model.weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise ConfigurationError(f"{owner}.weight must be a number > 0 (1 is every model's default), got {weight!r}")
    instances = None if model.instances is None else _positive_int(owner, "instances", model.instances)
    if model.instance_kind not in ("thread", "process"):
        raise ConfigurationError(f"{owner}.instance_kind must be 'thread' or 'process', got {model.instance_kind!r}")
    return Capacity(float(weight), instances, model.instance_kind)


def _streams(predict: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(predict) or inspect.isgeneratorfunction(predict)


def _checked_features(owner: str, model: Model, inputs: Mapping[str, Tensor]) -> tuple[Feature, ...]:
    features = tuple(model.features)
    seen: set[str] = set(inputs)
    for feature in features:
        if not isinstance(feature, Feature):
            raise ConfigurationError(f"{owner}.features must hold Feature(...) declarations, got {feature!r}")
        feature.check(owner, inputs)
        clash = seen & set(feature.fields)
        if clash:
            raise ConfigurationError(
                f"{owner}: feature field(s) {sorted(clash)} clash with an input or another feature: a field is looked "
                "up, not sent, so remove it from the inputs (predict still receives it, and so do an ensemble's "
                "members), or rename one of the two"
            )
        seen |= set(feature.fields)
    return features


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{owner}.{name} must be an integer >= 1, got {value!r}")
    return value


def _checked_predict(owner: str, model: Model, inputs: Mapping[str, Tensor]) -> Callable[..., Any]:
    predict: Callable[..., Any] | None = getattr(model, "predict", None)
    if not callable(predict):
        raise ConfigurationError(f"{owner} must define predict(self, {', '.join(inputs)})")
    parameters = inspect.signature(predict).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if not takes_any and named != set(inputs):
        raise ConfigurationError(
            f"{owner}.predict takes ({', '.join(sorted(named))}) but the model declares inputs and features "
            f"({', '.join(sorted(inputs))}); give predict one keyword argument per input and feature field"
        )
    return predict


def call_predict(spec: ModelSpec, columns: Columns) -> Any:
    """Call the model's predict (sync or async: the caller awaits the latter) on a batch."""
    return spec.model.predict(**columns)  # type: ignore[attr-defined]


def warm_up(spec: ModelSpec) -> None:
    """Run the model's warm-up: its own ``warmup()`` if overridden, else a prediction on ``example``."""
    model = spec.model
    if type(model).warmup is not Model.warmup:
        model.warmup()
    elif spec.example is not None and not spec.is_async and not spec.streams:
        tensors = {**spec.inputs, **spec.feature_fields}
        if not set(tensors) <= set(spec.example):
            return  # an example without feature values cannot be predicted on without the sources
        columns = {name: example_column(tensor, spec.example[name]) for name, tensor in tensors.items()}
        check_outputs(spec, call_predict(spec, columns), rows=1)


def example_column(tensor: Tensor, value: Any) -> np.ndarray[Any, Any]:
    if tensor.dtype is Datatype.BYTES:
        column = np.empty(1, dtype=object)
        column[0] = value
        return column
    return np.asarray([value], dtype=tensor.dtype.numpy_dtype)


def check_outputs(spec: ModelSpec, result: Any, rows: int) -> Columns:
    """Turn what predict returned into columns, checking it against the declared outputs."""
    if not isinstance(result, Mapping):
        if len(spec.outputs) != 1:
            raise ModelError(
                f"model {spec.label!r} declares outputs {sorted(spec.outputs)} and must return a dict of them, "
                f"got {type(result).__name__}"
            )
        result = {next(iter(spec.outputs)): result}
    missing = [name for name in spec.outputs if name not in result]
    if missing:
        raise ModelError(f"model {spec.label!r} did not return its declared output(s) {missing}")
    return {name: _output_column(spec, name, tensor, result[name], rows) for name, tensor in spec.outputs.items()}


def _output_column(spec: ModelSpec, name: str, tensor: Tensor, value: Any, rows: int) -> np.ndarray[Any, Any]:
    if tensor.dtype is Datatype.BYTES:
        array = np.asarray(value, dtype=object)
    else:
        try:
            array = np.asarray(value, dtype=tensor.dtype.numpy_dtype)
        except (TypeError, ValueError):
            raise ModelError(
                f"model {spec.label!r} returned output {name!r} that cannot be read as {tensor.dtype}"
            ) from None
    if array.ndim == 0 or array.shape[0] != rows:
        got = "a scalar" if array.ndim == 0 else f"{array.shape[0]} rows"
        raise ModelError(f"model {spec.label!r} returned {got} for output {name!r} but was given {rows} rows")
    if not tensor.row_shape_matches(array.shape[1:]):
        raise ModelError(
            f"model {spec.label!r} returned output {name!r} with rows of shape {list(array.shape[1:])}, "
            f"declared {list(tensor.shape)}"
        )
    return array
