"""Compiled Avro encoders and decoders for flat records, byte-identical to fastavro.

fastavro resolves every union branch per value; for the flat envelope records on the
ingest path (strings, longs, `["null", T]` unions) a closure per field does the same
work with far fewer checks (BENCHMARKS.md has the figures). Schemas with nested types
fall back to fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from core.errors import SchemaError

Encoder = Callable[[Any, list[bytes]], None]
_SMALL: Final = [bytes((i,)) for i in range(128)]
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_EPOCH_MS = 1000


def _leb128(z: int) -> bytes:
    out = bytearray()
    while z >= 128:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# Zig-zagged values below 2**14 take at most two bytes: all of them, precomputed. Larger
# ones (epoch-millisecond timestamps) are their low 14 bits as two continuation bytes
# followed by the encoding of the rest, which changes only every few seconds: cached.
_LOW: Final = 1 << 14
_SHORT: Final = [_leb128(z) for z in range(_LOW)]
_LOW_PAIRS: Final = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(_LOW)]
_HIGH: Final[dict[int, bytes]] = {}


def zigzag(n: int) -> bytes:
    """Zig-zag varint of a signed 64-bit integer, as Avro encodes int and long."""
    z = (n << 1) ^ (n >> 63)
    if z < _LOW:
        return _SHORT[z]
    high = z >> 14
    rest = _HIGH.get(high)
    if rest is None:
        if len(_HIGH) > 4096:
            _HIGH.clear()
        rest = _HIGH[high] = _leb128(high)
    return _LOW_PAIRS[z & 0x3FFF] + rest


def _kind(v: Any) -> str:
    return "nothing (the field is missing)" if v is _MISSING else type(v).__name__


def _string(v: Any, out: list[bytes]) -> None:
    if type(v) is not str:
        raise SchemaError(f"expected a string, got {_kind(v)}")
    data = v.encode()
    size = len(data)
    # A length is never negative: its zig-zag form is 2 * size.
    out.append(_SHORT[size << 1] if size < 8192 else zigzag(size))
    out.append(data)


def _bytes(v: Any, out: list[bytes]) -> None:
    if not isinstance(v, bytes | bytearray):
        raise SchemaError(f"expected bytes, got {type(v).__name__}")
    out.append(zigzag(len(v)))
    out.append(bytes(v))


def _long(v: Any, out: list[bytes]) -> None:
    if type(v) is not int:
        raise SchemaError(f"expected an integer, got {_kind(v)}")
    out.append(zigzag(v))


def _timestamp_ms(v: Any, out: list[bytes]) -> None:
    if isinstance(v, datetime):
        v = int(v.timestamp() * _EPOCH_MS)
    _long(v, out)


def _boolean(v: Any, out: list[bytes]) -> None:
    if type(v) is not bool:
        raise SchemaError(f"expected a boolean, got {type(v).__name__}")
    out.append(b"\x01" if v else b"\x00")


def _double(v: Any, out: list[bytes]) -> None:
    if type(v) not in (float, int):
        raise SchemaError(f"expected a number, got {type(v).__name__}")
    out.append(_DOUBLE(v))


def _float(v: Any, out: list[bytes]) -> None:
    if type(v) not in (float, int):
        raise SchemaError(f"expected a number, got {type(v).__name__}")
    out.append(_FLOAT(v))


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING: Any = _Missing()


def _null(v: Any, _out: list[bytes]) -> None:
    if v is not None:
        raise SchemaError(f"expected null, got {type(v).__name__}")


_ENCODERS: Final[dict[str, Encoder]] = {
    "string": _string,
    "bytes": _bytes,
    "long": _long,
    "int": _long,
    "boolean": _boolean,
    "double": _double,
    "float": _float,
    "null": _null,
}


def _primitive(schema: Any) -> Encoder | None:
    if isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-millis" and schema.get("type") == "long":
            return _timestamp_ms
        if "logicalType" in schema:
            return None
        schema = schema.get("type")
    return _ENCODERS.get(schema) if isinstance(schema, str) else None


def _field(schema: Any) -> Encoder | None:
    if isinstance(schema, list):
        # Only the common optional form: ["null", T].
        if len(schema) == 2 and schema[0] == "null":
            inner = _primitive(schema[1])
            if inner is None:
                return None
            branch = _SMALL[2]  # zig-zag of index 1

            def optional(v: Any, out: list[bytes], inner: Encoder = inner) -> None:
                if v is None:
                    out.append(b"\x00")
                else:
                    out.append(branch)
                    inner(v, out)

            return optional
        return None
    return _primitive(schema)


def compile_encoder(schema: dict[str, Any]) -> Callable[[dict[str, Any]], bytes] | None:
    """An encoder for a flat record schema, or None when the schema needs fastavro."""
    if schema.get("type") != "record":
        return None
    fields: list[tuple[str, Encoder, Any]] = []
    for f in schema["fields"]:
        enc = _field(f["type"])
        if enc is None:
            return None
        fields.append((f["name"], enc, f.get("default", _MISSING)))

    def encode(record: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        get = record.get
        name = ""
        try:
            for name, enc, default in fields:
                enc(get(name, default), out)
        except SchemaError as exc:
            raise SchemaError(f"field {name!r}: {exc}") from None
        return b"".join(out)

    return encode


Reader = Callable[[bytes, int], tuple[Any, int]]


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    pos += 1
    if b < 128:
        return (b >> 1) ^ -(b & 1), pos
    n = b & 0x7F
    shift = 7
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 128:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7


def _read_string(buf: bytes, pos: int) -> tuple[str, int]:
    size, pos = _read_long(buf, pos)
    end = pos + size
    if size < 0 or end > len(buf):
        raise SchemaError("string runs past the end of the record")
    return buf[pos:end].decode(), end


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _read_long(buf, pos)
    end = pos + size
    if size < 0 or end > len(buf):
        raise SchemaError("bytes run past the end of the record")
    return buf[pos:end], end


def _read_boolean(buf: bytes, pos: int) -> tuple[bool, int]:
    return buf[pos] == 1, pos + 1


def _read_double(buf: bytes, pos: int) -> tuple[float, int]:
    return struct.unpack_from("<d", buf, pos)[0], pos + 8


def _read_float(buf: bytes, pos: int) -> tuple[float, int]:
    return struct.unpack_from("<f", buf, pos)[0], pos + 4


def _read_null(_buf: bytes, pos: int) -> tuple[None, int]:
    return None, pos


_READERS: Final[dict[str, Reader]] = {
    "string": _read_string,
    "bytes": _read_bytes,
    "long": _read_long,
    "int": _read_long,
    "boolean": _read_boolean,
    "double": _read_double,
    "float": _read_float,
    "null": _read_null,
}


def _reader_of(schema: Any) -> Reader | None:
    if isinstance(schema, dict):
        # Logical types decode as their underlying type: epoch-millisecond ints.
        schema = schema.get("type")
    return _READERS.get(schema) if isinstance(schema, str) else None


def _field_reader(schema: Any) -> Reader | None:
    if isinstance(schema, list):
        if len(schema) == 2 and schema[0] == "null":
            inner = _reader_of(schema[1])
            if inner is None:
                return None

            def optional(buf: bytes, pos: int, inner: Reader = inner) -> tuple[Any, int]:
                branch = buf[pos]
                if branch == 0:
                    return None, pos + 1
                if branch != 2:
                    raise SchemaError(f"union branch {branch >> 1} out of range")
                return inner(buf, pos + 1)

            return optional
        return None
    return _reader_of(schema)


def compile_decoder(schema: dict[str, Any]) -> Callable[[bytes, int], dict[str, Any]] | None:
    """A decoder for a flat record schema (timestamps as ints), or None when it needs fastavro."""
    if schema.get("type") != "record":
        return None
    fields: list[tuple[str, Reader]] = []
    for f in schema["fields"]:
        reader = _field_reader(f["type"])
        if reader is None:
            return None
        fields.append((f["name"], reader))

    def decode(buf: bytes, pos: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        try:
            for name, reader in fields:
                record[name], pos = reader(buf, pos)
        except IndexError:
            raise SchemaError("record body is truncated") from None
        except UnicodeDecodeError:
            raise SchemaError("a string is not valid UTF-8") from None
        if pos != len(buf):
            raise SchemaError(f"{len(buf) - pos} bytes left after the record")
        return record

    return decode


# The event envelope (`event.avsc`) written in one call, for the gateway's ingest path:
# byte-identical to `compile_encoder(event schema)` on the same values, without a dict.
EVENT_LAYOUT = (
    ("event_id", "string"),
    ("source_id", "string"),
    ("type", "string"),
    ("event", "string?"),
    ("user_id", "string?"),
    ("anonymous_id", "string?"),
    ("timestamp", "long"),
    ("received_at", "long"),
    ("sent_at", "long?"),
    ("original_timestamp", "long?"),
    ("properties", "string"),
    ("traits", "string"),
    ("context", "string"),
    ("integrations", "string"),
    ("group_id", "string?"),
    ("previous_id", "string?"),
)


_ABSENT: Final = b"\x00"  # union branch 0: null
_PRESENT: Final = b"\x02"  # union branch 1


def _put(out: list[bytes], data: bytes) -> None:
    size = len(data)
    out.append(_SHORT[size << 1] if size < 8192 else zigzag(size))
    out.append(data)


def _put_text(out: list[bytes], text: str | None) -> None:
    if text is None:
        out.append(_ABSENT)
        return
    out.append(_PRESENT)
    _put(out, text.encode())


def _put_millis(out: list[bytes], value: int | None) -> None:
    if value is None:
        out.append(_ABSENT)
        return
    out.append(_PRESENT)
    out.append(zigzag(value))


def encode_event(
    header: bytes,
    event_id: str,
    source_id: bytes,
    etype: str,
    name: str | None,
    user_id: str | None,
    anonymous_id: str | None,
    timestamp: int,
    received_at: bytes,
    sent_at: int | None,
    original_timestamp: int | None,
    objects: list[bytes],
    group_id: str | None,
    previous_id: str | None,
) -> bytes:
    """`header` + the Avro body of one envelope (see `EVENT_LAYOUT`).

    `source_id` comes UTF-8 encoded and `received_at` as its Avro long (both are the
    same for a whole request); `objects` holds the JSON text of properties, traits,
    context and integrations.
    """
    out = [header]
    _put(out, event_id.encode())
    _put(out, source_id)
    _put(out, etype.encode())
    _put_text(out, name)
    _put_text(out, user_id)
    _put_text(out, anonymous_id)
    out.append(zigzag(timestamp))
    out.append(received_at)
    _put_millis(out, sent_at)
    _put_millis(out, original_timestamp)
    for data in objects:
        _put(out, data)
    _put_text(out, group_id)
    _put_text(out, previous_id)
    return b"".join(out)
