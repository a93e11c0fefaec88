"""gRPC tensors <-> columns: typed ``contents``, or ``raw_input_contents`` / ``raw_output_contents``.

Raw data is little-endian, BYTES elements each a 4-byte little-endian length then the bytes (as in
HTTP's binary tensor extension). The checks, their order and their messages are V2 REST's
(``asyncserve.http.v2``): only where the data sits differs.

An answer comes back raw when the request was raw, typed when it was typed, except that an FP16 output
(which has no typed field in the protocol) makes the whole answer raw.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from asyncserve.exceptions import InvalidRequest, SchemaViolation
from asyncserve.grpc import inference_pb2 as pb
from asyncserve.grpc import wire
from asyncserve.http import v2
from asyncserve.http.conversions import per_spec
from asyncserve.model import ModelSpec
from asyncserve.runtime.admission import parse_priority
from asyncserve.tensors import Columns, Datatype

TYPED_FIELD = {
    Datatype.BOOL: "bool_contents",
    Datatype.INT8: "int_contents",
    Datatype.INT16: "int_contents",
    Datatype.INT32: "int_contents",
    Datatype.INT64: "int64_contents",
    Datatype.UINT8: "uint_contents",
    Datatype.UINT16: "uint_contents",
    Datatype.UINT32: "uint_contents",
    Datatype.UINT64: "uint64_contents",
    Datatype.FP16: "fp32_contents",
    Datatype.FP32: "fp32_contents",
    Datatype.FP64: "fp64_contents",
    Datatype.BYTES: "bytes_contents",
}
"""The ``InferTensorContents`` field of each datatype (FP16, which has none, in fp32_contents)."""


class Head(NamedTuple):
    """An input's name, datatype and shape (``v2.TensorHead``); a tuple, made for every input of every call."""

    name: str
    datatype: str
    shape: list[int]


class Decoded(NamedTuple):
    """A decoded ModelInferRequest: one column per declared input, all with ``rows`` rows."""

    columns: Columns
    rows: int
    outputs: list[str]
    raw: bool
    priority: int


def decode_request(request: pb.ModelInferRequest, spec: ModelSpec) -> Decoded:
    """The request's columns for ``spec``'s inputs, the outputs asked for, and its priority.

    Raises:
        InvalidRequest: The inputs do not match the declaration, or their data does not fit them.
        SchemaViolation: A shape or a value is out of range, or a parameter is of the wrong type.
    """
    tensors = request.inputs
    heads = [Head(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in tensors]
    for index, head in enumerate(heads):
        if head.shape and min(head.shape) < 0:
            raise SchemaViolation(f"inputs[{index}].shape", f"must be a list of integers >= 0, got {head.shape}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(heads):
        raise InvalidRequest(
            f"raw_input_contents holds {len(raw)} entries for {len(heads)} inputs; give one per input, in the "
            "inputs' order, or give every input's data in its contents"
        )
    rows = v2.check_inputs(heads, spec)
    decoded: Columns = {}
    for index, head in enumerate(heads):
        tensor = tensors[index]
        if raw:
            decoded[head.name] = _raw_column(spec, tensor, head, raw[index], index)
        else:
            decoded[head.name] = _typed_column(spec, tensor, head, index)
    columns = decoded if len(decoded) == 1 else {name: decoded[name] for name in spec.inputs}
    asked_outputs = request.outputs
    outputs = (
        v2.check_outputs_asked([_asked_output(output) for output in asked_outputs], spec)
        if asked_outputs
        else list(spec.outputs)
    )
    asked = parameter_value(request.parameters.get("priority")) if request.parameters else None
    priority = 0 if asked is None else parse_priority(asked, "parameters.priority")
    return Decoded(columns, rows, outputs, bool(raw), priority)


def _raw_column(
    spec: ModelSpec, tensor: pb.ModelInferRequest.InferInputTensor, head: Head, blob: bytes, index: int
) -> Any:
    if tensor.HasField("contents"):
        raise InvalidRequest(
            f"input {head.name!r} has data both in contents and in raw_input_contents; give it in one of them"
        )
    return v2.decode_binary(spec, head, blob, f"raw_input_contents[{index}]")


def _typed_column(spec: ModelSpec, tensor: pb.ModelInferRequest.InferInputTensor, head: Head, index: int) -> Any:
    field = TYPED_FIELD[Datatype(head.datatype)]
    given = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if given not in ([], [field]):
        raise InvalidRequest(
            f"input {head.name!r} is {head.datatype}: give its data in contents.{field} (or raw_input_contents), "
            f"got {', '.join(given)}"
        )
    values = getattr(tensor.contents, field)
    return v2.decode_values(spec, head, values, f"inputs[{index}].contents.{field}")


def _asked_output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> str:
    for extension in ("classification", "shared_memory_region"):
        if extension in output.parameters:
            raise InvalidRequest(f"output {output.name!r}: parameters.{extension} is not supported by this server")
    return output.name


def parameter_value(parameter: pb.InferParameter | None) -> Any:
    """An InferParameter's value (bool, int, str or float), or None when absent or empty."""
    if parameter is None:
        return None
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def asked_seconds(remaining_s: float | None, parameters: Mapping[str, pb.InferParameter]) -> float | None:
    """The time a call asks for: its gRPC deadline, shortened by Triton's ``timeout`` parameter (microseconds,
    what ``tritonclient.grpc``'s ``infer(timeout=...)`` sends); None when it asks for neither."""
    if not parameters or "timeout" not in parameters:
        return remaining_s
    timeout_us = parameter_value(parameters["timeout"])
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us <= 0:
        raise SchemaViolation("parameters.timeout", f"the request's timeout is microseconds > 0, got {timeout_us!r}")
    return timeout_us / 1e6 if remaining_s is None else min(remaining_s, timeout_us / 1e6)


def encode_response(
    spec: ModelSpec, request_id: str, decoded: Decoded, outputs: Columns, degraded: list[str]
) -> pb.ModelInferResponse:
    """The response with the outputs asked for, raw or typed (see the module's docstring)."""
    response = pb.ModelInferResponse(model_name=spec.name, model_version=spec.version or "", id=request_id)
    raw = decoded.raw or any(spec.outputs[name].dtype is Datatype.FP16 for name in decoded.outputs)
    for name in decoded.outputs:
        tensor = response.outputs.add()
        tensor.name = name
        datatype = spec.outputs[name].dtype
        tensor.datatype = datatype.value
        if raw:
            shape, blob = v2.encode_binary(spec, name, outputs[name])
            response.raw_output_contents.append(blob)
        else:
            shape, values = v2.encode_values(spec, name, outputs[name])
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(values)
        tensor.shape.extend(shape)
    if degraded:  # the feature sources whose defaults stood in (HTTP's X-Degraded)
        response.parameters["degraded"].string_param = ",".join(degraded)
    return response


def serialize_response(
    spec: ModelSpec, request_id: str, decoded: Decoded, outputs: Columns, degraded: list[str]
) -> bytes:
    """``encode_response``'s message, serialized: written directly when the answer is raw and has no parameters
    (what every raw request gets, unless a feature source was degraded), else through protobuf."""
    if degraded or not decoded.raw:
        return encode_response(spec, request_id, decoded, outputs, degraded).SerializeToString()
    written = _written(spec)
    fields = [written.names, wire.text(3, request_id)]
    contents: list[bytes] = []
    for name in decoded.outputs:
        shape, blob = v2.encode_binary(spec, name, outputs[name])
        fields.append(written.output(name, shape))
        contents += (wire.length_prefix(6, len(blob)), blob)
    return b"".join(fields + contents)


class _WrittenResponse:
    """The bytes of one model's raw responses that do not change from one call to the next."""

    SHAPES_KEPT = 64
    """Output shapes whose tensor header is kept, per model (past that, the memory starts afresh)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.names = wire.text(1, spec.name) + wire.text(2, spec.version or "")
        """model_name and model_version (fields 1 and 2)."""
        self._outputs = {
            name: wire.text(1, name) + wire.text(2, tensor.dtype.value) for name, tensor in spec.outputs.items()
        }
        self._kept: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def output(self, name: str, shape: list[int]) -> bytes:
        """Field 5, an InferOutputTensor: the output's name, datatype and shape."""
        key = (name, tuple(shape))
        written = self._kept.get(key)
        if written is None:
            written = wire.length_delimited(5, self._outputs[name] + wire.packed_varints(3, shape))
            if len(self._kept) >= self.SHAPES_KEPT:
                self._kept.clear()
            self._kept[key] = written
        return written


_written = per_spec(_WrittenResponse)
