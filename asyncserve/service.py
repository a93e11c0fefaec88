"""Service: the set of models a user serves, the one object the server, CLI and tests start from."""

from __future__ import annotations

from collections.abc import Iterator

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
        for model in models:
            self.add(model)

    def add(self, model: Model) -> ModelSpec:
        """Add a model; its declaration is checked now, so mistakes surface before serving."""
        spec = describe(model)
        if spec.key in self._specs:
            raise ConfigurationError(f"model {spec.label!r} is already in service {self.name!r}")
        self._specs[spec.key] = spec
        return spec

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"Service(name={self.name!r}, models={[s.label for s in self._specs.values()]})"
