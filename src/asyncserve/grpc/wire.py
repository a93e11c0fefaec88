"""Protocol Buffers' wire format, for the one message asyncserve writes by hand: a raw ModelInferResponse.

Building the response through protobuf's message classes costs a unary call more CPU than all of its HTTP/2
framing: a message object, an output tensor added to its list, each field set through the class, then the
serialization. The common answer (raw outputs, no parameters) is a few fields whose bytes are mostly the
same from one call to the next, so they are written once per model and shape and joined per call. The
result is the encoding protobuf reads (https://protobuf.dev/programming-guides/encoding/); the tests parse
it with protobuf and compare it with the message built the usual way.
"""

from __future__ import annotations

LENGTH_DELIMITED = 2
"""The wire type of strings, bytes, embedded messages and packed repeated numbers."""


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a base-128 varint: seven bits a byte, least significant first."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field_number: int) -> bytes:
    """The key of a length-delimited field."""
    return varint(field_number << 3 | LENGTH_DELIMITED)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A length-delimited field: its key, the payload's length, the payload."""
    return length_prefix(field_number, len(payload)) + payload


def length_prefix(field_number: int, size: int) -> bytes:
    """What comes before a length-delimited field's ``size`` bytes: its key and the length (a large payload
    joins the message as it is, not copied into its field first)."""
    return tag(field_number) + varint(size)


def packed_varints(field_number: int, values: list[int]) -> bytes:
    """A packed repeated field of varints (``repeated int64`` in proto3); nothing when ``values`` is empty, as
    protobuf writes it."""
    if not values:
        return b""
    return length_delimited(field_number, b"".join(varint(value) for value in values))


def text(field_number: int, value: str) -> bytes:
    """A proto3 string field; nothing when ``value`` is empty (its default), as protobuf writes it."""
    return length_delimited(field_number, value.encode()) if value else b""
