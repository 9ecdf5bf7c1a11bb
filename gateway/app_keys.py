"""The typed keys of what the gateway app holds: settings, producer, metrics, sources, codecs,
the config follower, the queues' submit keys, the jobs' statuses."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from core.config_topic import ConfigFollower
from core.follower import CompactedFollower
from core.job_stats import QueueFigures
from core.jobs import StatusTable
from core.keys import RunKeys
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
RUN_KEYS = web.AppKey("run_keys", RunKeys)
JOB_CODEC = web.AppKey("job_codec", AvroCodec)


@dataclass(frozen=True)
class JobStatuses:
    """The status of every job, followed from the status topic, and the queues' figures."""

    table: StatusTable
    follower: CompactedFollower
    figures: QueueFigures


JOB_STATUS = web.AppKey("job_status", JobStatuses)
