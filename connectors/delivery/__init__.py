"""Delivery of webhook destinations, with retries through delay topics.

`WebhookDelivery` (`consumer.py`) runs one destination: its consumer loop and
rebalances; each partition a due-time lane (`core/due.py`) whose records `lanes.py`
handles; `pacing.py` the circuit breaker and rate limit of requests; `routing.py` where
a failed record goes (retry tier or DLQ); `ordering.py` and `restore.py` the parked keys
of order-preserving mode; `metrics.py` what it reports.
"""

from connectors.delivery.consumer import WebhookDelivery
from connectors.delivery.metrics import DeliveryMetrics

__all__ = ["DeliveryMetrics", "WebhookDelivery"]
