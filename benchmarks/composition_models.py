"""The services of the composition benchmark (``python -m benchmarks.composition``).

``coalescing``: two CPU-bound models, each served twice under two names that differ only in
``deterministic`` (so only the deterministic one has its identical in-flight requests coalesced and,
with ``ASYNCSERVE_PREDICTION_CACHE=memory``, its answers cached):

- ``mlp_det`` / ``mlp_nondet``: the batching benchmark's NumPy MLP (``benchmarks.mlp``): 256 FP32
  inputs, 16 outputs, 0.1-0.3 ms per row alone and 0.05-0.1 ms per row in batches of 32 (by machine). A cheap,
  batch-friendly model: the HTTP and JSON work around it costs more than the model.
- ``rnn_det`` / ``rnn_nondet``: a small recurrent net run row by row (``RNN_STEPS`` steps of a
  512 x 512 tanh recurrence), 1-2 ms per row whatever the batch: a model that does not get
  cheaper per row in batches (a per-item decoder, a tree walk), where the model dominates the cost.

``ensembles``: three ``async def`` members that sleep 10, 20 and 50 ms (an I/O-bound model: a
remote call) and answer ``x``, ``2x`` and ``3x``; ``trio``, their mean (``2x``); and two quorum
ensembles (``min_members=2``) whose slowest member has a timeout below its 50 ms: 30 ms
(``quorum_30ms``) and 15 ms (``quorum_15ms``). Once the slow member's batcher has learned its cost,
it drops that member's row at once (it could not finish in time), so both answer when the 20 ms
member has: ``(x + 2x) / 2 = 1.5x``, degraded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from asyncserve.composition.ensemble import Ensemble, Member
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor
from benchmarks import mlp

Array = npt.NDArray[Any]

RNN_INPUTS = 8
RNN_WIDTH = 512
RNN_STEPS = 64
RNN_OUTPUTS = 4
RNN_SEED = 2


# Coalescing: CPU-bound models, deterministic or not


class MLPDeterministic(mlp.MLP):
    """The batching benchmark's MLP, declared deterministic: identical requests share one computation."""

    name = "mlp_det"
    deterministic = True


class MLPNondeterministic(mlp.MLP):
    """The same MLP, not declared deterministic: every request is computed."""

    name = "mlp_nondet"
    deterministic = False


class RNN(Model):
    """``x`` FP32 (8,) to ``y`` FP32 (4,): ``h = tanh(W h + U x)`` for ``RNN_STEPS`` steps, one row at a time.

    Each row costs the same whatever the batch size (1-2 ms on one core), so its rows are the
    work that coalescing saves.
    """

    name = "rnn"
    inputs: ClassVar[Mapping[str, Tensor]] = {"x": Tensor("FP32", shape=(RNN_INPUTS,))}
    outputs: ClassVar[Mapping[str, Tensor]] = {"y": Tensor("FP32", shape=(RNN_OUTPUTS,))}
    max_batch_size = 64

    def load(self) -> None:
        rng = np.random.default_rng(RNN_SEED)
        self.w = (rng.standard_normal((RNN_WIDTH, RNN_WIDTH)) / np.sqrt(RNN_WIDTH)).astype(np.float32)
        self.u = (rng.standard_normal((RNN_WIDTH, RNN_INPUTS)) / np.sqrt(RNN_INPUTS)).astype(np.float32)

    def warmup(self) -> None:
        self.predict(np.zeros((2, RNN_INPUTS), dtype=np.float32))

    def predict(self, x: Array) -> Array:
        return rnn_forward(self.w, self.u, x)


def rnn_forward(w: Array, u: Array, x: Array) -> Array:
    """The recurrence on each row of ``x`` (rows, 8) in turn; the first 4 units of the last state."""
    out = np.empty((len(x), RNN_OUTPUTS), dtype=np.float32)
    for i, row in enumerate(np.asarray(x, dtype=np.float32)):
        drive = u @ row
        h = np.tanh(drive)
        for _ in range(RNN_STEPS):
            h = w @ h
            h += drive
            np.tanh(h, out=h)
        out[i] = h[:RNN_OUTPUTS]
    return out


class RNNDeterministic(RNN):
    name = "rnn_det"
    deterministic = True


class RNNNondeterministic(RNN):
    name = "rnn_nondet"
    deterministic = False


coalescing = Service(
    MLPDeterministic(), MLPNondeterministic(), RNNDeterministic(), RNNNondeterministic(), name="coalescing"
)


# Ensembles: members with known latencies


class Sleeper(Model):
    """An I/O-bound member: answers ``x * factor`` after ``delay_s`` on the event loop."""

    inputs: ClassVar[Mapping[str, Tensor]] = {"x": Tensor("FP32")}
    outputs: ClassVar[Mapping[str, Tensor]] = {"score": Tensor("FP32")}
    delay_s: ClassVar[float] = 0.0
    factor: ClassVar[float] = 1.0

    async def predict(self, x: Array) -> Array:
        await asyncio.sleep(self.delay_s)
        result: Array = x * self.factor
        return result


class Member10ms(Sleeper):
    name = "m10"
    delay_s = 0.010
    factor = 1.0


class Member20ms(Sleeper):
    name = "m20"
    delay_s = 0.020
    factor = 2.0


class Member50ms(Sleeper):
    name = "m50"
    delay_s = 0.050
    factor = 3.0


class Trio(Ensemble):
    """The mean of all three members: as slow as its slowest member, if they run concurrently."""

    name = "trio"
    inputs: ClassVar[Mapping[str, Tensor]] = {"x": Tensor("FP32")}
    outputs: ClassVar[Mapping[str, Tensor]] = {"score": Tensor("FP32")}
    members: ClassVar[Sequence[str | Member]] = ("m10", "m20", "m50")
    aggregate = "mean"


QUORUM_LATE_TIMEOUT_S = 0.030
QUORUM_EARLY_TIMEOUT_S = 0.015


class QuorumLate(Trio):
    """Two of three will do; the 50 ms member is given up after 30 ms (after the 20 ms member answered)."""

    name = "quorum_30ms"
    members = ("m10", "m20", Member("m50", timeout_s=QUORUM_LATE_TIMEOUT_S))
    min_members = 2


class QuorumEarly(Trio):
    """Two of three will do; the 50 ms member is given up after 15 ms (before the 20 ms member answered)."""

    name = "quorum_15ms"
    members = ("m10", "m20", Member("m50", timeout_s=QUORUM_EARLY_TIMEOUT_S))
    min_members = 2


ensembles = Service(Member10ms(), Member20ms(), Member50ms(), Trio(), QuorumLate(), QuorumEarly(), name="ensembles")
