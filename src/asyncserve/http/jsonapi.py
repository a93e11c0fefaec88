"""The plain JSON API: a row of named inputs (or a list of rows) in, the same shape of outputs out.

``POST /v1/models/{name}/predict`` takes ``{"features": [5.1, 3.5, 1.4, 0.2]}`` and answers
``{"label": "setosa"}``; a list of such objects is one batch, answered by a list in the same order.
Values are plain JSON: numbers, booleans, strings, and nested lists for rows with dimensions.
``BYTES`` tensors declared ``binary=True`` carry base64 strings.

Decoding takes the fast path first: what to check for each input is decided once per model (a
"plan"), the values' lists are measured and their element types collected at C speed, and
:mod:`struct` converts them into the column in one call, refusing any value out of range. The
values are walked in Python only once that path declines, to name the exact element at fault in a
:class:`~asyncserve.exceptions.SchemaViolation`. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, KeysView, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson

from asyncserve.exceptions import InvalidRequest, ModelError, SchemaViolation
from asyncserve.http.conversions import STRUCT_CODES, may_hold_booleans, pack_numbers, per_spec
from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Columns, Datatype, Tensor

Array = npt.NDArray[Any]
_T = TypeVar("_T")

_SHOWN_CHARS = 40
# Floats beyond 2**53 are not exact integers, so they are refused where an integer is expected.
_EXACT_FLOAT_INT = 2**53
_FLOAT_MAX = {dtype: float(np.finfo(dtype.numpy_dtype).max) for dtype in (Datatype.FP16, Datatype.FP32, Datatype.FP64)}

# The element types the fast path takes per datatype (the exact path also takes integral floats
# for integers): struct would also take booleans for numbers, and anything for BOOL.
_ACCEPTED = {dt: frozenset({int, float}) for dt in (Datatype.FP16, Datatype.FP32, Datatype.FP64)}
_ACCEPTED |= {dt: frozenset({int}) for dt in INTEGER_RANGES}
_ACCEPTED |= {Datatype.BOOL: frozenset({bool})}
_INT = frozenset({int})
_LIST = frozenset({list})
_STR = frozenset({str})


def decode_rows(body: bytes, spec: ModelSpec) -> tuple[Columns, bool]:
    """Read a predict request body into input columns.

    Args:
        body: one JSON object of inputs, or a non-empty JSON array of them.
        spec: the model whose declared inputs the body must match.

    Returns:
        The columns (one array per input, first dimension = rows) and whether the body was a list
        of rows, so the response can take the same shape.

    Raises:
        InvalidRequest: the body is not JSON (400).
        SchemaViolation: the body does not match the declared inputs (422); the message starts
            with the path of the first bad value, like ``[1].features[2]``.
    """
    document = _parse(body)
    plan = _plan(spec)
    rows, as_list = _rows_of(document, spec)
    for index, row in enumerate(rows):
        # dict keys compare as sets: one C-level comparison per row on the happy path.
        if row.keys() != plan.keys:
            raise _field_error(row, spec, f"[{index}]" if as_list else "")
    booleans = may_hold_booleans(body)
    columns: Columns = {}
    for reader in plan.readers:
        columns[reader.name] = _column(reader, list(map(reader.value_of, rows)), as_list, booleans)
    return columns, as_list


def encode_rows(spec: ModelSpec, outputs: Columns, as_list: bool) -> bytes:
    """Write output columns as the response body: one JSON object, or a list of them if ``as_list``.

    ``outputs`` holds the declared outputs, checked (``model.check_outputs``); without ``as_list``
    it holds exactly one row. Floats keep their shortest form in their own precision (an FP32
    0.1 is written ``0.1``), NaN and infinities become ``null`` (JSON has neither), and
    ``binary=True`` values are written base64-encoded.
    """
    writers = _plan(spec).writers
    if not as_list:
        row = {w.name: _json_column(spec, w, outputs[w.name])[0] for w in writers}
        return orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)
    columns = {w.name: _json_column(spec, w, outputs[w.name]) for w in writers}
    count = len(next(iter(columns.values())))
    rows = [{name: column[i] for name, column in columns.items()} for i in range(count)]
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)


# -- the per-model plan --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reader:
    """How one declared input is read on the fast path."""

    name: str
    value_of: Callable[[dict[str, Any]], Any]  # a row's value of this input
    tensor: Tensor
    dims: tuple[int, ...]
    dtype: np.dtype[Any]
    code: str  # struct's code ("?" for BOOL); "" for BYTES
    accepted: frozenset[type]
    fp32: bool  # see _read_numbers
    packs_any: bool  # a number datatype: its struct code refuses what the datatype does, but booleans


@dataclass(frozen=True, slots=True)
class _Writer:
    name: str
    tensor: Tensor
    text: bool  # BYTES
    fp16: bool


@dataclass(frozen=True, slots=True)
class _Plan:
    keys: KeysView[str]
    readers: tuple[_Reader, ...]
    writers: tuple[_Writer, ...]


@per_spec
def _plan(spec: ModelSpec) -> _Plan:
    readers = tuple(
        _Reader(
            name,
            itemgetter(name),
            tensor,
            tensor.shape,
            tensor.dtype.numpy_dtype,
            STRUCT_CODES.get(tensor.dtype, ""),
            _ACCEPTED.get(tensor.dtype, _STR),
            tensor.dtype is Datatype.FP32,
            tensor.dtype not in (Datatype.BYTES, Datatype.BOOL),  # "?" takes any value
        )
        for name, tensor in spec.inputs.items()
    )
    writers = tuple(
        _Writer(name, tensor, tensor.dtype is Datatype.BYTES, tensor.dtype is Datatype.FP16)
        for name, tensor in spec.outputs.items()
    )
    return _Plan(spec.inputs.keys(), readers, writers)


# -- decoding: the document ----------------------------------------------------------------------


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON ({exc}); send one JSON object of inputs, or a list of them"
        ) from None


def _rows_of(document: Any, spec: ModelSpec) -> tuple[list[dict[str, Any]], bool]:
    if isinstance(document, dict):
        return [document], False
    wanted = f"a JSON object of inputs ({', '.join(spec.inputs)})"
    if not isinstance(document, list):
        raise SchemaViolation("", f"expected {wanted} or a list of them, got {_show(document)}")
    if not document:
        raise SchemaViolation("", f"expected at least one row, got an empty list; send {wanted}")
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise SchemaViolation(f"[{index}]", f"expected {wanted}, got {_show(row)}")
    return document, True


def _field_error(row: dict[str, Any], spec: ModelSpec, prefix: str) -> SchemaViolation:
    for name in spec.inputs:
        if name not in row:
            return SchemaViolation(_join(prefix, name), "field required")
    unknown = next(name for name in row if name not in spec.inputs)
    return SchemaViolation(
        _join(prefix, unknown), f"unknown field; model {spec.label!r} takes the inputs {', '.join(spec.inputs)}"
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# -- decoding: one input column ------------------------------------------------------------------


def _column(reader: _Reader, values: list[Any], as_list: bool, booleans: bool) -> Array:
    column = _read_numbers(reader, values, booleans) if reader.code else _read_text(reader, values)
    if column is not None:
        return column
    # Only a bad (or unusual but valid) body gets here: walking it costs far more than the fast path.
    row_shape = _explain(reader.name, reader.tensor, values, as_list)
    return _exact_column(reader.tensor, values, row_shape)


def _batch(values: list[Any], dims: tuple[int, ...]) -> tuple[list[Any], tuple[int, ...]] | None:
    """The rows' elements in row-major order and the batch's shape, or None unless ``values`` are
    lists nested as ``dims`` declares, all of one length per level (rows must share one shape)."""
    flat, shape = values, [len(values)]
    for dim in dims:
        level = _level(flat)
        if level is None or (dim != level[1] and dim != -1):
            return None
        flat = level[0]
        shape.append(level[1])
    return flat, tuple(shape)


def _level(items: list[Any]) -> tuple[list[Any], int] | None:
    """The items of ``items``, all lists of one length, and that length; None if they are not."""
    if len(items) == 1:  # one row, or one list inside: checked without building sets
        item = items[0]
        return (item, len(item)) if type(item) is list else None
    # (An empty level has no list to measure: the exact path works its shape out.)
    if set(map(type, items)) != _LIST:
        return None
    lengths = set(map(len, items))
    length = lengths.pop()
    return None if lengths else (list(chain.from_iterable(items)), length)


def _read_numbers(reader: _Reader, values: list[Any], booleans: bool) -> Array | None:
    """The column of a numeric or BOOL input, or None if it is not exactly right."""
    batch = _batch(values, reader.dims)
    if batch is None:
        return None
    flat, shape = batch
    # Without a boolean in the body the types need no look: struct refuses any value but a number
    # (and a float for an integer code). Not for BOOL, nor for FP32 values that may all be integers
    # (the first one is): those are converted below.
    if not booleans and reader.packs_any and not (reader.fp32 and flat and type(flat[0]) is int):
        column = pack_numbers(flat, shape, reader.dtype, reader.code)
        if column is not None:
            return column
    types = set(map(type, flat))
    # Booleans among numbers (struct reads them as 1 and 0), numbers for BOOL, floats for an
    # integer (even 1.0), null, strings and lists nested too deep: all left to the exact path.
    if not types <= reader.accepted:
        return None
    if reader.fp32 and types == _INT:
        # NumPy casts integers to FP32 in one rounding, struct through a double: a few integers
        # beyond 2**53 would differ, so NumPy keeps doing this (no integer overflows FP32).
        converted: Array = np.asarray(flat).astype(reader.dtype).reshape(shape)
        return converted
    return pack_numbers(flat, shape, reader.dtype, reader.code)


def _read_text(reader: _Reader, values: list[Any]) -> Array | None:
    """The column of a BYTES input, or None if it is not exactly right."""
    batch = _batch(values, reader.dims)
    if batch is None or not set(map(type, batch[0])) <= _STR:
        return None
    flat, shape = batch
    if reader.tensor.binary:
        try:
            flat = [_b64decode(value) for value in flat]
        except binascii.Error:
            return None
    # An object array keeps Python str (a "<U" array would pad them and strip trailing NULs).
    column = np.empty(len(flat), dtype=object)
    column[:] = flat
    return column.reshape(shape)


def _b64decode(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _exact_column(tensor: Tensor, values: list[Any], row_shape: tuple[int, ...]) -> Array:
    """The column of values already checked by ``_explain``, converted element by element."""
    # NumPy drops the dimensions after an empty one ([[]] is 1 x 0): the reshape restores them.
    objects = np.asarray(values, dtype=object).reshape((len(values), *row_shape))
    if tensor.dtype is not Datatype.BYTES:
        return objects.astype(tensor.dtype.numpy_dtype)
    if tensor.binary:
        decoded: Array = np.frompyfunc(_b64decode, 1, 1)(objects)
        return decoded
    return objects


# -- decoding: the precise error -----------------------------------------------------------------


def _explain(name: str, tensor: Tensor, values: list[Any], as_list: bool) -> tuple[int, ...]:
    """Raise a SchemaViolation at the first bad value; return the rows' common shape if all are valid."""
    check = _element_check(tensor)
    shapes = [_walk(value, check, tensor.shape, f"[{i}].{name}" if as_list else name) for i, value in enumerate(values)]
    for index, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise SchemaViolation(
                f"[{index}].{name}",
                f"all rows of a batch must share one shape per input, but [0].{name} has shape {list(shapes[0])} "
                f"and this row {list(shape)}; send rows of different shapes in separate requests",
            )
    return shapes[0]


def _walk(value: Any, check: _Check, dims: Sequence[int], path: str) -> tuple[int, ...]:
    """Check one value against the remaining dimensions; return its shape."""
    if not dims:
        check(value, path)
        return ()
    if not isinstance(value, list):
        wanted = "a list" if dims[0] == -1 else f"a list of {dims[0]} values"
        raise SchemaViolation(path, f"expected {wanted}, got {_show(value)}")
    if dims[0] != -1 and len(value) != dims[0]:
        raise SchemaViolation(path, f"expected {dims[0]} values, got {len(value)}")
    if not value:  # nothing inside to measure: an any-length inner dimension counts as 0
        return (0, *(max(d, 0) for d in dims[1:]))
    shapes = [_walk(item, check, dims[1:], f"{path}[{i}]") for i, item in enumerate(value)]
    for index, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise SchemaViolation(
                f"{path}[{index}]",
                f"has shape {list(shape)} but {path}[0] has {list(shapes[0])}; nested lists must be rectangular",
            )
    return (len(value), *shapes[0])


_Check = Callable[[Any, str], None]


def _element_check(tensor: Tensor) -> _Check:
    """The check of one element of ``tensor``, chosen once per column rather than per element."""
    dtype = tensor.dtype
    if dtype is Datatype.BYTES:
        return _check_base64 if tensor.binary else _check_text
    if dtype is Datatype.BOOL:
        return _check_bool
    if dtype.numpy_dtype.kind == "f":
        return partial(_check_float, dtype=dtype)
    return partial(_check_int, dtype=dtype)


def _check_bool(value: Any, path: str) -> None:
    if type(value) is not bool:
        raise SchemaViolation(path, f"expected true or false, got {_show(value)}")


def _check_float(value: Any, path: str, *, dtype: Datatype) -> None:
    if type(value) not in (int, float):
        raise SchemaViolation(path, f"expected a number, got {_show(value)}")
    largest = _FLOAT_MAX[dtype]
    # The cast decides (a value just past the largest rounds down to it); it runs only past it.
    if abs(value) > largest and _overflows(value, dtype):
        raise SchemaViolation(path, f"{_show(value)} is out of range for {dtype} (at most {largest:g} in magnitude)")


def _overflows(value: float, dtype: Datatype) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isinf(dtype.numpy_dtype.type(value)))


def _check_int(value: Any, path: str, *, dtype: Datatype) -> None:
    if type(value) is not int and not (type(value) is float and value.is_integer()):
        raise SchemaViolation(path, f"expected an integer, got {_show(value)}")
    low, high = INTEGER_RANGES[dtype]
    if not low <= value <= high:
        raise SchemaViolation(path, f"{_show(value)} is out of range for {dtype} ({low} to {high})")
    if type(value) is float and abs(value) > _EXACT_FLOAT_INT:
        raise SchemaViolation(
            path, f"expected an integer, got {_show(value)}; write large integers without a decimal point or exponent"
        )


def _check_text(value: Any, path: str) -> None:
    if type(value) is not str:
        raise SchemaViolation(path, f"expected a string, got {_show(value)}")


def _check_base64(value: Any, path: str) -> None:
    if type(value) is not str:
        raise SchemaViolation(path, f"expected a base64 string, got {_show(value)}")
    try:
        _b64decode(value)
    except binascii.Error as exc:
        raise SchemaViolation(path, f"invalid base64 ({exc}); binary values are sent base64-encoded") from None


def _show(value: Any) -> str:
    """A JSON value as the user wrote it, shortened."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # orjson reads lists nested deeper than it writes (1024 vs 255 levels)
        return "a deeply nested list"
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


# -- encoding ------------------------------------------------------------------------------------


def _json_column(spec: ModelSpec, writer: _Writer, column: Array) -> Array | list[Any]:
    """A column orjson writes as it should: contiguous numbers, or a nested list of strings."""
    if writer.text:
        return _text_column(spec, writer.name, writer.tensor, column)
    if writer.fp16:
        # orjson writes float16 via float32 (0.1 -> 0.099975586); NumPy's str is the shortest
        # form that reads back to the same float16, and float64 keeps it short in orjson.
        return column.astype(str).astype(np.float64)
    # orjson refuses non-contiguous arrays (a transposed or sliced output).
    return np.ascontiguousarray(column)


def _text_column(spec: ModelSpec, name: str, tensor: Tensor, column: Array) -> list[Any]:
    convert = _to_base64 if tensor.binary else _to_text
    try:
        texts: list[Any] = np.frompyfunc(convert, 1, 1)(column).tolist()
    except TypeError as exc:
        raise ModelError(f"model {spec.label!r} returned {exc} in its BYTES output {name!r}") from None
    return texts


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise TypeError("bytes that are not UTF-8 (declare the output binary=True to send them base64)") from None
    raise TypeError(f"a value of type {type(value).__name__} (BYTES outputs hold str)")


def _to_base64(value: Any) -> str:
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise TypeError(f"a value of type {type(value).__name__} (binary outputs hold bytes)")
    return base64.b64encode(value).decode("ascii")
