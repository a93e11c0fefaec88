"""The plain JSON API: a row of named inputs (or a list of rows) in, the same shape of outputs out.

``POST /v1/models/{name}/predict`` takes ``{"features": [5.1, 3.5, 1.4, 0.2]}`` and answers
``{"label": "setosa"}``; a list of such objects is one batch, answered by a list in the same order.
Values are plain JSON: numbers, booleans, strings, and nested lists for rows with dimensions.
``BYTES`` tensors declared ``binary=True`` carry base64 strings.

Decoding converts each input with NumPy in one call (the fast path) and walks the values in
Python only once that conversion fails or gives the wrong type or shape, to name the exact
element at fault in a :class:`~asyncserve.exceptions.SchemaViolation`. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from asyncserve.exceptions import InvalidRequest, ModelError, SchemaViolation
from asyncserve.model import ModelSpec
from asyncserve.tensors import INTEGER_RANGES, Columns, Datatype, Tensor

Array = npt.NDArray[Any]

_SHOWN_CHARS = 40
# Floats beyond 2**53 are not exact integers, so they are refused where an integer is expected.
_EXACT_FLOAT_INT = 2**53
_FLOAT_MAX = {dtype: float(np.finfo(dtype.numpy_dtype).max) for dtype in (Datatype.FP16, Datatype.FP32, Datatype.FP64)}


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
    rows, as_list = _rows_of(document, spec)
    for index, row in enumerate(rows):
        # dict keys compare as sets: one C-level comparison per row on the happy path.
        if row.keys() != spec.inputs.keys():
            raise _field_error(row, spec, f"[{index}]" if as_list else "")
    columns = {
        name: _column(name, tensor, [row[name] for row in rows], as_list) for name, tensor in spec.inputs.items()
    }
    return columns, as_list


def encode_rows(spec: ModelSpec, outputs: Columns, as_list: bool) -> bytes:
    """Write output columns as the response body: one JSON object, or a list of them if ``as_list``.

    ``outputs`` holds the declared outputs, checked (``model.check_outputs``); without ``as_list``
    it holds exactly one row. Floats keep their shortest form in their own precision (an FP32
    0.1 is written ``0.1``), NaN and infinities become ``null`` (JSON has neither), and
    ``binary=True`` values are written base64-encoded.
    """
    columns = {name: _json_column(spec, name, tensor, outputs[name]) for name, tensor in spec.outputs.items()}
    if not as_list:
        return orjson.dumps({name: column[0] for name, column in columns.items()}, option=orjson.OPT_SERIALIZE_NUMPY)
    count = len(next(iter(columns.values())))
    rows = [{name: column[i] for name, column in columns.items()} for i in range(count)]
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)


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


def _column(name: str, tensor: Tensor, values: list[Any], as_list: bool) -> Array:
    column = _fast_column(tensor, values)
    if column is not None:
        return column
    # Only a bad (or unusual but valid) body gets here: walking it costs far more than NumPy does.
    row_shape = _explain(name, tensor, values, as_list)
    return _exact_column(tensor, values, row_shape)


def _fast_column(tensor: Tensor, values: list[Any]) -> Array | None:
    """The column NumPy makes of ``values`` in one call, or None if it is not exactly right."""
    dtype = tensor.dtype
    if dtype is Datatype.BYTES:
        return _fast_text(tensor, values)
    try:
        array = np.asarray(values)
    except ValueError:  # ragged lists
        return None
    if not tensor.row_shape_matches(array.shape[1:]):
        return None
    if dtype is Datatype.BOOL:
        # A list mixing booleans with anything else does not come out as a bool array.
        return array if array.dtype.kind == "b" else None
    # NumPy reads true/false as 1/0 in a list of numbers: booleans are refused by type instead.
    if array.dtype.kind not in "iuf" or _holds_bools(values, array.ndim):
        return None
    if dtype.numpy_dtype.kind == "f":
        return _fast_float(array, dtype)
    return _fast_int(array, dtype)


def _holds_bools(values: list[Any], ndim: int) -> bool:
    flat: Iterable[Any] = values
    for _ in range(ndim - 1):
        flat = chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _fast_float(array: Array, dtype: Datatype) -> Array | None:
    with np.errstate(over="ignore"):
        column = array.astype(dtype.numpy_dtype, copy=False)
    # JSON carries no infinity, so one here is a number beyond the datatype's range.
    if dtype is not Datatype.FP64 and np.isinf(column).any():
        return None
    return column


def _fast_int(array: Array, dtype: Datatype) -> Array | None:
    if array.dtype.kind == "f":  # integral floats (1.0) are valid, but rare: the exact path takes them
        return None
    if not np.can_cast(array.dtype, dtype.numpy_dtype) and array.size:
        low, high = INTEGER_RANGES[dtype]
        if int(array.min()) < low or int(array.max()) > high:
            return None
    return array.astype(dtype.numpy_dtype, copy=False)


def _fast_text(tensor: Tensor, values: list[Any]) -> Array | None:
    try:
        # dtype=object keeps Python str (a "<U" array would pad them and strip trailing NULs).
        array = np.asarray(values, dtype=object)
    except ValueError:  # lists ragged below the first level
        return None
    if not tensor.row_shape_matches(array.shape[1:]) or not set(map(type, array.flat)) <= {str}:
        return None
    if not tensor.binary:
        return array
    try:
        decoded: Array = np.frompyfunc(_b64decode, 1, 1)(array)
    except binascii.Error:
        return None
    return decoded


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


def _json_column(spec: ModelSpec, name: str, tensor: Tensor, column: Array) -> Array | list[Any]:
    """A column orjson writes as it should: contiguous numbers, or a nested list of strings."""
    dtype = tensor.dtype
    if dtype is Datatype.BYTES:
        return _text_column(spec, name, tensor, column)
    if dtype is Datatype.FP16:
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
