"""The services the gRPC tests serve, started with the real CLI as `tests.grpc.services:<name>`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from asyncserve import Model, Service, Tensor
from tests.models import AdderV1, AllTypes, Faulty, Sleeper

Array = npt.NDArray[Any]


class Batched(Model):
    """Numbers its predict calls: every row of one batch answers the same ``batch``, so requests that shared
    a batch (over any protocol) see it."""

    name = "batched"
    inputs = {"x": Tensor("FP32")}
    outputs = {"y": Tensor("FP32"), "batch": Tensor("INT64")}
    max_wait_s = 0.05

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def predict(self, x: Array) -> dict[str, Array]:
        with self.lock:
            self.calls += 1
            call = self.calls
        time.sleep(0.02)  # long enough for the requests sent meanwhile to queue for the next batch
        return {"y": x * 2, "batch": np.full(len(x), call, dtype=np.int64)}


class Counting(Model):
    """Streams 0, 1, ..., n - 1, one part each."""

    name = "counting"
    inputs = {"n": Tensor("INT64")}
    outputs = {"i": Tensor("INT64")}

    def predict(self, n: Array) -> Iterator[dict[str, Array]]:
        for i in range(int(n[0])):
            yield {"i": np.array([i], dtype=np.int64)}


class Hasty(Sleeper):
    """A slow model whose own deadline is short: the server's deadline passes first."""

    name = "hasty"
    timeout_s = 0.3


service = Service(AdderV1(), AllTypes(), Batched(), Counting(), Faulty(), Sleeper(), Hasty(), name="grpc-tests")
