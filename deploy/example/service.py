"""The service the image serves unless told otherwise: replace this file (or build FROM the image and
COPY your own module) and set the command to ``serve yourmodule:service``."""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncserve import Model, Service, Tensor


class Scorer(Model):
    """A linear score of four numbers: a stand-in for a real model, loaded in no time."""

    name = "scorer"
    inputs = {"x": Tensor("FP32", shape=(4,))}  # noqa: RUF012
    outputs = {"score": Tensor("FP32")}  # noqa: RUF012
    example = {"x": [5.1, 3.5, 1.4, 0.2]}  # noqa: RUF012

    def load(self) -> None:
        self.weights = np.array([0.4, -0.2, 0.3, 0.1], dtype=np.float32)

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return x @ self.weights


service = Service(Scorer(), name="example")
