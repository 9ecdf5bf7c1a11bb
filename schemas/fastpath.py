"""A compiled Avro encoder for flat records, byte-identical to fastavro and ~4x faster.

fastavro resolves every union branch per value; for the flat envelope records on the
ingest path (strings, longs, `["null", T]` unions) a closure per field does the same
work with far fewer checks. Schemas with nested types fall back to fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

from schemas.errors import SchemaError

Encoder = Callable[[Any, list[bytes]], None]
_SMALL = [bytes((i,)) for i in range(128)]
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_EPOCH_MS = 1000


_BIG: dict[int, bytes] = {}


def _varint(n: int) -> bytes:
    """Zig-zag varint of a signed 64-bit integer, as Avro encodes int and long."""
    z = (n << 1) ^ (n >> 63)
    if z < 128:
        return _SMALL[z]
    # Timestamps repeat within a request (receivedAt, sentAt): remember recent encodings.
    cached = _BIG.get(z)
    if cached is not None:
        return cached
    out = bytearray()
    key = z
    while z >= 128:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    if len(_BIG) > 4096:
        _BIG.clear()
    encoded = _BIG[key] = bytes(out)
    return encoded


def _kind(v: Any) -> str:
    return "nothing (the field is missing)" if v is _MISSING else type(v).__name__


def _string(v: Any, out: list[bytes]) -> None:
    if type(v) is not str:
        raise SchemaError(f"expected a string, got {_kind(v)}")
    data = v.encode()
    size = len(data)
    # A length is never negative: its zig-zag form is 2 * size.
    out.append(_SMALL[size << 1] if size < 64 else _varint(size))
    out.append(data)


def _bytes(v: Any, out: list[bytes]) -> None:
    if not isinstance(v, bytes | bytearray):
        raise SchemaError(f"expected bytes, got {type(v).__name__}")
    out.append(_varint(len(v)))
    out.append(bytes(v))


def _long(v: Any, out: list[bytes]) -> None:
    if type(v) is not int:
        raise SchemaError(f"expected an integer, got {_kind(v)}")
    out.append(_varint(v))


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


def _primitive(schema: Any) -> Encoder | None:
    if isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-millis" and schema.get("type") == "long":
            return _timestamp_ms
        if "logicalType" in schema:
            return None
        schema = schema.get("type")
    return (
        {
            "string": _string,
            "bytes": _bytes,
            "long": _long,
            "int": _long,
            "boolean": _boolean,
            "double": _double,
            "float": _float,
            "null": _null,
        }.get(schema)
        if isinstance(schema, str)
        else None
    )


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
