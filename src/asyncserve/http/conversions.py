"""Conversions both wire formats (the JSON API and V2) share: values to columns, per-model caches."""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from asyncserve.model import ModelSpec
from asyncserve.tensors import Datatype

Array = npt.NDArray[Any]
_T = TypeVar("_T")

# struct's codes for the datatypes' standard sizes; "=" (native order, standard sizes) makes the
# "e" and "f" codes refuse a float beyond the datatype's range, and every integer code a value out
# of its range.
STRUCT_CODES = {
    Datatype.BOOL: "?",
    Datatype.UINT8: "B",
    Datatype.UINT16: "H",
    Datatype.UINT32: "I",
    Datatype.UINT64: "Q",
    Datatype.INT8: "b",
    Datatype.INT16: "h",
    Datatype.INT32: "i",
    Datatype.INT64: "q",
    Datatype.FP16: "e",
    Datatype.FP32: "f",
    Datatype.FP64: "d",
}
# Below this length, a JSON body's values' types are found faster than "true" or "false" in its text.
_SHORT_TEXT = 1024
_PAIRS_LOOKED_AT = 16


def per_spec(build: Callable[[ModelSpec], _T]) -> Callable[[ModelSpec], _T]:
    """``build``, run once per model: its result is kept as long as the spec lives.

    A ModelSpec is frozen but holds dicts, so it cannot be a dict key: the cache is keyed by its id,
    and a weak reference both checks the id still names the same spec and drops the entry with it
    (a cached plan must not keep an unloaded model's weights alive).
    """
    cache: dict[int, tuple[weakref.ref[ModelSpec], _T]] = {}

    def cached(spec: ModelSpec) -> _T:
        hit = cache.get(id(spec))
        if hit is not None and hit[0]() is spec:
            return hit[1]
        key, value = id(spec), build(spec)

        def forget(ref: weakref.ref[ModelSpec]) -> None:
            if cache.get(key, (None,))[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(spec, forget), value)
        return value

    return cached


def pack_numbers(values: list[Any], shape: Sequence[int], dtype: np.dtype[Any], code: str) -> Array | None:
    """``values`` as a new array of ``shape``, or None if one is no number for ``code`` or is out of range.

    struct converts as ``np.array(values, dtype)`` does (the tests compare them): a float by C's
    cast (round to nearest, ties to even), an int exactly or, for a float code, through a double.
    With "=" (native order, standard sizes) it refuses what NumPy would wrap or make infinite,
    without NumPy's per-call set-up. It takes booleans as 1 and 0: callers rule them out first.
    """
    column = np.empty(shape, dtype)
    try:
        # ndarray exports the buffer protocol; numpy's stubs declare it only for Python 3.12+.
        struct.pack_into(f"={len(values)}{code}", column, 0, *values)  # type: ignore[arg-type]
    except (struct.error, OverflowError):  # out of range (or an integer code given a float)
        return None
    return column


def may_hold_booleans(text: bytes | memoryview) -> bool:
    """False only if a JSON text holds no true or false: it has no "ue" and no "ls" in it.

    A short text says True: looking at the values' types then costs less than this. The bytes are
    found one at a time, with memchr (searching for the words is ten times slower on digits), and
    a body of numbers has few u or l (one in "inputs"), so few are looked at.
    """
    if not isinstance(text, bytes) or len(text) < _SHORT_TEXT:
        return True  # (a binary V2 request has its data in binary, rarely in JSON)
    return _pair_in(text, b"u", b"e") or _pair_in(text, b"l", b"s")


def _pair_in(text: bytes, first: bytes, second: bytes) -> bool:
    at = text.find(first)
    for _ in range(_PAIRS_LOOKED_AT):
        if at == -1:
            return False
        if text[at + 1 : at + 2] == second:
            return True
        at = text.find(first, at + 1)
    return True  # too many to look at: assume there is one
