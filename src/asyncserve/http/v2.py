"""The Open Inference Protocol (KServe V2, Triton HTTP) codec: pure functions, no I/O.

A request body is a JSON object, optionally followed by binary tensor data (the binary tensor
data extension): the ``Inference-Header-Content-Length`` header gives the length of the JSON
part, and each input whose ``parameters`` carry ``binary_data_size`` takes that many bytes of the
tail, in the order the inputs are listed. Outputs go back the same way when asked for as binary,
which is what ``tritonclient.http`` does by default.

Structural problems (a field missing or of the wrong JSON type, a value of the wrong type or range) raise
:class:`SchemaViolation` with the field's path; problems with what the fields say (an unknown
input, a wrong datatype or shape, sizes that do not add up) raise :class:`InvalidRequest`.

A request is first read by a fast path, which checks what the model takes against a plan made
once per model and builds no error path; whatever it does not find plain, it leaves to the exact
path, which checks the request in order and reports its first problem.

Example::

    request = decode_infer_request(body, spec, header_length=None)
    outputs = check_outputs(spec, call_predict(spec, request.columns), request.rows)
    body, headers = encode_infer_response(spec, request, outputs)
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from asyncserve.exceptions import InvalidRequest, SchemaViolation
from asyncserve.http.conversions import STRUCT_CODES, may_hold_booleans, pack_numbers, per_spec
from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Columns, Datatype, Tensor

_U32 = struct.Struct("<I")
_ACCEPTED = {Datatype.BOOL: (frozenset({bool}), "true or false"), Datatype.BYTES: (frozenset({str}), "strings")}
_ACCEPTED |= {dt: (frozenset({int, float}), "numbers") for dt in (Datatype.FP16, Datatype.FP32, Datatype.FP64)}
_ACCEPTED |= {dt: (frozenset({int}), "integers") for dt in INTEGER_RANGES}
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
_JSON_TYPES |= {float: "a number", type(None): "null"}
_INT = frozenset({int})
_OPTIONAL_BOOL = frozenset({bool, type(None)})
_NO_TAIL = memoryview(b"")
# Binary data is little-endian.
_WIRE = {datatype: datatype.numpy_dtype.newbyteorder("<") for datatype in Datatype}


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client asked for, and whether to send it as binary data."""

    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request: one column per declared input, all with ``rows`` rows."""

    id: str | None
    columns: Columns
    rows: int
    parameters: dict[str, Any]
    outputs: list[RequestedOutput]


class TensorHead(Protocol):
    """What every protocol says of an input tensor before its data: its name, datatype and shape."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...


@dataclass(frozen=True)
class _Input:
    """One entry of the request's ``inputs``, structurally checked but not yet decoded."""

    path: str
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]  # empty when the data is binary
    binary_size: int | None


def decode_infer_request(body: bytes, spec: ModelSpec, header_length: int | None) -> InferRequest:
    """Decode a ``POST /v2/models/{model}/infer`` body into columns for ``spec``'s inputs.

    Args:
        body: The whole request body.
        spec: The model the request is for.
        header_length: The ``Inference-Header-Content-Length`` header, or None when absent.

    Raises:
        SchemaViolation: A field is missing or has the wrong JSON type (the message starts with its path).
        InvalidRequest: The body is not JSON, or the inputs do not match the model's declaration.
    """
    header, tail = _split_body(body, header_length)
    document = _parse_json(header, header_length)
    try:
        request = _fast_request(document, spec, tail, may_hold_booleans(header))
    except InvalidRequest:  # the exact path reports the first problem, in its order
        request = None
    return _exact_request(document, spec, tail, header_length) if request is None else request


def _exact_request(
    document: dict[str, Any], spec: ModelSpec, tail: memoryview, header_length: int | None
) -> InferRequest:
    """The request checked step by step in the documented order: the first problem found is raised."""
    request_id: str | None = _get(document, "id", str, "", required=False)
    parameters: dict[str, Any] = _get(document, "parameters", dict, "", required=False) or {}
    items: list[Any] = _get(document, "inputs", list, "")
    entries = [_input_entry(item, f"inputs[{i}]") for i, item in enumerate(items)]
    blobs = _slice_blobs(entries, tail, header_length)
    _check_names(entries, spec)
    rows = _check_shapes(entries, spec)
    plans = _plan(spec).inputs
    decoded = {e.name: _decode_input(e, plans[e.name], blob) for e, blob in zip(entries, blobs, strict=True)}
    columns = {name: decoded[name] for name in spec.inputs}
    outputs = _requested_outputs(document, parameters, spec)
    return InferRequest(id=request_id, columns=columns, rows=rows, parameters=parameters, outputs=outputs)


def encode_infer_response(spec: ModelSpec, request: InferRequest, outputs: Columns) -> tuple[bytes, dict[str, str]]:
    """Encode the requested outputs as a response body, and the headers it needs.

    Binary outputs follow the JSON part in the order they are listed, and the
    ``inference-header-content-length`` header gives the JSON part's length.
    """
    plans = _plan(spec).outputs
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested in request.outputs:
        entry, blob = _encode_output(requested, plans[requested.name], outputs[requested.name])
        entries.append(entry)
        if blob is not None:
            blobs.append(blob)
    document: dict[str, Any] = {"model_name": spec.name}
    if spec.version is not None:
        document["model_version"] = spec.version
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = entries
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:  # every binary output has a blob, if only b""
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    return b"".join([header, *blobs]), headers


def model_metadata(spec: ModelSpec) -> dict[str, Any]:
    """The body of ``GET /v2/models/{model}``: name, versions, platform and tensor declarations."""
    return {
        "name": spec.name,
        "versions": [] if spec.version is None else [spec.version],
        "platform": spec.platform,
        "inputs": [_tensor_metadata(name, tensor) for name, tensor in spec.inputs.items()],
        "outputs": [_tensor_metadata(name, tensor) for name, tensor in spec.outputs.items()],
    }


def _tensor_metadata(name: str, tensor: Tensor) -> dict[str, Any]:
    return {"name": name, "datatype": str(tensor.dtype), "shape": tensor.batch_shape()}


# --- for other protocols (gRPC): the same checks, messages and conversions ------------------


def check_inputs(heads: Sequence[TensorHead], spec: ModelSpec) -> int:
    """Check the inputs' names, datatypes and shapes against ``spec``'s declaration; return the common row count.

    Raises:
        InvalidRequest: An input is unknown, given twice or missing, or of the wrong datatype or shape.
    """
    _check_names(heads, spec)
    return _check_shapes(heads, spec)


def decode_values(spec: ModelSpec, head: TensorHead, values: Sequence[Any], where: str) -> npt.NDArray[Any]:
    """An input's column from its flat values, already of the datatype's kind (numbers, booleans, bytes).

    Raises:
        InvalidRequest: The values do not fill the shape, or are not finite.
        SchemaViolation: A value is out of the datatype's range (``where`` names the field).
    """
    given = _plan(spec).inputs[head.name]
    count = math.prod(head.shape)
    if len(values) != count:
        raise InvalidRequest(
            f"input {head.name!r} has shape {head.shape}, which holds {count} values, but its data holds {len(values)}"
        )
    if not given.code:
        return _bytes_column(head.name, given.tensor.binary, list(values)).reshape(head.shape)
    column = pack_numbers(list(values), head.shape, given.dtype, given.code)
    if column is None:
        datatype = given.datatype
        raise SchemaViolation(
            where, f"input {head.name!r} holds a value out of the {datatype} range {_range(datatype)}"
        )
    return _finite(given, column, "its data")


def decode_binary(spec: ModelSpec, head: TensorHead, blob: bytes, where: str) -> npt.NDArray[Any]:
    """An input's column from its binary data: little-endian values, or BYTES as 4-byte lengths and bytes.

    Raises:
        InvalidRequest: The data does not fit the shape and datatype (``where`` names the field).
    """
    given = _plan(spec).inputs[head.name]
    if given.code:
        return _fixed_size_column(given, head.shape, memoryview(blob), where)
    values = _unpack_bytes(head.name, memoryview(blob))
    count = math.prod(head.shape)
    if len(values) != count:
        raise InvalidRequest(
            f"input {head.name!r} has shape {head.shape}, which holds {count} values, but {where} holds {len(values)}"
        )
    return _bytes_column(head.name, given.tensor.binary, values).reshape(head.shape)


def encode_binary(spec: ModelSpec, name: str, value: Any) -> tuple[list[int], bytes]:
    """An output's shape and binary data (little-endian values; BYTES as 4-byte lengths and bytes)."""
    output = _plan(spec).outputs[name]
    array = np.asarray(value, dtype=object) if output.text else np.ascontiguousarray(value, dtype=output.dtype)
    blob = _pack_bytes(array.reshape(-1)) if output.text else array.astype(output.wire, copy=False).tobytes()
    return list(array.shape), blob


def encode_values(spec: ModelSpec, name: str, value: Any) -> tuple[list[int], list[Any]]:
    """An output's shape and flat values: Python numbers, booleans, or bytes for BYTES."""
    output = _plan(spec).outputs[name]
    if output.text:
        array = np.asarray(value, dtype=object)
        return list(array.shape), [_as_bytes(v) for v in array.reshape(-1).tolist()]
    array = np.asarray(value, dtype=output.dtype)
    values: list[Any] = array.reshape(-1).tolist()
    return list(array.shape), values


def check_outputs_asked(names: Sequence[str], spec: ModelSpec) -> list[str]:
    """The outputs asked for by name, each declared and asked once; every output when none are asked."""
    for name in names:
        if name not in spec.outputs:
            raise InvalidRequest(f"model {spec.label!r} has no output {name!r}; its outputs are {list(spec.outputs)}")
    if len(set(names)) != len(names):
        raise InvalidRequest(f"outputs name {list(names)}; ask for each output once")
    return list(names) or list(spec.outputs)


# --- the per-model plan --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _InputPlan:
    """What one declared input takes, worked out once per model for the fast path."""

    name: str
    tensor: Tensor
    datatype: Datatype
    dims: list[int]  # the row shape, as a list to compare with a request's shape[1:]
    fixed: bool  # no -1 in dims: comparing the lists decides
    accepted: frozenset[type]
    dtype: np.dtype[Any]
    wire: np.dtype[Any]  # little-endian, as binary data is sent
    code: str  # struct's code, "?" for BOOL; "" for BYTES
    packs_any: bool  # a number datatype: its struct code refuses what the datatype does, but booleans

    def takes(self, shape: Any) -> bool:
        """Whether ``shape`` is a list of integers, rows >= 1 then the declared row shape."""
        if type(shape) is not list or len(shape) != len(self.dims) + 1 or set(map(type, shape)) != _INT:
            return False  # (a boolean is not an integer here, and 2.0 == 2 would pass the comparison)
        if shape[0] < 1:
            return False
        if self.fixed:
            return shape[1:] == self.dims
        return min(shape) >= 0 and all(d in (-1, s) for d, s in zip(self.dims, shape[1:], strict=True))


@dataclass(frozen=True, slots=True)
class _OutputPlan:
    datatype: str
    text: bool  # BYTES
    dtype: np.dtype[Any]
    wire: np.dtype[Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    inputs: dict[str, _InputPlan]
    names: list[str]  # the inputs' names, in the order the columns are given to the model
    outputs: dict[str, _OutputPlan]
    default_outputs: tuple[tuple[RequestedOutput, ...], tuple[RequestedOutput, ...]]  # text, binary


@per_spec
def _plan(spec: ModelSpec) -> _Plan:
    inputs = {name: _input_plan(name, tensor) for name, tensor in spec.inputs.items()}
    outputs = {
        name: _OutputPlan(
            tensor.dtype.value, tensor.dtype is Datatype.BYTES, tensor.dtype.numpy_dtype, _WIRE[tensor.dtype]
        )
        for name, tensor in spec.outputs.items()
    }
    defaults = tuple(tuple(RequestedOutput(name, binary) for name in spec.outputs) for binary in (False, True))
    return _Plan(inputs, list(inputs), outputs, (defaults[0], defaults[1]))


def _input_plan(name: str, tensor: Tensor) -> _InputPlan:
    datatype = tensor.dtype
    dims = list(tensor.shape)
    accepted = _ACCEPTED[datatype][0]
    code = STRUCT_CODES.get(datatype, "")
    packs_any = code not in ("", "?")  # "?" takes any value
    return _InputPlan(
        name, tensor, datatype, dims, -1 not in dims, accepted, datatype.numpy_dtype, _WIRE[datatype], code, packs_any
    )


# --- request structure ---------------------------------------------------------------------


def _split_body(body: bytes, header_length: int | None) -> tuple[bytes | memoryview, memoryview]:
    if header_length is None:
        return body, _NO_TAIL
    view = memoryview(body)
    if not 0 <= header_length <= len(body):
        raise InvalidRequest(
            f"Inference-Header-Content-Length is {header_length} but the body holds {len(body)} bytes; "
            f"it must give the length of the JSON part, between 0 and {len(body)}"
        )
    return view[:header_length], view[header_length:]


def _parse_json(header: bytes | memoryview, header_length: int | None) -> dict[str, Any]:
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        hint = (
            ""
            if header_length is not None
            else "; a body with binary data needs the Inference-Header-Content-Length header"
        )
        raise InvalidRequest(f"the request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(document, dict):
        raise SchemaViolation("", f"the request must be a JSON object, got {_json_type(document)}")
    return document


def _get(obj: dict[str, Any], key: str, kind: type, path: str, *, required: bool = True) -> Any:
    """``obj[key]`` checked to be of JSON type ``kind``; None when absent (or null) and not required."""
    value = obj.get(key)
    if value is None:
        if required:
            raise SchemaViolation(_where(path, key), "is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SchemaViolation(_where(path, key), f"must be {_JSON_TYPES[kind]}, got {_json_type(value)}")
    return value


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _input_entry(item: Any, path: str) -> _Input:
    if not isinstance(item, dict):
        raise SchemaViolation(path, f"must be an object, got {_json_type(item)}")
    binary_size = _binary_size(item, path)
    data: list[Any] | None = _get(item, "data", list, path, required=binary_size is None)
    if data is not None and binary_size is not None:
        raise SchemaViolation(f"{path}.data", "must be left out when parameters.binary_data_size is given")
    shape: list[Any] = _get(item, "shape", list, path)
    if not all(type(d) is int and d >= 0 for d in shape):
        raise SchemaViolation(f"{path}.shape", f"must be a list of integers >= 0, got {shape}")
    name: str = _get(item, "name", str, path)
    datatype: str = _get(item, "datatype", str, path)
    return _Input(path, name, datatype, shape, data or [], binary_size)


def _binary_size(item: dict[str, Any], path: str) -> int | None:
    parameters: dict[str, Any] = _get(item, "parameters", dict, path, required=False) or {}
    if "shared_memory_region" in parameters:
        raise InvalidRequest(f"{path}: the shared-memory extension is not supported; send the data in the body")
    size: int | None = _get(parameters, "binary_data_size", int, f"{path}.parameters", required=False)
    if size is not None and size < 0:
        raise SchemaViolation(f"{path}.parameters.binary_data_size", f"must be >= 0, got {size}")
    return size


def _slice_blobs(entries: list[_Input], tail: memoryview, header_length: int | None) -> list[memoryview | None]:
    """Each input's share of the binary tail, in the order the inputs are listed."""
    total = sum(e.binary_size or 0 for e in entries)
    if header_length is None and total:
        raise InvalidRequest(
            "inputs carry parameters.binary_data_size but the request has no Inference-Header-Content-Length "
            "header; send it with the length of the JSON part"
        )
    if total != len(tail):
        raise InvalidRequest(
            f"the inputs' binary_data_size values add up to {total} bytes but {len(tail)} bytes "
            "follow the JSON part of the body"
        )
    ends = list(accumulate((e.binary_size or 0 for e in entries), initial=0))
    return [
        None if e.binary_size is None else tail[start:end]
        for e, (start, end) in zip(entries, pairwise(ends), strict=True)
    ]


def _check_names(entries: Sequence[TensorHead], spec: ModelSpec) -> None:
    declared = list(spec.inputs)
    seen: set[str] = set()
    for entry in entries:
        if entry.name not in spec.inputs:
            raise InvalidRequest(f"model {spec.label!r} has no input {entry.name!r}; its inputs are {declared}")
        if entry.name in seen:
            raise InvalidRequest(f"input {entry.name!r} is given more than once; send each input once")
        seen.add(entry.name)
    missing = [name for name in declared if name not in seen]
    if missing:
        raise InvalidRequest(f"the request is missing input(s) {missing}; model {spec.label!r} takes {declared}")


def _check_shapes(entries: Sequence[TensorHead], spec: ModelSpec) -> int:
    """Check each input's datatype and shape against its declaration; return the common row count."""
    rows = 0
    for entry in entries:
        tensor = spec.inputs[entry.name]
        if entry.datatype != tensor.dtype:
            raise InvalidRequest(
                f'input {entry.name!r} is declared {tensor.dtype}; send "datatype": "{tensor.dtype}", '
                f"got {entry.datatype!r}"
            )
        shape = entry.shape
        if not shape or shape[0] < 1 or not tensor.row_shape_matches(tuple(shape[1:])):
            expected = ", ".join(["rows", *(str(d) for d in tensor.shape)])
            raise InvalidRequest(
                f"input {entry.name!r} takes shape [{expected}] with rows >= 1 (-1 matches any length), got {shape}"
            )
        if rows and shape[0] != rows:
            raise InvalidRequest(
                f"input {entry.name!r} has {shape[0]} rows but {entries[0].name!r} has {rows}; "
                "all inputs must have the same number of rows"
            )
        rows = shape[0]
    return rows


def _requested_outputs(document: dict[str, Any], parameters: dict[str, Any], spec: ModelSpec) -> list[RequestedOutput]:
    default: bool = _get(parameters, "binary_data_output", bool, "parameters", required=False) or False
    items: list[Any] = _get(document, "outputs", list, "", required=False) or []
    if not items:
        return [RequestedOutput(name, default) for name in spec.outputs]
    requested = [_requested_output(item, f"outputs[{i}]", spec, default) for i, item in enumerate(items)]
    names = [r.name for r in requested]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"outputs name {names}; ask for each output once")
    return requested


def _requested_output(item: Any, path: str, spec: ModelSpec, default: bool) -> RequestedOutput:
    if not isinstance(item, dict):
        raise SchemaViolation(path, f"must be an object, got {_json_type(item)}")
    name: str = _get(item, "name", str, path)
    if name not in spec.outputs:
        raise InvalidRequest(f"model {spec.label!r} has no output {name!r}; its outputs are {list(spec.outputs)}")
    parameters: dict[str, Any] = _get(item, "parameters", dict, path, required=False) or {}
    for extension in ("classification", "shared_memory_region"):
        if extension in parameters:
            raise InvalidRequest(f"{path}: parameters.{extension} is not supported by this server")
    binary: bool | None = _get(parameters, "binary_data", bool, f"{path}.parameters", required=False)
    return RequestedOutput(name, default if binary is None else binary)


# --- the fast path -------------------------------------------------------------------------


def _fast_request(document: dict[str, Any], spec: ModelSpec, tail: memoryview, booleans: bool) -> InferRequest | None:
    """The request, or None if it is anything but plain; it may also raise, for the exact path to report.

    It accepts only what the exact path accepts, checks it without building any error message or
    path, and decodes the data with the same functions, so it returns the same request.
    ``booleans`` is False if the JSON text holds no true or false (see ``may_hold_booleans``).
    """
    items = document.get("inputs")
    request_id = document.get("id")
    parameters = document.get("parameters", {})
    if type(items) is not list or type(parameters) is not dict or type(request_id) not in (str, type(None)):
        return None
    plan = _plan(spec)
    found = _fast_columns(items, plan, tail, booleans)
    if found is None:
        return None
    outputs = _fast_outputs(document, parameters, spec, plan)
    return InferRequest(request_id, found[0], found[1], parameters, outputs)


def _fast_columns(items: list[Any], plan: _Plan, tail: memoryview, booleans: bool) -> tuple[Columns, int] | None:
    """One column per declared input (each given once) and the common row count, or None."""
    if len(items) != len(plan.inputs):
        return None
    decoded: Columns = {}
    rows = offset = 0
    for item in items:
        entry = _fast_entry(item, plan)
        if entry is None or entry[0].name in decoded or rows not in (0, entry[1][0]):
            return None
        given, shape, data, size = entry
        rows = shape[0]
        if size is None:
            column = _fast_json_column(given, shape, data, booleans)
        else:
            column = _fast_binary_column(given, shape, tail[offset : offset + size])
            offset += size
        if column is None:
            return None
        decoded[given.name] = column
    # Binary sizes that overrun the tail (empty without a header length) give short blobs, refused
    # above, or end up past it here.
    if offset != len(tail):
        return None
    return (decoded if list(decoded) == plan.names else {name: decoded[name] for name in plan.names}), rows


def _fast_entry(item: Any, plan: _Plan) -> tuple[_InputPlan, list[int], Any, int | None] | None:
    """A declared input with its valid shape, its data and its binary size, or None."""
    if type(item) is not dict:
        return None
    name = item.get("name")
    given = plan.inputs.get(name) if type(name) is str else None
    shape: Any = item.get("shape")
    if given is None or item.get("datatype") != given.datatype or not given.takes(shape):
        return None
    parameters = item.get("parameters")
    if parameters is None:
        return given, shape, item.get("data"), None
    if type(parameters) is not dict or "shared_memory_region" in parameters:
        return None
    size = parameters.get("binary_data_size")
    if size is None:
        return given, shape, item.get("data"), None
    if type(size) is not int or size < 0 or item.get("data") is not None:
        return None
    return given, shape, None, size


def _fast_json_column(given: _InputPlan, shape: list[int], data: Any, booleans: bool) -> npt.NDArray[Any] | None:
    if type(data) is not list:
        return None
    if not booleans and given.packs_any:
        # struct refuses every value but a number (and floats for an integer code), and there is no
        # boolean in the body: flat data of the right length is packed without looking at its types.
        column = pack_numbers(data, shape, given.dtype, given.code) if len(data) == math.prod(shape) else None
        if column is not None:
            return column
    leaves = _leaves(data)
    if leaves is None:
        return None
    values, types = leaves
    if not types <= given.accepted or len(values) != math.prod(shape):
        return None
    if not given.code:
        return _bytes_column(given.name, given.tensor.binary, values).reshape(shape)
    return pack_numbers(values, shape, given.dtype, given.code)


def _fast_binary_column(given: _InputPlan, shape: list[int], blob: memoryview) -> npt.NDArray[Any] | None:
    if given.code:
        return _fixed_size_column(given, shape, blob)
    values = _unpack_bytes(given.name, blob)
    if len(values) != math.prod(shape):
        return None
    return _bytes_column(given.name, given.tensor.binary, values).reshape(shape)


def _fast_outputs(
    document: dict[str, Any], parameters: dict[str, Any], spec: ModelSpec, plan: _Plan
) -> list[RequestedOutput]:
    """The outputs by default, made once per model, or else read by the exact path (which may raise)."""
    default = parameters.get("binary_data_output")
    if document.get("outputs") is None and type(default) in _OPTIONAL_BOOL:
        return list(plan.default_outputs[default is True])
    return _requested_outputs(document, parameters, spec)


# --- input data ----------------------------------------------------------------------------


def _decode_input(entry: _Input, given: _InputPlan, blob: memoryview | None) -> npt.NDArray[Any]:
    if blob is not None and given.code:
        return _fixed_size_column(given, entry.shape, blob)
    if blob is not None:
        values: list[Any] = _unpack_bytes(entry.name, blob)
    else:
        values, types = _flatten(entry)
        _check_types(entry, given.datatype, values, types)
    count = math.prod(entry.shape)
    if len(values) != count:
        raise InvalidRequest(
            f"input {entry.name!r} has shape {entry.shape}, which holds {count} values, "
            f"but its data holds {len(values)}"
        )
    if not given.code:
        return _bytes_column(entry.name, given.tensor.binary, values).reshape(entry.shape)
    return _numeric_column(entry, given, values)


def _flatten(entry: _Input) -> tuple[list[Any], set[type]]:
    leaves = _leaves(entry.data)
    if leaves is None:
        raise SchemaViolation(f"{entry.path}.data", f"input {entry.name!r} mixes lists and values at one depth")
    return leaves


def _leaves(data: list[Any]) -> tuple[list[Any], set[type]] | None:
    """Nested lists flattened (row-major) with the set of their types, found at C speed; None if mixed."""
    types = set(map(type, data))
    while list in types:
        if len(types) > 1:
            return None
        data = list(chain.from_iterable(data))
        types = set(map(type, data))
    return data, types


def _check_types(entry: _Input, datatype: Datatype, values: list[Any], types: set[type]) -> None:
    allowed, word = _ACCEPTED[datatype]
    if not types <= allowed:
        index, bad = next((i, v) for i, v in enumerate(values) if type(v) not in allowed)
        raise SchemaViolation(
            f"{entry.path}.data",
            f"input {entry.name!r} is {datatype} and takes {word}; value {index} is {orjson.dumps(bad).decode()[:80]}",
        )


def _numeric_column(entry: _Input, given: _InputPlan, values: list[Any]) -> npt.NDArray[Any]:
    column = pack_numbers(values, entry.shape, given.dtype, given.code)
    if column is None:
        datatype = given.datatype
        raise SchemaViolation(
            f"{entry.path}.data", f"input {entry.name!r} holds a value out of the {datatype} range {_range(datatype)}"
        )
    return column


def _range(datatype: Datatype) -> str:
    if datatype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[datatype]
        return f"[{low}, {high}]"
    return f"[-{np.finfo(datatype.numpy_dtype).max}, {np.finfo(datatype.numpy_dtype).max}]"


def _bytes_column(name: str, binary: bool, values: list[Any]) -> npt.NDArray[Any]:
    """An object column of bytes (binary tensors) or str, whichever form the values came in."""
    if binary:
        values = [v.encode() if isinstance(v, str) else v for v in values]
    else:
        values = [_utf8(name, i, v) if isinstance(v, bytes) else v for i, v in enumerate(values)]
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _utf8(name: str, index: int, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} takes text, but value {index} is not valid UTF-8") from None


def _unpack_bytes(name: str, blob: memoryview) -> list[bytes]:
    """Split BYTES binary data: each element is a little-endian uint32 length, then that many bytes."""
    values: list[bytes] = []
    offset = 0
    while offset < len(blob):
        end = offset + _U32.size
        if end <= len(blob):
            (length,) = _U32.unpack_from(blob, offset)
            offset, end = end, end + length
        if end > len(blob):
            raise InvalidRequest(
                f"input {name!r}: its binary BYTES data ends inside value {len(values)}; "
                "each value is a 4-byte little-endian length followed by that many bytes"
            )
        values.append(bytes(blob[offset:end]))
        offset = end
    return values


def _fixed_size_column(
    given: _InputPlan, shape: list[int], blob: memoryview, where: str | None = None
) -> npt.NDArray[Any]:
    expected = math.prod(shape) * given.dtype.itemsize
    if len(blob) != expected:
        got = f"binary_data_size {len(blob)}" if where is None else f"{len(blob)} bytes in {where}"
        raise InvalidRequest(
            f"input {given.name!r} of shape {shape} and datatype {given.datatype} takes {expected} bytes "
            f"of binary data, got {got}"
        )
    if given.code == "?":
        raw = np.frombuffer(blob, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidRequest(f"input {given.name!r} is BOOL and its binary data must hold bytes 0 or 1")
        return raw.astype(np.bool_).reshape(shape)
    # astype copies: the column is writable, native-endian and does not pin the request body.
    column = np.frombuffer(blob, dtype=given.wire).astype(given.dtype).reshape(shape)
    return _finite(given, column, "its binary data")


def _finite(given: _InputPlan, column: npt.NDArray[Any], what: str) -> npt.NDArray[Any]:
    if given.dtype.kind == "f" and column.size and not np.isfinite(column).all():
        at = int(np.flatnonzero(~np.isfinite(column.ravel()))[0])
        raise InvalidRequest(
            f"input {given.name!r}: value {at} of {what} is {column.ravel()[at]}; send finite numbers "
            "(JSON cannot carry NaN or infinity either)"
        )
    return column


# --- output data ---------------------------------------------------------------------------


def _encode_output(requested: RequestedOutput, output: _OutputPlan, value: Any) -> tuple[dict[str, Any], bytes | None]:
    array = np.asarray(value, dtype=object) if output.text else np.ascontiguousarray(value, dtype=output.dtype)
    entry: dict[str, Any] = {"name": requested.name, "datatype": output.datatype, "shape": list(array.shape)}
    if requested.binary:
        # tobytes writes a C-contiguous array in row-major order, as the flattened array would.
        blob = _pack_bytes(array.reshape(-1)) if output.text else array.astype(output.wire, copy=False).tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    if output.text:
        entry["data"], is_base64 = _json_strings(array.reshape(-1).tolist())
        if is_base64:
            entry["parameters"] = {"content_type": "base64"}
    else:
        entry["data"] = array.reshape(-1)
    return entry, None


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def _pack_bytes(values: npt.NDArray[Any]) -> bytes:
    parts: list[bytes] = []
    for value in values.tolist():
        data = _as_bytes(value)
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _json_strings(values: list[Any]) -> tuple[list[str], bool]:
    """Values as JSON strings: text as is, bytes as UTF-8, or all of them base64 when some bytes are not UTF-8."""
    try:
        return [v if isinstance(v, str) else _as_bytes(v).decode() for v in values], False
    except UnicodeDecodeError:
        return [base64.b64encode(_as_bytes(v)).decode("ascii") for v in values], True
