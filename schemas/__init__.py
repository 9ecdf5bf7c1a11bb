"""Avro schemas, the codec in Confluent wire format, and the shared error model."""

from schemas.codec import AvroCodec, event_codec, load_schema
from schemas.errors import DestinationUnavailable, SchemaError, SluiceError

__all__ = [
    "AvroCodec",
    "DestinationUnavailable",
    "SchemaError",
    "SluiceError",
    "event_codec",
    "load_schema",
]
