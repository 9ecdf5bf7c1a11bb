"""JSON responses and errors: every answer of the gateway's API is a JSON body."""

from core.responses import error, json_response

__all__ = ["error", "json_response"]
