"""Small deterministic models for the server tests; module-level so the process executor can pickle them."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from asyncserve import Model, Tensor

Array = npt.NDArray[Any]


class Adder(Model):
    name = "adder"
    inputs = {"a": Tensor("FP32", shape=(3,)), "b": Tensor("FP32", shape=(3,))}
    outputs = {"sum": Tensor("FP32", shape=(3,)), "total": Tensor("FP64")}
    example = {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, 6.0]}

    def predict(self, a: Array, b: Array) -> dict[str, Array]:
        total = (a + b).sum(axis=1, dtype=np.float64)
        return {"sum": a + b, "total": total}


class AdderV2(Adder):
    version = "2"

    def predict(self, a: Array, b: Array) -> dict[str, Array]:
        return {"sum": a + b + 1, "total": (a + b + 1).sum(axis=1, dtype=np.float64)}


class AdderV1(Adder):
    version = "1"


class Echo(Model):
    """Returns its text input upper-cased, awaited on the loop."""

    name = "shout"
    inputs = {"text": Tensor("BYTES")}
    outputs = {"text": Tensor("BYTES")}

    async def predict(self, text: Array) -> Array:
        await asyncio.sleep(0)
        return np.array([value.upper() for value in text], dtype=object)


class Sleeper(Model):
    """Sleeps ``seconds`` per call (a stand-in for a slow model) and counts the rows it really ran."""

    name = "sleeper"
    inputs = {"seconds": Tensor("FP64")}
    outputs = {"pid": Tensor("INT64")}
    timeout_s = 5.0

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.started = threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        return {"calls": self.calls}  # locks stay behind when a worker process gets a copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.calls = state["calls"]

    def predict(self, seconds: Array) -> Array:
        with self.lock:
            self.calls += len(seconds)
        self.started.set()
        time.sleep(float(seconds.max()))
        return np.full(len(seconds), os.getpid(), dtype=np.int64)


class Spinner(Model):
    """Burns CPU in pure Python (holding the GIL) for ``seconds``: the worst case for the event loop."""

    name = "spinner"
    inputs = {"seconds": Tensor("FP64")}
    outputs = {"spins": Tensor("INT64")}

    def predict(self, seconds: Array) -> Array:
        end = time.perf_counter() + float(seconds.max())
        spins = 0
        while time.perf_counter() < end:
            spins += 1
        return np.full(len(seconds), spins, dtype=np.int64)


class Busy(Model):
    """CPU-bound NumPy work that releases the GIL, as most model runtimes do; its cost grows with the rows.

    Element-wise, so single-threaded: no BLAS threads compete with the event loop for the cores.
    """

    name = "busy"
    inputs = {"n": Tensor("INT64")}
    outputs = {"checksum": Tensor("FP64")}

    def load(self) -> None:
        self.matrix = np.random.default_rng(0).standard_normal((400, 400))

    def predict(self, n: Array) -> Array:
        result = self.matrix
        for _ in range(int(n.sum())):
            result = np.tanh(np.sin(result) * 1.1)
        return np.full(len(n), float(result.sum()))


class Faulty(Model):
    """Raises when asked to, with a message that must never reach the client."""

    name = "faulty"
    inputs = {"fail": Tensor("BOOL")}
    outputs = {"ok": Tensor("BOOL")}

    def predict(self, fail: Array) -> Array:
        if fail.any():
            raise RuntimeError("secret internal detail /etc/passwd")
        return np.logical_not(fail)


class WrongRows(Model):
    """Breaks the output contract: returns one row fewer than it was given."""

    name = "wrong_rows"
    inputs = {"x": Tensor("INT32")}
    outputs = {"y": Tensor("INT32")}

    def predict(self, x: Array) -> Array:
        return x[1:]


class SlowLoader(Model):
    """Takes a while to load, to observe readiness turning true."""

    name = "slow_loader"
    inputs = {"x": Tensor("INT64")}
    outputs = {"y": Tensor("INT64")}

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def load(self) -> None:
        self.gate.wait(20)

    def predict(self, x: Array) -> Array:
        return x


DATATYPE_SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False],
    "UINT8": [0, 255],
    "UINT16": [0, 65535],
    "UINT32": [0, 4294967295],
    "UINT64": [0, 18446744073709551615],
    "INT8": [-128, 127],
    "INT16": [-32768, 32767],
    "INT32": [-2147483648, 2147483647],
    "INT64": [-9223372036854775808, 9223372036854775807],
    "FP16": [0.5, -2.0],
    "FP32": [0.25, -1.5],
    "FP64": [0.1, -1e300],
    "BYTES": ["hello", "wörld"],
}


class AllTypes(Model):
    """Echoes one input of every datatype, to prove each round-trips."""

    name = "all_types"
    inputs = {f"in_{d.lower()}": Tensor(d) for d in DATATYPE_SAMPLES}
    outputs = {f"out_{d.lower()}": Tensor(d) for d in DATATYPE_SAMPLES}

    def predict(self, **columns: Array) -> dict[str, Array]:
        return {name.replace("in_", "out_", 1): column for name, column in columns.items()}


class Cached(Model):
    """Deterministic; answers with the id of the process that computed it, to see who did the work."""

    name = "cached"
    inputs = {"x": Tensor("INT64")}
    outputs = {"pid": Tensor("INT64")}
    deterministic = True

    def predict(self, x: Array) -> Array:
        return np.full(len(x), os.getpid(), dtype=np.int64)


class Pid(Model):
    """Sleeps ``seconds``, then answers its ``n`` and the id of the process that ran it: who did which job."""

    name = "pid"
    inputs = {"n": Tensor("INT64"), "seconds": Tensor("FP64")}
    outputs = {"n": Tensor("INT64"), "pid": Tensor("INT64")}
    timeout_s = 10.0

    def predict(self, n: Array, seconds: Array) -> dict[str, Array]:
        time.sleep(float(seconds.max()))
        return {"n": n, "pid": np.full(len(n), os.getpid(), dtype=np.int64)}


class FailsFirst(Model):
    """Fails the first call for each ``marker`` path and succeeds from the second on, answering the call's number.

    Each call appends a line to the marker file (another process, or a later run, sees it too). One row
    per call, so a failed batch is never bisected, which would call the model again for the same row.
    """

    name = "fails_first"
    inputs = {"marker": Tensor("BYTES")}
    outputs = {"calls": Tensor("INT64")}
    max_batch_size = 1

    def predict(self, marker: Array) -> Array:
        raw = marker[0]
        path = raw.decode() if isinstance(raw, bytes) else str(raw)
        with open(path, "a+") as file:
            file.write("call\n")
            file.seek(0)
            calls = len(file.read().splitlines())
        if calls == 1:
            raise RuntimeError(f"the first call for {path} fails")
        return np.array([calls], dtype=np.int64)


class OwnProcess(Model):
    """Runs in a process of its own (as an instance group of kind process): answers that process's pid."""

    name = "own_process"
    inputs = {"x": Tensor("FP32")}
    outputs = {"pid": Tensor("INT64")}
    instances = 1
    instance_kind = "process"

    def predict(self, x: Array) -> Array:
        return np.full(len(x), os.getpid(), dtype=np.int64)
