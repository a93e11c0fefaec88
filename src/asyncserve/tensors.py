"""Tensor declarations: the 13 Open Inference Protocol datatypes and a model's typed inputs and outputs.

A model declares each input and output as a :class:`Tensor`: a datatype and the shape of *one row*
(the batch dimension is implied). Inside asyncserve a batch of rows travels as *columns*: a dict
from tensor name to a NumPy array whose first dimension is the number of rows. ``BYTES`` columns
are object arrays holding ``str`` (or ``bytes`` when the tensor is declared ``binary=True``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from asyncserve.exceptions import ConfigurationError

Columns = dict[str, npt.NDArray[Any]]
"""A batch of rows as named arrays sharing their first (row) dimension."""


class Datatype(enum.StrEnum):
    """The tensor datatypes of the Open Inference Protocol (V2)."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return _NUMPY_DTYPES[self]

    @property
    def json_type(self) -> str:
        """The JSON Schema type of one element."""
        if self is Datatype.BOOL:
            return "boolean"
        if self is Datatype.BYTES:
            return "string"
        if self in (Datatype.FP16, Datatype.FP32, Datatype.FP64):
            return "number"
        return "integer"

    @classmethod
    def of(cls, dtype: np.dtype[Any]) -> Datatype:
        """The datatype that carries a NumPy dtype (object, str and bytes arrays map to BYTES)."""
        if dtype.kind in "OSU":
            return cls.BYTES
        for datatype, candidate in _NUMPY_DTYPES.items():
            if candidate == dtype:
                return datatype
        raise TypeError(f"no Open Inference Protocol datatype carries NumPy dtype {dtype}")


_NUMPY_DTYPES: dict[Datatype, np.dtype[Any]] = {
    Datatype.BOOL: np.dtype(np.bool_),
    Datatype.UINT8: np.dtype(np.uint8),
    Datatype.UINT16: np.dtype(np.uint16),
    Datatype.UINT32: np.dtype(np.uint32),
    Datatype.UINT64: np.dtype(np.uint64),
    Datatype.INT8: np.dtype(np.int8),
    Datatype.INT16: np.dtype(np.int16),
    Datatype.INT32: np.dtype(np.int32),
    Datatype.INT64: np.dtype(np.int64),
    Datatype.FP16: np.dtype(np.float16),
    Datatype.FP32: np.dtype(np.float32),
    Datatype.FP64: np.dtype(np.float64),
    Datatype.BYTES: np.dtype(object),
}

_NUMPY_NAMES: dict[str, Datatype] = {
    "bool": Datatype.BOOL,
    **{f"{kind}{bits}": Datatype(f"{kind.upper()}{bits}") for kind in ("uint", "int") for bits in (8, 16, 32, 64)},
    "float16": Datatype.FP16,
    "float32": Datatype.FP32,
    "float64": Datatype.FP64,
    "bytes": Datatype.BYTES,
    "str": Datatype.BYTES,
    "object": Datatype.BYTES,
}
"""NumPy's names for the dtypes that a V2 datatype carries."""

_PYTHON_TYPES = (bool, int, float, bytes, str, object)
"""Python types taken as NumPy takes them (``float`` is FP64, ``int`` INT64, ``str`` BYTES); no other class."""

DatatypeLike = Datatype | str | type | np.dtype[Any]
"""What a :class:`Tensor` takes as its datatype: a V2 name (``"FP32"``), a NumPy name (``"float32"``),
a NumPy type or dtype (``np.float32``), or one of the Python types ``bool``, ``int``, ``float``,
``bytes``, ``str``, ``object``."""


def to_datatype(value: DatatypeLike) -> Datatype:
    """The V2 datatype that ``value`` names; a ConfigurationError, listing what is accepted, if none does."""
    found = _named(value) if isinstance(value, str) else _of_type(value)
    if found is None:
        raise ConfigurationError(
            f"unknown tensor datatype {value!r}; use a V2 name ({', '.join(Datatype)}), a NumPy name "
            f"({', '.join(_NUMPY_NAMES)}) or a NumPy type such as np.float32"
        )
    return found


def _named(name: str) -> Datatype | None:
    if name.lower() in _NUMPY_NAMES:
        return _NUMPY_NAMES[name.lower()]
    return Datatype.__members__.get(name.upper())


def _of_type(value: object) -> Datatype | None:
    numpy_type = isinstance(value, type) and issubclass(value, np.generic)
    if not (isinstance(value, np.dtype) or numpy_type or any(value is known for known in _PYTHON_TYPES)):
        return None  # np.dtype() would take any other class as ``object``
    try:
        return Datatype.of(np.dtype(value))  # type: ignore[call-overload]
    except TypeError:
        return None


# Integer ranges, to refuse a JSON value that would wrap around when cast.
INTEGER_RANGES: dict[Datatype, tuple[int, int]] = {
    datatype: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    for datatype, dtype in _NUMPY_DTYPES.items()
    if dtype.kind in "iu"
}


@dataclass(frozen=True)
class Tensor:
    """The declaration of one input or output: its datatype and the shape of one row.

    ``shape=()`` is one scalar per row, ``shape=(4,)`` four values per row, and ``-1`` marks a
    dimension of any length. ``binary=True`` hands ``BYTES`` values to the model as ``bytes``
    instead of decoded ``str`` (the JSON API then takes and gives them base64-encoded).

    Example::

        inputs = {"features": Tensor("FP32", shape=(4,))}     # or Tensor("float32", ...), Tensor(np.float32, ...)
        outputs = {"label": Tensor("BYTES"), "probabilities": Tensor("FP32", shape=(3,))}
    """

    datatype: DatatypeLike
    """A V2 name (``"FP32"``), a NumPy name (``"float32"``) or type (``np.float32``); kept as a :class:`Datatype`."""
    shape: tuple[int, ...] = ()
    binary: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datatype", to_datatype(self.datatype))
        object.__setattr__(self, "shape", tuple(self.shape))
        dims: tuple[object, ...] = self.shape
        if not all(isinstance(d, int) and (d >= 0 or d == -1) for d in dims):
            raise ConfigurationError(f"a tensor shape holds lengths >= 0 or -1 for any length, got {self.shape}")
        if self.binary and self.datatype is not Datatype.BYTES:
            raise ConfigurationError("binary=True applies to BYTES tensors only")

    @property
    def dtype(self) -> Datatype:
        return self.datatype  # type: ignore[return-value]  # __post_init__ made it a Datatype

    def batch_shape(self) -> list[int]:
        """The shape the Open Inference Protocol metadata reports: a leading -1 for the rows."""
        return [-1, *self.shape]

    def row_shape_matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(d == -1 or d == s for d, s in zip(self.shape, shape, strict=True))


def declared_tensors(owner: str, kind: str, value: Any) -> dict[str, Tensor]:
    """Validate a model's ``inputs`` or ``outputs`` mapping at class definition."""
    if not isinstance(value, Mapping) or not value:
        raise ConfigurationError(f"{owner}.{kind} must be a non-empty dict of name -> Tensor, got {value!r}")
    for name, spec in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{owner}.{kind} names must be non-empty strings, got {name!r}")
        if not isinstance(spec, Tensor):
            raise ConfigurationError(f"{owner}.{kind}[{name!r}] must be a Tensor(...), got {spec!r}")
    return dict(value)
