"""Delivery of a destination topic to a webhook, with retries through delay topics."""

from connectors.delivery.consumer import DeliveryMetrics, WebhookDelivery

__all__ = ["DeliveryMetrics", "WebhookDelivery"]
