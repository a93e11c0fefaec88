"""The plain JSON API codec: rows in, columns out, and a precise 4xx for every bad body."""

from __future__ import annotations

import base64
import gc
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from asyncserve.exceptions import InvalidRequest, ModelError, SchemaViolation
from asyncserve.http import jsonapi
from asyncserve.http.conversions import STRUCT_CODES, may_hold_booleans, pack_numbers, per_spec
from asyncserve.http.jsonapi import decode_rows, encode_rows
from asyncserve.model import Model, ModelSpec, describe
from asyncserve.tensors import INTEGER_RANGES, Datatype, Tensor


class Iris(Model):
    name = "iris"
    inputs: ClassVar[Mapping[str, Tensor]] = {"features": Tensor("FP32", shape=(4,)), "text": Tensor("BYTES")}
    outputs: ClassVar[Mapping[str, Tensor]] = {"label": Tensor("BYTES"), "probabilities": Tensor("FP32", shape=(3,))}

    def predict(self, features: npt.NDArray[Any], text: npt.NDArray[Any]) -> dict[str, Any]:
        return {"label": text, "probabilities": features[:, :3]}


IRIS = describe(Iris())


def spec_of(inputs: dict[str, Tensor], outputs: dict[str, Tensor] | None = None) -> ModelSpec:
    """A model taking ``inputs`` (and returning ``outputs``) whose predict takes any keywords."""

    class Probe(Model):
        name = "probe"

        def predict(self, **columns: Any) -> Any:
            return columns

    Probe.inputs = inputs
    Probe.outputs = outputs or {"y": Tensor("FP32")}
    return describe(Probe())


def decode(body: Any, spec: ModelSpec) -> tuple[dict[str, npt.NDArray[Any]], bool]:
    return decode_rows(orjson.dumps(body), spec)


def violation(body: Any, spec: ModelSpec) -> SchemaViolation:
    with pytest.raises(SchemaViolation) as info:
        decode(body, spec)
    assert info.value.status_code == 422
    assert info.value.code == "schema_violation"
    return info.value


# -- decoding: happy paths -----------------------------------------------------------------------


def test_one_row_decodes_to_columns_of_one_row() -> None:
    columns, as_list = decode({"features": [5.1, 3.5, 1.4, 0.2], "text": "hi"}, IRIS)
    assert as_list is False
    assert columns["features"].dtype == np.float32
    assert columns["features"].shape == (1, 4)
    np.testing.assert_array_equal(columns["features"], np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    assert columns["text"].dtype == object
    assert columns["text"].tolist() == ["hi"]


def test_a_list_of_rows_decodes_to_a_batch_in_order() -> None:
    rows = [{"features": [i, i, i, i], "text": f"row {i}"} for i in range(3)]
    columns, as_list = decode(rows, IRIS)
    assert as_list is True
    assert columns["features"].shape == (3, 4)
    assert columns["features"][:, 0].tolist() == [0.0, 1.0, 2.0]
    assert columns["text"].tolist() == ["row 0", "row 1", "row 2"]


def test_a_list_of_one_row_is_still_a_list() -> None:
    columns, as_list = decode([{"features": [1, 2, 3, 4], "text": "a"}], IRIS)
    assert as_list is True
    assert columns["features"].shape == (1, 4)


@pytest.mark.parametrize(
    ("datatype", "value", "dtype"),
    [
        ("BOOL", True, np.bool_),
        ("UINT8", 255, np.uint8),
        ("UINT16", 65535, np.uint16),
        ("UINT32", 2**32 - 1, np.uint32),
        ("UINT64", 2**64 - 1, np.uint64),
        ("INT8", -128, np.int8),
        ("INT16", -(2**15), np.int16),
        ("INT32", 2**31 - 1, np.int32),
        ("INT64", -(2**63), np.int64),
        ("FP16", 0.5, np.float16),
        ("FP32", 0.1, np.float32),
        ("FP64", 0.1, np.float64),
        ("BYTES", "héllo", np.object_),
    ],
)
def test_every_datatype_decodes_to_its_numpy_dtype(datatype: str, value: Any, dtype: type[Any]) -> None:
    spec = spec_of({"x": Tensor(datatype, shape=(2,))})
    columns, _ = decode([{"x": [value, value]}, {"x": [value, value]}], spec)
    assert columns["x"].dtype == np.dtype(dtype)
    assert columns["x"].shape == (2, 2)
    assert columns["x"][1, 1] == np.asarray(value, dtype=dtype)


def test_scalar_rows_make_a_one_dimensional_column() -> None:
    columns, _ = decode([{"x": 1}, {"x": 2}, {"x": 3}], spec_of({"x": Tensor("INT32")}))
    assert columns["x"].shape == (3,)
    assert columns["x"].tolist() == [1, 2, 3]


def test_binary_bytes_are_base64_decoded() -> None:
    spec = spec_of({"blob": Tensor("BYTES", binary=True)})
    columns, _ = decode({"blob": base64.b64encode(b"\x00\xffpng").decode()}, spec)
    assert columns["blob"].dtype == object
    assert columns["blob"].tolist() == [b"\x00\xffpng"]


def test_text_keeps_trailing_nul_characters() -> None:
    columns, _ = decode({"x": "a\x00"}, spec_of({"x": Tensor("BYTES")}))
    assert columns["x"].tolist() == ["a\x00"]


def test_nested_rows_decode_to_their_declared_shape() -> None:
    spec = spec_of({"image": Tensor("UINT8", shape=(2, 3))})
    columns, _ = decode([{"image": [[1, 2, 3], [4, 5, 6]]}] * 2, spec)
    assert columns["image"].shape == (2, 2, 3)
    assert columns["image"].dtype == np.uint8


def test_any_length_dimensions_take_any_length() -> None:
    spec = spec_of({"ids": Tensor("INT64", shape=(-1,))})
    assert decode({"ids": [1, 2, 3]}, spec)[0]["ids"].shape == (1, 3)
    assert decode({"ids": []}, spec)[0]["ids"].shape == (1, 0)


@pytest.mark.parametrize(
    ("shape", "value", "expected"),
    [((-1, 3), [], (1, 0, 3)), ((-1, -1), [], (1, 0, 0)), ((2, -1), [[], []], (1, 2, 0)), ((0,), [], (1, 0))],
)
def test_empty_dimensions_keep_the_declared_rank(shape: tuple[int, ...], value: Any, expected: tuple[int, ...]) -> None:
    for datatype in ("FP32", "INT8", "BOOL", "BYTES"):
        columns, _ = decode({"x": value}, spec_of({"x": Tensor(datatype, shape=shape)}))
        assert columns["x"].shape == expected


def test_integers_are_numbers() -> None:
    columns, _ = decode({"features": [1, 2, 3.5, 4], "text": ""}, IRIS)
    assert columns["features"].tolist() == [[1.0, 2.0, 3.5, 4.0]]


def test_whole_floats_are_integers() -> None:
    columns, _ = decode({"x": [1.0, -2.0]}, spec_of({"x": Tensor("INT16", shape=(2,))}))
    assert columns["x"].dtype == np.int16
    assert columns["x"].tolist() == [[1, -2]]


def test_the_largest_fp16_after_rounding_is_accepted() -> None:
    columns, _ = decode({"x": 65519}, spec_of({"x": Tensor("FP16")}))
    assert columns["x"].tolist() == [65504.0]


def test_uint64_beyond_int64_mixed_with_small_values() -> None:
    columns, _ = decode({"x": [0, 2**64 - 1]}, spec_of({"x": Tensor("UINT64", shape=(2,))}))
    assert columns["x"].tolist() == [[0, 2**64 - 1]]


# -- decoding: the document ----------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b"[1,2,]", b"NaN", b'{"features": [1, 2'])
def test_malformed_json_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_rows(body, IRIS)
    assert type(info.value) is InvalidRequest
    assert info.value.status_code == 400
    assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize(("body", "shown"), [("abc", '"abc"'), (3, "3"), (None, "null"), (True, "true")])
def test_a_body_that_is_neither_object_nor_list_is_refused(body: Any, shown: str) -> None:
    exc = violation(body, IRIS)
    assert exc.path == ""
    assert str(exc) == f"expected a JSON object of inputs (features, text) or a list of them, got {shown}"


def test_an_empty_list_is_refused() -> None:
    exc = violation([], IRIS)
    assert exc.path == ""
    assert "expected at least one row, got an empty list" in str(exc)


def test_a_row_that_is_not_an_object_is_refused_at_its_index() -> None:
    row = {"features": [1, 2, 3, 4], "text": "a"}
    exc = violation([row, row, [1, 2]], IRIS)
    assert exc.path == "[2]"
    assert str(exc) == "[2]: expected a JSON object of inputs (features, text), got [1,2]"


def test_a_missing_field_is_required() -> None:
    assert str(violation({"features": [1, 2, 3, 4]}, IRIS)) == "text: field required"
    exc = violation([{"features": [1, 2, 3, 4], "text": "a"}, {"features": [1, 2, 3, 4]}], IRIS)
    assert exc.path == "[1].text"
    assert str(exc) == "[1].text: field required"


def test_an_unknown_field_lists_the_declared_inputs() -> None:
    exc = violation({"features": [1, 2, 3, 4], "text": "a", "extra": 1}, IRIS)
    assert exc.path == "extra"
    assert str(exc) == "extra: unknown field; model 'iris' takes the inputs features, text"
    assert violation([{"features": [1, 2, 3, 4], "text": "a", "x": 1}], IRIS).path == "[0].x"


# -- decoding: values ----------------------------------------------------------------------------


def test_a_wrong_element_is_named_by_its_path() -> None:
    exc = violation({"features": [1, 2, "abc", 4], "text": "a"}, IRIS)
    assert exc.path == "features[2]"
    assert str(exc) == 'features[2]: expected a number, got "abc"'


def test_a_wrong_length_gives_both_lengths() -> None:
    assert str(violation({"features": [1, 2, 3], "text": "a"}, IRIS)) == "features: expected 4 values, got 3"


def test_nested_paths_include_the_row_index() -> None:
    spec = spec_of({"features": Tensor("FP32", shape=(2, 3))})
    good = {"features": [[1, 2, 3], [4, 5, 6]]}
    exc = violation([good, {"features": [[1, 2, None], [4, 5, 6]]}], spec)
    assert str(exc) == "[1].features[0][2]: expected a number, got null"


@pytest.mark.parametrize(
    ("tensor", "value", "message"),
    [
        (Tensor("FP32", shape=(4,)), 1.0, "x: expected a list of 4 values, got 1.0"),
        (Tensor("FP32", shape=(-1,)), "abc", 'x: expected a list, got "abc"'),
        (Tensor("FP32"), [1.0], "x: expected a number, got [1.0]"),
        (Tensor("FP32", shape=(2,)), [1.0, True], "x[1]: expected a number, got true"),
        (Tensor("FP64", shape=(2,)), [{"a": 1}, 2], 'x[0]: expected a number, got {"a":1}'),
        (Tensor("INT32", shape=(2,)), [1, False], "x[1]: expected an integer, got false"),
        (Tensor("INT32", shape=(2,)), [1, 1.5], "x[1]: expected an integer, got 1.5"),
        (Tensor("INT32"), "7", 'x: expected an integer, got "7"'),
        (Tensor("BOOL", shape=(2,)), [True, 1], "x[1]: expected true or false, got 1"),
        (Tensor("BOOL"), "true", 'x: expected true or false, got "true"'),
        (Tensor("BYTES", shape=(2,)), ["a", 12], "x[1]: expected a string, got 12"),
        (Tensor("BYTES"), ["a"], 'x: expected a string, got ["a"]'),
        (Tensor("BYTES", binary=True), 12, "x: expected a base64 string, got 12"),
        (Tensor("FP32"), 1e39, "x: 1e+39 is out of range for FP32 (at most 3.40282e+38 in magnitude)"),
        (Tensor("FP16"), -70000, "x: -70000 is out of range for FP16 (at most 65504 in magnitude)"),
    ],
)
def test_wrong_types_and_shapes_are_precise(tensor: Tensor, value: Any, message: str) -> None:
    exc = violation({"x": value}, spec_of({"x": tensor}))
    assert str(exc) == message


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("UINT8", 256),
        ("UINT8", -1),
        ("UINT16", 65536),
        ("UINT32", 2**32),
        ("UINT64", -1),
        ("INT8", 128),
        ("INT8", -129),
        ("INT16", 2**15),
        ("INT32", -(2**31) - 1),
        ("INT64", 2**63),
    ],
)
def test_integers_out_of_range_name_the_range(datatype: str, value: int) -> None:
    exc = violation([{"x": [0, 0]}, {"x": [0, value]}], spec_of({"x": Tensor(datatype, shape=(2,))}))
    assert str(exc).startswith(f"[1].x[1]: {value} is out of range for {datatype} (")


def test_integers_beyond_64_bits_are_out_of_range() -> None:
    # orjson reads an integer literal beyond 64 bits as a float.
    with pytest.raises(SchemaViolation) as info:
        decode_rows(b'{"x": 18446744073709551616}', spec_of({"x": Tensor("UINT64")}))
    assert str(info.value) == "x: 1.8446744073709552e+19 is out of range for UINT64 (0 to 18446744073709551615)"


def test_inexact_floats_are_not_integers() -> None:
    exc = violation({"x": 1e18}, spec_of({"x": Tensor("INT64")}))
    assert str(exc) == "x: expected an integer, got 1e+18; write large integers without a decimal point or exponent"


def test_invalid_base64_is_refused() -> None:
    exc = violation({"x": ["aGk=", "not base64!"]}, spec_of({"x": Tensor("BYTES", shape=(2,), binary=True)}))
    assert exc.path == "x[1]"
    assert str(exc).startswith("x[1]: invalid base64 (")


def test_rows_of_a_batch_must_share_their_shape() -> None:
    spec = spec_of({"ids": Tensor("INT64", shape=(-1,))})
    exc = violation([{"ids": [1, 2]}, {"ids": [1, 2, 3]}], spec)
    assert exc.path == "[1].ids"
    assert "all rows of a batch must share one shape per input" in str(exc)
    assert "[0].ids has shape [2] and this row [3]" in str(exc)


def test_nested_lists_must_be_rectangular() -> None:
    exc = violation({"x": [["a", "b"], ["c"]]}, spec_of({"x": Tensor("BYTES", shape=(-1, -1))}))
    assert str(exc) == "x[1]: has shape [1] but x[0] has [2]; nested lists must be rectangular"


def test_ragged_numbers_are_refused_with_the_short_list() -> None:
    exc = violation({"x": [[1, 2], [3]]}, spec_of({"x": Tensor("FP32", shape=(2, 2))}))
    assert str(exc) == "x[1]: expected 2 values, got 1"


def test_the_error_is_in_the_input_that_has_it() -> None:
    exc = violation([{"features": [1, 2, 3, 4], "text": 5}], IRIS)
    assert str(exc) == "[0].text: expected a string, got 5"


def test_long_values_are_shortened_in_messages() -> None:
    exc = violation({"x": "y" * 100}, spec_of({"x": Tensor("INT8")}))
    assert str(exc) == f'x: expected an integer, got "{"y" * 36}...'


def test_very_deep_nesting_is_a_422() -> None:
    body = b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}"
    with pytest.raises(SchemaViolation) as info:
        decode_rows(body, spec_of({"x": Tensor("FP32")}))
    assert str(info.value) == "x: expected a number, got a deeply nested list"


# -- encoding ------------------------------------------------------------------------------------


def encoded(spec: ModelSpec, outputs: dict[str, npt.NDArray[Any]], as_list: bool) -> Any:
    return orjson.loads(encode_rows(spec, outputs, as_list))


def iris_outputs(rows: int) -> dict[str, npt.NDArray[Any]]:
    return {
        "label": np.array(["setosa"] * rows, dtype=object),
        "probabilities": np.tile(np.array([0.1, 0.2, 0.7], dtype=np.float32), (rows, 1)),
    }


def test_one_row_encodes_to_one_object() -> None:
    body = encode_rows(IRIS, iris_outputs(1), as_list=False)
    assert body == b'{"label":"setosa","probabilities":[0.1,0.2,0.7]}'


def test_a_batch_encodes_to_a_list_of_objects() -> None:
    assert encoded(IRIS, iris_outputs(2), as_list=True) == [
        {"label": "setosa", "probabilities": [0.1, 0.2, 0.7]},
        {"label": "setosa", "probabilities": [0.1, 0.2, 0.7]},
    ]


@pytest.mark.parametrize(
    ("datatype", "values", "written"),
    [
        ("BOOL", [True, False], b"[true,false]"),
        ("UINT8", [0, 255], b"[0,255]"),
        ("UINT16", [0, 65535], b"[0,65535]"),
        ("UINT32", [0, 2**32 - 1], b"[0,4294967295]"),
        ("UINT64", [0, 2**64 - 1], b"[0,18446744073709551615]"),
        ("INT8", [-128, 127], b"[-128,127]"),
        ("INT16", [-1, 1], b"[-1,1]"),
        ("INT32", [-1, 1], b"[-1,1]"),
        ("INT64", [-(2**63), 1], b"[-9223372036854775808,1]"),
        ("FP16", [0.1, 65504], b"[0.1,65500.0]"),
        ("FP32", [0.1, 1e-8], b"[0.1,1e-8]"),
        ("FP64", [0.1, 1e300], b"[0.1,1e+300]"),
        ("BYTES", ["a", "é"], '["a","é"]'.encode()),
    ],
)
def test_every_datatype_encodes_in_its_shortest_form(datatype: str, values: list[Any], written: bytes) -> None:
    tensor = Tensor(datatype, shape=(2,))
    spec = spec_of({"x": Tensor("FP32")}, {"y": tensor})
    column = np.array([values], dtype=tensor.dtype.numpy_dtype)
    assert encode_rows(spec, {"y": column}, as_list=False) == b'{"y":' + written + b"}"


def test_scalar_outputs_encode_as_plain_values() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("FP32"), "ok": Tensor("BOOL")})
    outputs = {"y": np.array([0.1, 0.2], dtype=np.float32), "ok": np.array([True, False])}
    assert encode_rows(spec, outputs, as_list=True) == b'[{"y":0.1,"ok":true},{"y":0.2,"ok":false}]'


def test_binary_outputs_are_base64() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("BYTES", binary=True)})
    outputs = {"y": np.array([b"\x00\xff", "text"], dtype=object)}
    assert encoded(spec, outputs, as_list=True) == [{"y": "AP8="}, {"y": "dGV4dA=="}]


def test_utf8_bytes_in_a_text_output_are_decoded() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("BYTES")})
    assert encoded(spec, {"y": np.array(["é".encode()], dtype=object)}, as_list=False) == {"y": "é"}


@pytest.mark.parametrize(
    ("tensor", "value", "problem"),
    [
        (Tensor("BYTES"), b"\xff", "bytes that are not UTF-8"),
        (Tensor("BYTES"), 3, "a value of type int"),
        (Tensor("BYTES", binary=True), 3.5, "a value of type float"),
    ],
)
def test_a_bad_text_output_is_a_model_error(tensor: Tensor, value: Any, problem: str) -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": tensor})
    column = np.empty(1, dtype=object)
    column[0] = value
    with pytest.raises(ModelError) as info:
        encode_rows(spec, {"y": column}, as_list=False)
    assert info.value.status_code == 500
    assert str(info.value).startswith(f"model 'probe' returned {problem}")
    assert "BYTES output 'y'" in str(info.value)


def test_nested_and_non_contiguous_outputs_encode() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("INT32", shape=(2, 2))})
    column = np.arange(8, dtype=np.int32).reshape(2, 2, 2).transpose(0, 2, 1)
    assert encoded(spec, {"y": column}, as_list=True) == [{"y": [[0, 2], [1, 3]]}, {"y": [[4, 6], [5, 7]]}]


def test_nan_and_infinity_become_null() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("FP32", shape=(2,))})
    assert encoded(spec, {"y": np.array([[np.nan, np.inf]], dtype=np.float32)}, as_list=False) == {"y": [None, None]}


def test_only_declared_outputs_are_written() -> None:
    outputs = {**iris_outputs(1), "debug": np.array([1])}
    assert set(encoded(IRIS, outputs, as_list=False)) == {"label", "probabilities"}


def test_a_decoded_body_encodes_back_to_itself() -> None:
    spec = spec_of({"x": Tensor("FP32", shape=(3,))}, {"x": Tensor("FP32", shape=(3,))})
    body = b'[{"x":[0.1,0.2,0.3]},{"x":[1.5,-2.0,3.0]}]'
    columns, as_list = decode_rows(body, spec)
    assert encode_rows(spec, columns, as_list) == body


# -- the fast path takes exactly what the exact path takes ---------------------------------------

# Enough values to make a body longer than the threshold of may_hold_booleans: the fast path then
# packs the values without looking at their types, if the text holds no true or false.
PADDING = [0.25] * 300


def test_a_long_text_is_searched_for_booleans() -> None:
    assert may_hold_booleans(orjson.dumps({"x": PADDING})) is False
    assert may_hold_booleans(orjson.dumps({"x": [*PADDING, True]})) is True
    assert may_hold_booleans(orjson.dumps({"x": [*PADDING, False]})) is True
    assert may_hold_booleans(orjson.dumps({"x": PADDING, "y": "a true story"})) is True
    assert may_hold_booleans(b'{"x": [1.0]}') is True  # short: its types are looked at instead
    assert may_hold_booleans(memoryview(orjson.dumps({"x": PADDING}))) is True
    assert may_hold_booleans(orjson.dumps({"u" * 20: PADDING})) is True  # too many u to look at them all


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "expected a number, got true"),
        (False, "expected a number, got false"),
        (None, "expected a number, got null"),
        ("1", 'expected a number, got "1"'),
        ([1.0], "expected a number, got [1.0]"),
        ({"a": 1}, 'expected a number, got {"a":1}'),
        (1e39, "1e+39 is out of range for FP32 (at most 3.40282e+38 in magnitude)"),
    ],
)
@pytest.mark.parametrize("padding", [[], PADDING], ids=["short", "long"])
def test_a_bad_number_is_found_in_short_and_long_bodies(value: Any, problem: str, padding: list[float]) -> None:
    spec = spec_of({"x": Tensor("FP32", shape=(-1,))})
    exc = violation({"x": [*padding, value, 0.5]}, spec)
    assert str(exc) == f"x[{len(padding)}]: {problem}"
    exc = violation([{"x": [*padding, 0.5]}, {"x": [*padding, value]}], spec)
    assert str(exc) == f"[1].x[{len(padding)}]: {problem}"


@pytest.mark.parametrize("padding", [[], PADDING], ids=["short", "long"])
def test_a_boolean_is_refused_when_other_text_says_true(padding: list[float]) -> None:
    spec = spec_of({"x": Tensor("FP32", shape=(-1,)), "note": Tensor("BYTES")})
    exc = violation({"x": [*padding, True], "note": "true"}, spec)
    assert str(exc) == f"x[{len(padding)}]: expected a number, got true"
    columns, _ = decode({"x": [*padding, 1.0], "note": "true"}, spec)
    assert columns["x"].tolist() == [[*padding, 1.0]]


@pytest.mark.parametrize(
    ("datatype", "values", "problem"),
    [
        ("INT8", [0, 128], "128 is out of range for INT8 (-128 to 127)"),
        ("UINT64", [0, -1], "-1 is out of range for UINT64 (0 to 18446744073709551615)"),
        ("INT32", [0, 1.5], "expected an integer, got 1.5"),
        ("FP16", [0.5, 65520.0], "65520.0 is out of range for FP16 (at most 65504 in magnitude)"),
        ("BOOL", [True, 1], "expected true or false, got 1"),
    ],
)
def test_long_bodies_of_every_kind_are_checked(datatype: str, values: list[Any], problem: str) -> None:
    padding = [values[0]] * 600
    exc = violation({"x": [*padding, *values]}, spec_of({"x": Tensor(datatype, shape=(-1,))}))
    assert str(exc) == f"x[601]: {problem}"


def test_numbers_are_not_booleans_in_long_bodies() -> None:
    exc = violation({"x": [1] * 600}, spec_of({"x": Tensor("BOOL", shape=(-1,))}))
    assert str(exc) == "x[0]: expected true or false, got 1"


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT16", -5), ("INT32", 1.0), ("UINT64", 2**64 - 1), ("FP16", 65519), ("FP64", 2**63 + 1), ("BOOL", False)],
)
def test_long_bodies_decode_as_short_ones(datatype: str, value: Any) -> None:
    spec = spec_of({"x": Tensor(datatype, shape=(-1,))})
    long, _ = decode({"x": [value] * 300}, spec)
    short, _ = decode({"x": [value]}, spec)
    assert long["x"].dtype == short["x"].dtype == spec.inputs["x"].dtype.numpy_dtype
    assert long["x"].tolist() == [short["x"].tolist()[0] * 300]


@pytest.mark.parametrize("padding", [[], [0] * 600], ids=["short", "long"])
def test_fp32_integers_are_rounded_once_as_numpy_casts_them(padding: list[int]) -> None:
    # Rounded through a double first (as struct and mixed lists do), these two would come out differently.
    big = [2**53 + 2**29 + 1, 2**54 + 2**30 + 2]
    once = np.asarray(big).astype(np.float32)
    assert (once != np.asarray(big, dtype=np.float64).astype(np.float32)).all()
    spec = spec_of({"x": Tensor("FP32", shape=(-1,))})
    columns, _ = decode({"x": [*padding, *big]}, spec)
    np.testing.assert_array_equal(columns["x"][0, len(padding) :], once)
    mixed = [0.5, *padding, *big]  # a list with a float is read as float64 first, then as FP32
    columns, _ = decode({"x": mixed}, spec)
    np.testing.assert_array_equal(columns["x"][0], np.asarray(mixed).astype(np.float32))


@pytest.mark.parametrize(
    ("tensor", "body", "message"),
    [
        (
            Tensor("FP32", shape=(4,)),
            [{"x": "abcd"}, {"x": [1, 2, 3, 4]}],
            '[0].x: expected a list of 4 values, got "abcd"',
        ),
        (Tensor("FP32", shape=(0,)), {"x": ""}, 'x: expected a list of 0 values, got ""'),
        (Tensor("FP32", shape=(0,)), [{"x": {}}, {"x": {}}], "[0].x: expected a list of 0 values, got {}"),
        (Tensor("BYTES", shape=(2,)), {"x": "ab"}, 'x: expected a list of 2 values, got "ab"'),
        (
            Tensor("FP32", shape=(2, 2)),
            [{"x": [[1, 2], [3, 4]]}, {"x": [[1, 2], "ab"]}],
            '[1].x[1]: expected a list of 2 values, got "ab"',
        ),
        (Tensor("INT8", shape=(-1, 2)), {"x": [[1, 2], [3]]}, "x[1]: expected 2 values, got 1"),
    ],
)
def test_only_lists_are_measured(tensor: Tensor, body: Any, message: str) -> None:
    assert str(violation(body, spec_of({"x": tensor}))) == message


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64", "BYTES"])
@pytest.mark.parametrize("pairs", [2, 300])
def test_batches_of_nested_rows_decode_in_row_major_order(datatype: str, pairs: int) -> None:
    def row(i: int) -> list[list[Any]]:
        values = [[i * 1000 + 2 * j, -(i * 1000 + 2 * j + 1)] for j in range(pairs)]
        return [[str(v) for v in pair] for pair in values] if datatype == "BYTES" else values

    tensor = Tensor(datatype, shape=(-1, 2))
    columns, _ = decode([{"x": row(i)} for i in range(3)], spec_of({"x": tensor}))
    assert columns["x"].dtype == tensor.dtype.numpy_dtype
    assert columns["x"].shape == (3, pairs, 2)
    assert columns["x"].tolist() == [row(i) for i in range(3)]
    assert columns["x"].flags.writeable
    assert columns["x"].flags.c_contiguous


def test_binary_text_in_batches_and_dimensions() -> None:
    spec = spec_of({"x": Tensor("BYTES", shape=(2,), binary=True)})
    encoded_rows = [{"x": [base64.b64encode(bytes([i, j])).decode() for j in range(2)]} for i in range(2)]
    columns, _ = decode(encoded_rows, spec)
    assert columns["x"].tolist() == [[b"\x00\x00", b"\x00\x01"], [b"\x01\x00", b"\x01\x01"]]


# -- struct's conversions are NumPy's -------------------------------------------------------------


def numpy_cast(values: list[Any], datatype: Datatype) -> npt.NDArray[Any] | None:
    """What np.array made of ``values`` before the fast path: None where it overflowed."""
    try:
        with np.errstate(over="raise"):
            return np.array(values, dtype=datatype.numpy_dtype)
    except (OverflowError, FloatingPointError):
        return None


def pack(values: list[Any], datatype: Datatype) -> npt.NDArray[Any] | None:
    return pack_numbers(values, (len(values),), datatype.numpy_dtype, STRUCT_CODES[datatype])


def assert_same_bits(got: npt.NDArray[Any] | None, expected: npt.NDArray[Any]) -> None:
    assert got is not None
    assert got.dtype == expected.dtype
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("datatype", [Datatype.FP16, Datatype.FP32, Datatype.FP64])
def test_floats_convert_and_overflow_as_in_numpy(datatype: Datatype) -> None:
    rng = np.random.default_rng(7)
    info = np.finfo(datatype.numpy_dtype)
    largest = float(info.max)
    beyond = min(1.1 * largest, float(np.finfo(np.float64).max))
    samples = [
        rng.uniform(-1, 1, 20_000) * beyond,
        rng.uniform(-1, 1, 20_000) * float(info.tiny),  # around the subnormals
        rng.standard_normal(20_000),
        np.nextafter(largest, [beyond, -beyond]),  # just past the largest: rounded down, or over
    ]
    edges = [0.0, -0.0, largest, -largest, 65519.99, 65520.0, 3.4028235677973366e38]
    values = [*np.concatenate(samples).tolist(), *edges]
    with np.errstate(over="ignore"):
        inf = np.isinf(np.array(values).astype(datatype.numpy_dtype))
    fitting = [v for v, out in zip(values, inf, strict=True) if not out]
    expected = numpy_cast(fitting, datatype)
    assert expected is not None
    assert_same_bits(pack(fitting, datatype), expected)
    overflowing = [v for v, out in zip(values, inf, strict=True) if out]
    assert (datatype is Datatype.FP64) == (not overflowing)
    assert all(pack([v], datatype) is None and numpy_cast([v], datatype) is None for v in overflowing)


def test_integers_convert_to_floats_as_in_numpy() -> None:
    rng = np.random.default_rng(8)
    ints = [int(v) for v in rng.integers(-(2**63), 2**63, 20_000)]
    ints += [int(v) for v in rng.integers(0, 2**64, 20_000, dtype=np.uint64)]
    ints += [2**53 + 2**29 + 1, 2**64 - 1, -(2**63)]
    for datatype in (Datatype.FP32, Datatype.FP64):
        for chunk in (ints[:20_000], ints[20_000:40_000], ints):
            expected = numpy_cast(chunk, datatype)
            assert expected is not None
            assert_same_bits(pack(chunk, datatype), expected)
    small = list(range(-70_000, 70_001))  # every integer FP16 can hold, and the first that overflow
    fitting = [v for v in small if abs(v) < 65520]
    expected = numpy_cast(fitting, Datatype.FP16)
    assert expected is not None
    assert_same_bits(pack(fitting, Datatype.FP16), expected)
    assert all(pack([v], Datatype.FP16) is None for v in (65520, -65520, 70_000))


@pytest.mark.parametrize("datatype", list(INTEGER_RANGES))
def test_integers_are_packed_within_their_range_only(datatype: Datatype) -> None:
    low, high = INTEGER_RANGES[datatype]
    expected = numpy_cast([low, high, 0, 1], datatype)
    assert expected is not None
    assert_same_bits(pack([low, high, 0, 1], datatype), expected)
    assert pack([0, low - 1], datatype) is None
    assert pack([high + 1, 0], datatype) is None
    assert pack([1.0], datatype) is None  # an integral float is left to the exact path


def test_pack_refuses_what_is_no_number() -> None:
    for value in (None, "1", [1.0], {"a": 1}):
        assert pack([1.0, value], Datatype.FP32) is None
        assert pack([1, value], Datatype.INT64) is None
    # Booleans are read as numbers: the callers rule them out first.
    assert pack([True], Datatype.FP32) is not None


# -- the plan kept per model ----------------------------------------------------------------------


def test_each_spec_has_its_own_plan() -> None:
    body = {"x": [1, 2]}
    assert decode(body, spec_of({"x": Tensor("INT8", shape=(2,))}))[0]["x"].dtype == np.int8
    assert decode(body, spec_of({"x": Tensor("FP64", shape=(2,))}))[0]["x"].dtype == np.float64


def test_a_plan_does_not_keep_its_model_alive() -> None:
    spec = spec_of({"x": Tensor("FP32")}, {"y": Tensor("FP32")})
    decode({"x": 1.0}, spec)
    encode_rows(spec, {"y": np.array([1.0], dtype=np.float32)}, as_list=False)
    dead = weakref.ref(spec)
    del spec
    gc.collect()
    assert dead() is None


def test_per_spec_builds_once_per_living_spec() -> None:
    built: list[str] = []

    @per_spec
    def label(spec: ModelSpec) -> str:
        built.append(spec.label)
        return spec.label

    assert label(IRIS) == label(IRIS) == "iris"
    assert built == ["iris"]
    for _ in range(3):  # new specs (some at the address of a dead one) are built for each
        assert label(spec_of({"x": Tensor("FP32")})) == "probe"
    assert built == ["iris", "probe", "probe", "probe"]


FAST_BODIES = [
    ({"x": Tensor("FP32", shape=(4,))}, {"x": [1.0, 2.0, 3.0, 4.0]}),
    ({"x": Tensor("FP32", shape=(-1,))}, {"x": PADDING}),
    ({"x": Tensor("FP32", shape=(-1,))}, {"x": [1, 2, 3]}),
    ({"x": Tensor("FP32", shape=(-1,))}, {"x": [1] * 300}),
    ({"x": Tensor("FP16", shape=(2,))}, [{"x": [1, 0.5]}, {"x": [-2, 65504]}]),
    ({"x": Tensor("INT64", shape=(-1,))}, {"x": list(range(400))}),
    ({"x": Tensor("UINT8", shape=(2, 2))}, [{"x": [[1, 2], [3, 4]]}] * 3),
    ({"x": Tensor("BOOL", shape=(2,))}, {"x": [True, False]}),
    ({"x": Tensor("INT32")}, [{"x": 1}, {"x": 2}]),
    ({"x": Tensor("BYTES", shape=(-1,))}, {"x": ["a", "b\x00"]}),
    ({"x": Tensor("BYTES", binary=True)}, {"x": "AP8="}),
    ({"x": Tensor("FP32", shape=(-1,)), "note": Tensor("BYTES")}, {"x": PADDING, "note": "true"}),
]


@pytest.mark.parametrize(("inputs", "body"), FAST_BODIES)
def test_valid_bodies_take_the_fast_path(monkeypatch: pytest.MonkeyPatch, inputs: dict[str, Tensor], body: Any) -> None:
    spec = spec_of(inputs)
    rows = body if isinstance(body, list) else [body]
    exact = {}
    for name, tensor in inputs.items():
        values = [row[name] for row in rows]
        row_shape = jsonapi._explain(name, tensor, values, isinstance(body, list))
        exact[name] = jsonapi._exact_column(tensor, values, row_shape)

    def walk(*args: Any) -> None:
        raise AssertionError("the exact path walked a valid body")

    monkeypatch.setattr(jsonapi, "_explain", walk)
    columns, _ = decode(body, spec)
    for name, column in columns.items():
        assert column.dtype == exact[name].dtype
        assert column.shape == exact[name].shape
        assert column.tolist() == exact[name].tolist()
