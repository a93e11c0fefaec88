"""Checks that a raw ModelInferResponse written by hand is the message protobuf writes, byte for byte.

Run by tests/grpc/test_wire.py in a process of its own (``python -m tests.grpc.wire_check``): asyncserve's
generated messages and tritonclient's, which the other gRPC tests import, cannot share a process.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np

from asyncserve import Model, Service, Tensor
from asyncserve.grpc import inference_pb2 as pb
from asyncserve.grpc import tensors, wire
from asyncserve.model import ModelSpec


class Several(Model):
    name = "several"
    version = "7"
    inputs = {"x": Tensor("FP32", shape=(3,))}
    outputs = {
        "scores": Tensor("FP32", shape=(3,)),
        "labels": Tensor("BYTES"),
        "image": Tensor("UINT8", shape=(64, 64)),  # 4,096 bytes a row: lengths of two bytes and more
        "half": Tensor("FP16", shape=(2,)),
    }

    def predict(self, x: Any) -> dict[str, Any]:
        raise AssertionError("not called")


def outputs(rows: int) -> dict[str, Any]:
    rng = np.random.default_rng(rows)
    return {
        "scores": rng.standard_normal((rows, 3)).astype(np.float32),
        "labels": np.array([f"label {i}".encode() for i in range(rows)], dtype=object),
        "image": rng.integers(0, 255, (rows, 64, 64), dtype=np.uint8),
        "half": rng.standard_normal((rows, 2)).astype(np.float16),
    }


def decoded(rows: int, asked: list[str], *, raw: bool = True) -> tensors.Decoded:
    return tensors.Decoded({}, rows, asked, raw, 0)


def same(spec: ModelSpec, request_id: str, answer: tensors.Decoded, made: dict[str, Any], degraded: list[str]) -> bytes:
    by_hand = tensors.serialize_response(spec, request_id, answer, made, degraded)
    by_protobuf = tensors.encode_response(spec, request_id, answer, made, degraded).SerializeToString()
    assert by_hand == by_protobuf, (request_id, answer, by_hand[:200], by_protobuf[:200])
    return by_hand


def check_raw_answers(spec: ModelSpec) -> int:
    asked_lists = [["scores", "labels", "image", "half"], ["image"], ["half", "scores"]]
    cases = itertools.product([1, 3, 200], ["", "request-1", "\u00e9" * 70], asked_lists)
    for rows, request_id, asked in cases:
        parsed = pb.ModelInferResponse.FromString(same(spec, request_id, decoded(rows, asked), outputs(rows), []))
        assert (parsed.model_name, parsed.model_version, parsed.id) == ("several", "7", request_id)
        assert [output.name for output in parsed.outputs] == asked
        assert [output.shape[0] for output in parsed.outputs] == [rows] * len(asked)
    return 27


def check_answers_protobuf_writes(spec: ModelSpec) -> int:
    made = outputs(2)
    same(spec, "a", decoded(2, ["scores", "labels"], raw=False), made, [])
    degraded = same(spec, "a", decoded(2, ["scores"]), made, ["features"])
    assert pb.ModelInferResponse.FromString(degraded).parameters["degraded"].string_param == "features"
    return 2


def check_shapes_past_the_kept_ones(spec: ModelSpec) -> int:
    for rows in range(1, 150):
        same(spec, "", decoded(rows, ["scores"]), outputs(rows), [])
    return 149


def check_varints() -> int:
    values = [0, 1, 127, 128, 300, 16_383, 16_384, 2**31, 2**63 - 1]
    for value in values:
        assert (
            wire.packed_varints(3, [value])
            == pb.ModelInferResponse.InferOutputTensor(shape=[value]).SerializeToString()
        )
    return len(values)


def main() -> int:
    spec = Service().add(Several())
    checked = check_raw_answers(spec) + check_answers_protobuf_writes(spec) + check_shapes_past_the_kept_ones(spec)
    checked += check_varints()
    print(f"{checked} encodings checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
