"""Feature declarations on a model, and fetching a request's features from all its sources at once."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from asyncserve import tracing
from asyncserve.exceptions import AsyncServeError, ConfigurationError, FeatureUnavailable, InvalidRequest
from asyncserve.features.source import FeatureSource, Key, Rows
from asyncserve.tensors import Columns, Datatype, Tensor


@dataclass(frozen=True)
class Feature:
    """Columns a model's ``predict`` receives besides its inputs, looked up by one of its inputs.

    ``on_error="fail"`` answers 502 (504 when too slow) naming the source when it fails;
    ``on_error="default"`` uses ``defaults`` instead and marks the answer as degraded. A key the
    source has no row for takes ``defaults`` too, or is a 400 when there are none.

    Example::

        users = PostgresSource("users", dsn, table="users", key_column="user_id")
        features = [Feature(users, key="user_id", fields={"age": Tensor("FP32")}, defaults={"age": 35.0})]
    """

    source: FeatureSource
    key: str
    fields: Mapping[str, Tensor]
    on_error: Literal["fail", "default"] = "fail"
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def check(self, owner: str, inputs: Mapping[str, Tensor]) -> None:
        """Validate the declaration against the model's inputs (at start-up)."""
        where = f"{owner}.features[{self.source.name!r}]"
        if self.key not in inputs:
            raise ConfigurationError(f"{where}.key {self.key!r} must name one of the inputs {sorted(inputs)}")
        if inputs[self.key].shape != ():
            raise ConfigurationError(f"{where}.key {self.key!r} must be an input with one value per row (shape ())")
        if self.on_error not in ("fail", "default"):
            raise ConfigurationError(f"{where}.on_error must be 'fail' or 'default', got {self.on_error!r}")
        if self.on_error == "default" and set(self.defaults) != set(self.fields):
            raise ConfigurationError(
                f"{where}: on_error='default' needs a default for every field {sorted(self.fields)}"
            )
        unknown = set(self.defaults) - set(self.fields)
        if unknown:
            raise ConfigurationError(f"{where}.defaults has fields it does not declare: {sorted(unknown)}")


@dataclass
class FetchedFeatures:
    columns: Columns
    degraded: list[str]
    """Names of the sources whose declared defaults stood in for them."""


async def fetch_features(features: Sequence[Feature], columns: Columns, deadline: float) -> FetchedFeatures:
    """Look up every feature of a request, all sources concurrently; the first failure cancels the rest."""
    if not features:
        return FetchedFeatures({}, [])
    if len(features) == 1:  # the common case needs no task group (a task costs about 10 µs of loop time)
        feature_columns, degraded = await _fetch_one(features[0], columns[features[0].key], deadline)
        return FetchedFeatures(feature_columns, [degraded] if degraded else [])
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_fetch_one(feature, columns[feature.key], deadline)) for feature in features]
    except* AsyncServeError as errors:
        raise errors.exceptions[0] from None
    fetched = FetchedFeatures({}, [])
    for task in tasks:
        feature_columns, degraded = task.result()
        fetched.columns.update(feature_columns)
        if degraded:
            fetched.degraded.append(degraded)
    return fetched


async def _fetch_one(feature: Feature, key_column: np.ndarray[Any, Any], deadline: float) -> tuple[Columns, str]:
    keys: list[Key] = key_column.tolist()
    try:
        lookup = feature.source.lookup(keys, deadline)
        rows = await (
            lookup if tracing.tracer is None else tracing.feature_lookup(feature.source.name, len(keys), lookup)
        )
    except AsyncServeError:
        if feature.on_error == "fail":
            raise
        return {name: _column(feature, name, [feature.defaults[name]] * len(keys)) for name in feature.fields}, (
            feature.source.name
        )
    return {name: _column(feature, name, _values(feature, name, keys, rows)) for name in feature.fields}, ""


def _values(feature: Feature, name: str, keys: list[Key], rows: Rows) -> list[Any]:
    values = []
    for key in keys:
        row = rows.get(key)
        if row is not None and row.get(name) is not None:
            values.append(row[name])
        elif name in feature.defaults:
            values.append(feature.defaults[name])
        else:
            what = "no row" if row is None else f"no value of {name!r}"
            raise InvalidRequest(
                f"feature source {feature.source.name!r} has {what} for {feature.key}={key!r}, "
                f"and the model declares no default for it"
            )
    return values


def _column(feature: Feature, name: str, values: list[Any]) -> np.ndarray[Any, Any]:
    tensor = feature.fields[name]
    if tensor.dtype is Datatype.BYTES:
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    try:
        column = np.asarray(values, dtype=tensor.dtype.numpy_dtype)
    except (TypeError, ValueError):
        raise FeatureUnavailable(
            f"feature source {feature.source.name!r} returned values of {name!r} that are not {tensor.dtype}"
        ) from None
    if column.shape[1:] != tensor.shape and not tensor.row_shape_matches(column.shape[1:]):
        raise FeatureUnavailable(
            f"feature source {feature.source.name!r} returned {name!r} with rows of shape {list(column.shape[1:])}, "
            f"declared {list(tensor.shape)}"
        )
    return column
