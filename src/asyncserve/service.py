"""Service: the set of models a user serves, the one object the server, CLI and tests start from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from asyncserve.composition.deferred import LazyPrediction, LazyPredictor
from asyncserve.exceptions import ConfigurationError
from asyncserve.model import Model, ModelSpec, describe


class Service:
    """A named set of models, importable as ``module:attribute`` by the CLI.

    Example::

        service = Service(Iris(), Embedder(), name="demo")
        # asyncserve serve mymodule:service
    """

    def __init__(self, *models: Model, name: str = "asyncserve") -> None:
        self.name = name
        self._specs: dict[tuple[str, str | None], ModelSpec] = {}
        self._predictor: LazyPredictor | None = None
        for model in models:
            self.add(model)

    def add(self, model: Model) -> ModelSpec:
        """Add a model; its declaration is checked now, so mistakes surface before serving."""
        spec = describe(model)
        if spec.key in self._specs:
            raise ConfigurationError(f"model {spec.label!r} is already in service {self.name!r}")
        self._specs[spec.key] = spec
        return spec

    def lazy(self, model: str, inputs: Any, *, version: str | None = None) -> LazyPrediction:
        """A prediction computed when first awaited, then kept for the handle's lifetime (``Prefer: lazy`` in Python).

        ``inputs`` are as the JSON API takes them: one row ``{"name": value, ...}`` or a list of rows.
        The model and the inputs are checked now (``ModelNotFound``, ``InvalidRequest``, ...); the
        model runs on the first ``await``, in whatever batch is forming then, or never. Call it on
        the event loop of a server serving this service (from a model's ``async def predict``, say).

        Example::

            second_opinion = service.lazy("large", row)  # nothing runs yet
            if score < 0.6:
                outputs = await second_opinion
        """
        if self._predictor is None:
            raise ConfigurationError(
                f"service {self.name!r} is not being served by this process; service.lazy() works while a "
                "server runs it (asyncserve serve, or asyncserve.serve(service)), from its event loop"
            )
        return self._predictor.lazy(model, inputs, version)

    def bind(self, predictor: LazyPredictor) -> None:
        """Make ``predictor`` answer :meth:`lazy`; the server calls it when it starts."""
        self._predictor = predictor

    def unbind(self, predictor: LazyPredictor) -> None:
        """Stop ``predictor`` answering :meth:`lazy` (the server, when it stops), unless another has taken over."""
        if self._predictor is predictor:
            self._predictor = None

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"Service(name={self.name!r}, models={[s.label for s in self._specs.values()]})"
