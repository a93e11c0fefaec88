"""NumPy arrays to an Open Inference Protocol (V2) request and back: binary tensor data or JSON.

With the binary tensor data extension the JSON part only describes the tensors: their bytes follow
it (little-endian; a ``BYTES`` element is a 4-byte little-endian length and its bytes), and the
``Inference-Header-Content-Length`` header gives the JSON part's length. The datatypes come from
the arrays' dtypes (``asyncserve.tensors.Datatype.of``: float32 is FP32, str and object arrays
are BYTES).

``BYTES`` outputs come back as an object array of ``str`` when every element is UTF-8 text, and of
``bytes`` otherwise, over binary data and JSON alike (the server's own rule for JSON answers).

Example::

    body, headers = encode_request({"x": np.ones((2, 3), np.float32)}, binary=True, outputs=None, parameters={})
    outputs = decode_response(answer_body, answer_headers.get("inference-header-content-length"))
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from asyncserve.tensors import Datatype

Array = npt.NDArray[Any]

_U32 = struct.Struct("<I")
_JSON = "application/json"


def encode_request(
    inputs: Mapping[str, Any], *, binary: bool, outputs: Sequence[str] | None, parameters: Mapping[str, Any]
) -> tuple[bytes, dict[str, str]]:
    """The body of ``POST /v2/models/{m}/infer`` for ``inputs`` (name -> array-like), and its headers.

    Raises:
        TypeError: An input's dtype has no V2 datatype (complex numbers, say).
        ValueError: ``binary=False`` and a BYTES input holds bytes that are not UTF-8 text.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        entry, blob = _encode_input(name, np.asarray(value), binary)
        entries.append(entry)
        if blob is not None:
            blobs.append(blob)
    document: dict[str, Any] = {"inputs": entries}
    if parameters:
        document["parameters"] = dict(parameters)
    if outputs is not None:
        document["outputs"] = [{"name": name, "parameters": {"binary_data": binary}} for name in outputs]
    elif binary:
        document.setdefault("parameters", {})["binary_data_output"] = True
    header = orjson.dumps(document)
    if not binary:
        return header, {"Content-Type": _JSON}
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return b"".join([header, *blobs]), headers


def _encode_input(name: str, array: Array, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    try:
        datatype = Datatype.of(array.dtype)
    except TypeError as exc:
        raise TypeError(f"input {name!r}: {exc}; convert it, for example with .astype(np.float32)") from None
    entry: dict[str, Any] = {"name": name, "datatype": datatype.value, "shape": list(array.shape)}
    if binary:
        blob = _to_bytes(array, datatype)
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    flat = array.reshape(-1)
    entry["data"] = [_as_text(name, value) for value in flat.tolist()] if datatype is Datatype.BYTES else flat.tolist()
    return entry, None


def _to_bytes(array: Array, datatype: Datatype) -> bytes:
    if datatype is Datatype.BYTES:
        return b"".join(_length_prefixed(value) for value in array.reshape(-1).tolist())
    wire = datatype.numpy_dtype.newbyteorder("<")
    return np.ascontiguousarray(array).astype(wire, copy=False).tobytes()


def _length_prefixed(value: Any) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return _U32.pack(len(data)) + data


def _as_text(name: str, value: Any) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ValueError(
            f"input {name!r} holds bytes that are not UTF-8 text, which JSON cannot carry; send it with binary=True"
        ) from None


def decode_response(body: bytes, header_length: str | None) -> dict[str, Array]:
    """The outputs of a V2 answer by name, as NumPy arrays of their declared shapes."""
    length = len(body) if header_length is None else int(header_length)
    document = orjson.loads(body[:length])
    tail = memoryview(body)[length:]
    outputs: dict[str, Array] = {}
    offset = 0
    for entry in document["outputs"]:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            outputs[entry["name"]] = _from_json(entry)
        else:
            outputs[entry["name"]] = _from_bytes(entry, tail[offset : offset + size])
            offset += size
    return outputs


def _from_bytes(entry: Mapping[str, Any], blob: memoryview) -> Array:
    datatype, shape = Datatype(entry["datatype"]), entry["shape"]
    if datatype is Datatype.BYTES:
        return _text_or_bytes(_split_length_prefixed(blob)).reshape(shape)
    if datatype is Datatype.BOOL:
        return np.frombuffer(blob, dtype=np.uint8).astype(np.bool_).reshape(shape)
    wire = datatype.numpy_dtype.newbyteorder("<")
    # astype copies into the native byte order: the array owns its memory and is writable.
    return np.frombuffer(blob, dtype=wire).astype(datatype.numpy_dtype).reshape(shape)


def _split_length_prefixed(blob: memoryview) -> list[bytes]:
    values: list[bytes] = []
    offset = 0
    while offset < len(blob):
        (length,) = _U32.unpack_from(blob, offset)
        offset += _U32.size
        values.append(bytes(blob[offset : offset + length]))
        offset += length
    return values


def _from_json(entry: Mapping[str, Any]) -> Array:
    datatype, shape, data = Datatype(entry["datatype"]), entry["shape"], entry["data"]
    if datatype is not Datatype.BYTES:
        return np.array(data, dtype=datatype.numpy_dtype).reshape(shape)
    if (entry.get("parameters") or {}).get("content_type") == "base64":
        return _object_array([base64.b64decode(value) for value in data]).reshape(shape)
    return _object_array(data).reshape(shape)


def _text_or_bytes(values: list[bytes]) -> Array:
    try:
        return _object_array([value.decode() for value in values])
    except UnicodeDecodeError:
        return _object_array(values)


def _object_array(values: Sequence[Any]) -> Array:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
