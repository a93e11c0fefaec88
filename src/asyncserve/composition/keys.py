"""Canonical request keys: a digest that names a request (model and inputs), and the columns' byte encoding.

:func:`request_key` names a request (the model label and every input column) with a blake2b digest, so
identical requests meet in the :class:`~asyncserve.composition.coalescing.Coalescer`, a prediction cache and
across servers. :func:`encode_columns` / :func:`decode_columns` turn columns into bytes and back (never pickle).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

import numpy as np
import orjson

from asyncserve.tensors import Columns

_KEY_SALT = b"asyncserve.request_key.v1"
_MAGIC = b"ASC1"
_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY


def request_key(model_label: str, columns: Columns) -> str:
    """A canonical key for a request: the same model and inputs give the same 64 hex digits.

    Every column's name, dtype, shape and values count (so int32 and int64 ones differ); columns are
    taken in name order; ``BYTES`` values are told apart as ``str`` or ``bytes``. Every field is
    length-prefixed, so no two different requests feed the hash the same bytes.

    Example::

        request_key("iris:2", {"x": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    """
    digest = hashlib.blake2b(_KEY_SALT, digest_size=32)
    _hash_field(digest, model_label.encode())
    for name in sorted(columns):
        array = np.asarray(columns[name])
        for data in (name.encode(), array.dtype.str.encode(), _shape_bytes(array.shape)):
            _hash_field(digest, data)
        if array.dtype.kind == "O":
            for value in array.ravel():
                _hash_field(digest, _canonical_value(name, value))
        else:
            _hash_field(digest, np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hash_field(digest: Any, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(shape)}q", *shape)


def _canonical_value(column: str, value: object) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"b" + value
    try:
        return b"j" + orjson.dumps(value, option=_JSON_OPTIONS)
    except TypeError:
        raise TypeError(f"column {column!r} holds a {type(value).__name__}, which has no canonical encoding") from None


def encode_columns(columns: Columns) -> bytes:
    """Columns as compact bytes: numeric arrays as dtype, shape and raw bytes; object arrays as JSON.

    Example::

        decode_columns(encode_columns({"y": np.arange(3)}))  # {"y": array([0, 1, 2])}, read-only
    """
    parts = [_MAGIC, struct.pack("<I", len(columns))]
    for name, column in columns.items():
        array = np.asarray(column)
        payload = _encode_objects(array) if array.dtype.kind == "O" else np.ascontiguousarray(array).tobytes()
        for data in (name.encode(), array.dtype.str.encode(), _shape_bytes(array.shape), payload):
            parts += [struct.pack("<Q", len(data)), data]
    return b"".join(parts)


def decode_columns(data: bytes) -> Columns:
    """The columns :func:`encode_columns` encoded (numeric ones read-only); ``ValueError`` if ``data`` is not."""
    if not data.startswith(_MAGIC):
        raise ValueError("not a batch of columns encoded by asyncserve.composition.keys.encode_columns")
    try:
        (count,) = struct.unpack_from("<I", data, len(_MAGIC))
        fields = _fields(data, len(_MAGIC) + 4)
        if len(fields) != 4 * count:
            raise ValueError(f"{len(fields)} fields for {count} columns")
        columns = iter(fields)
        return {name.decode(): _decoded(*rest) for name, *rest in zip(columns, columns, columns, columns, strict=True)}
    except (TypeError, struct.error) as exc:
        raise ValueError(f"a corrupt batch of columns: {exc}") from None


def _decoded(dtype_text: bytes, shape_bytes: bytes, payload: bytes) -> np.ndarray[Any, Any]:
    dtype = np.dtype(dtype_text.decode("ascii"))
    shape = struct.unpack(f"<{len(shape_bytes) // 8}q", shape_bytes)
    array = _decode_objects(payload) if dtype.kind == "O" else np.frombuffer(payload, dtype=dtype)
    return array.reshape(shape)


def _fields(data: bytes, offset: int) -> list[bytes]:
    fields = []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        fields.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    if offset != len(data):
        raise ValueError("a truncated batch of columns")
    return fields


def _encode_objects(array: np.ndarray[Any, Any]) -> bytes:
    # Tagged, so that str and bytes come back as what they were.
    def tagged(value: object) -> list[object]:
        if isinstance(value, bytes):
            return ["b", base64.b64encode(value).decode("ascii")]
        return ["s" if isinstance(value, str) else "j", value]

    return orjson.dumps([tagged(value) for value in array.ravel()], option=orjson.OPT_SERIALIZE_NUMPY)


def _decode_objects(payload: bytes) -> np.ndarray[Any, Any]:
    items = orjson.loads(payload)
    array = np.empty(len(items), dtype=object)
    for i, (tag, value) in enumerate(items):
        array[i] = base64.b64decode(value) if tag == "b" else value
    return array
