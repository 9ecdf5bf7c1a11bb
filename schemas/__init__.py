"""Avro schemas, the codec in Confluent wire format, and the schema registry."""

from schemas.codec import AvroCodec, event_codec, load_schema

__all__ = ["AvroCodec", "event_codec", "load_schema"]
