"""The trivial model of the overhead benchmark, served by ``asyncserve serve benchmarks.trivial:service``.

It does the same arithmetic as the bare ASGI baseline (``echo.double``), so the difference
between the two is what asyncserve adds around a model: validation, batching, the executor hop,
metrics and encoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor


class Echo(Model):
    """``y = x * 2`` on one FP32 row of four values."""

    name = "echo"
    inputs: ClassVar[Mapping[str, Tensor]] = {"x": Tensor("FP32", shape=(4,))}
    outputs: ClassVar[Mapping[str, Tensor]] = {"y": Tensor("FP32", shape=(4,))}

    def predict(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        result: npt.NDArray[Any] = x * np.float32(2)
        return result


service = Service(Echo(), name="trivial")
