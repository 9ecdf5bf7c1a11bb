"""The typed keys of what the gateway app holds: settings, producer, metrics, sources, codecs,
the config follower, the queues' submit keys."""

from __future__ import annotations

from aiohttp import web

from core.config_topic import ConfigFollower
from core.producer import EventProducer
from core.settings import GatewaySettings
from core.topics import Topics
from gateway.auth import SourceTable, SubmitKeys
from gateway.fast_envelope import FastWriter
from gateway.metrics import GatewayMetrics
from schemas.codec import AvroCodec

SETTINGS = web.AppKey("settings", GatewaySettings)
PRODUCER = web.AppKey("producer", EventProducer)
METRICS = web.AppKey("metrics", GatewayMetrics)
SOURCES = web.AppKey("sources", SourceTable)
CODEC = web.AppKey("codec", AvroCodec)
TOPICS = web.AppKey("topics", Topics)
FAST = web.AppKey("fast", FastWriter)
CONFIG = web.AppKey("config", ConfigFollower)
JOB_KEYS = web.AppKey("job_keys", SubmitKeys)
JOB_CODEC = web.AppKey("job_codec", AvroCodec)
