"""The CPU workload of the batching benchmark: a NumPy MLP, served by ``asyncserve serve benchmarks.mlp:service``.

256 FP32 inputs, three hidden layers of 1024 with ReLU, 16 FP32 outputs; the weights come from
``np.random.default_rng(0)`` with He scaling, so every process builds the same model. The same
``forward`` runs in asyncserve (``MLP.predict``), in the FastAPI baseline and in the raw timing.

Run as a script it times the raw forward pass in this process, pinned to one core, and prints
JSON (run it with ``OMP_NUM_THREADS=1``; the batching benchmark does)::

    OMP_NUM_THREADS=1 python -m benchmarks.mlp --cpu 0 --batch-sizes 1 8 32 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor

INPUT_SIZE = 256
HIDDEN_SIZES = (1024, 1024, 1024)
OUTPUT_SIZE = 16
MAX_BATCH_SIZE = 64
SEED = 0

Array = npt.NDArray[np.float32]
Layers = tuple[tuple[Array, Array], ...]
"""(weight, bias) of each layer, weight of shape (fan_in, fan_out)."""


def make_layers(seed: int = SEED) -> Layers:
    """The MLP's weights: He-normal weights (ReLU keeps activations of unit scale), small biases, float32."""
    rng = np.random.default_rng(seed)
    sizes = (INPUT_SIZE, *HIDDEN_SIZES, OUTPUT_SIZE)
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        layers.append((weight, bias))
    return tuple(layers)


def forward(layers: Layers, x: Array) -> Array:
    """The forward pass on a batch ``x`` of shape (rows, 256): ReLU after every layer but the last."""
    h = np.asarray(x, dtype=np.float32)
    for weight, bias in layers[:-1]:
        h = h @ weight
        h += bias
        np.maximum(h, 0, out=h)
    weight, bias = layers[-1]
    out: Array = h @ weight + bias
    return out


def example_rows(rows: int, seed: int = 1) -> Array:
    """Inputs of unit scale, as a client would send them."""
    return np.random.default_rng(seed).standard_normal((rows, INPUT_SIZE)).astype(np.float32)


class MLP(Model):
    """The benchmark MLP as an asyncserve model: ``x`` FP32 (256,) to ``y`` FP32 (16,), batches up to 64."""

    name = "mlp"
    inputs: ClassVar[Mapping[str, Tensor]] = {"x": Tensor("FP32", shape=(INPUT_SIZE,))}
    outputs: ClassVar[Mapping[str, Tensor]] = {"y": Tensor("FP32", shape=(OUTPUT_SIZE,))}
    max_batch_size = MAX_BATCH_SIZE

    def load(self) -> None:
        self.layers = make_layers()

    def warmup(self) -> None:
        for rows in (1, MAX_BATCH_SIZE):
            forward(self.layers, example_rows(rows))

    def predict(self, x: Array) -> Array:
        return forward(self.layers, x)


service = Service(MLP(), name="bench")


# Raw in-process timing


def rows_per_s(layers: Layers, batch_size: int, min_time_s: float) -> float:
    """Rows per second of ``forward`` at ``batch_size``, over back-to-back calls lasting at least ``min_time_s``."""
    x = example_rows(batch_size)
    forward(layers, x)
    calls = 0
    started = time.perf_counter()
    while True:
        forward(layers, x)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_time_s:
            return calls * batch_size / elapsed


def time_raw(batch_sizes: Sequence[int], repeats: int, min_time_s: float) -> dict[str, Any]:
    """Rows per second at each batch size: every repeat runs all sizes in turn, and the median is taken."""
    layers = make_layers()
    runs: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for _ in range(repeats):
        for size in batch_sizes:
            runs[size].append(round(rows_per_s(layers, size, min_time_s), 1))
    return {
        "rows_per_s": {str(size): statistics.median(values) for size, values in runs.items()},
        "runs": {str(size): values for size, values in runs.items()},
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlp", description="Time the raw MLP forward pass.")
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin this process to (default 0)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=5, help="timings per batch size; the median is reported")
    parser.add_argument("--min-time-s", type=float, default=0.5, help="seconds of calls per timing")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    print(json.dumps(time_raw(args.batch_sizes, args.repeats, args.min_time_s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
