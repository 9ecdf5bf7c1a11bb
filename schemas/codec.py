"""Avro encoding of Sluice records in the Confluent wire format.

A framed record is the magic byte 0, the writer schema's id as a 4-byte big-endian
integer, then the Avro binary body. Schemas are parsed once per codec; the writer's
own type errors are the validation (a separate validate pass doubles the cost).
"""

from __future__ import annotations

import io
import json
import struct
from functools import cache
from importlib import resources
from typing import Any

import fastavro

from core.errors import SchemaError
from schemas.flat_avro import compile_decoder, compile_encoder

MAGIC = 0
_HEADER = struct.Struct(">bI")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON form of a schema shipped in this package, e.g. ``load_schema("event")``."""
    text = resources.files("schemas").joinpath(f"{name}.avsc").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


class AvroCodec:
    """Encodes and decodes one record type, framed with its registered schema id."""

    def __init__(self, schema: dict[str, Any], schema_id: int, logical_types: bool = True) -> None:
        self.schema_json = schema
        self.schema_id = schema_id
        # Without logical types, timestamps decode as the epoch-millisecond ints they are on
        # the wire: what a warehouse insert wants, without building datetimes first.
        self._parsed = fastavro.parse_schema(schema if logical_types else _plain(schema))
        self._header = _HEADER.pack(MAGIC, schema_id)
        self._fast = compile_encoder(schema)
        self._fast_decode = None if logical_types else compile_decoder(schema)
        self._writers: dict[int, Any] = {schema_id: self._parsed}

    @property
    def header(self) -> bytes:
        """The 5-byte wire-format prefix of every record this codec encodes."""
        return self._header

    def add_writer_schema(self, schema_id: int, schema: dict[str, Any]) -> None:
        """Teach the codec an older writer schema so records framed with it still decode."""
        self._writers[schema_id] = fastavro.parse_schema(schema)

    def encode(self, record: dict[str, Any]) -> bytes:
        """Frame and encode one record; raises SchemaError when it does not fit the schema."""
        if self._fast is not None:
            return self._header + self._fast(record)
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self._parsed, record)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SchemaError(f"record does not match schema: {exc}") from exc
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode one framed record; raises SchemaError for a bad frame or body."""
        if len(data) < _HEADER.size:
            raise SchemaError(f"record too short for the wire format ({len(data)} bytes)")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SchemaError(f"unknown magic byte {magic}")
        if schema_id == self.schema_id and self._fast_decode is not None:
            return self._fast_decode(data, _HEADER.size)
        writer = self._writers.get(schema_id)
        if writer is None:
            raise SchemaError(f"unknown schema id {schema_id}")
        try:
            record = fastavro.schemaless_reader(
                io.BytesIO(data[_HEADER.size :]), writer, self._parsed
            )
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
            raise SchemaError(f"record body does not decode: {exc}") from exc
        if not isinstance(record, dict):
            raise SchemaError("record body is not an Avro record")
        return record


# Ids of the schemas the built-in registry starts with; the registry keeps them stable.
EVENT_SCHEMA_ID = 1
JOB_SCHEMA_ID = 2


def event_codec(logical_types: bool = True) -> AvroCodec:
    """The codec of the event envelope on ingest and destination topics."""
    return AvroCodec(load_schema("event"), EVENT_SCHEMA_ID, logical_types)


def job_codec(logical_types: bool = True) -> AvroCodec:
    """The codec of a job submission on a queue's priority topics."""
    return AvroCodec(load_schema("job"), JOB_SCHEMA_ID, logical_types)


def _plain(schema: Any) -> Any:
    """`schema` without `logicalType` annotations (the binary encoding is the same)."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema
