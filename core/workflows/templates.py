"""Jinja2 templates of playbooks, in a sandbox.

A playbook's strings are templates (`"{{ workload.items }}"`, `"row {{ iter.item.id }}"`).
A string that is one expression and nothing else gives that expression's value as it is
(a list stays a list, a number a number), as NoETL does; any other string renders to text.
Templates run in Jinja2's immutable sandbox: no attribute of Python internals, no call
that changes a value, no import. A name that is not defined is an error (a step fails with
it), unless the template handles it (`x | default(1)`, `x is defined`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, where `a.b` of a mapping is its key `b` first (`workload.items` is the
    workload's `items`, not the dict method), then an attribute."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_ENV = _Environment(undefined=StrictUndefined, autoescape=False)
_ENV.filters["tojson"] = lambda value: orjson.dumps(value, default=str).decode()
_ENV.filters["fromjson"] = orjson.loads
# A whole string that is one `{{ expression }}`.
_LONE = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)
_MARKS = ("{{", "{%", "{#")


class RenderError(ValueError):
    """A template that cannot be rendered: its text and the reason."""


def _lone(text: str) -> str | None:
    match = _LONE.match(text)
    if match is None:
        return None
    expr = match.group("expr")
    # `{{ a }} and {{ b }}` is text, not one expression.
    return None if "{{" in expr or "}}" in expr else expr


def is_template(text: str) -> bool:
    """Whether `text` has any Jinja2 markup."""
    return any(mark in text for mark in _MARKS)


def check(text: str) -> str | None:
    """Why `text` is not a valid template (its syntax), or None."""
    if not is_template(text):
        return None
    try:
        expr = _lone(text)
        if expr is not None:
            _ENV.compile_expression(expr)
        else:
            _ENV.from_string(text)
    except TemplateSyntaxError as exc:
        return f"template {text!r}: {exc.message} (line {exc.lineno})"
    return None


def strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a nested value, with where it is (`input.url`, `arcs[1].when`)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from strings(item, f"{where}[{index}]")


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """`value` with every template in it rendered against `context` (nested values too)."""
    if isinstance(value, str):
        return render_text(value, context)
    if isinstance(value, Mapping):
        return {key: render(item, context) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, context) for item in value]
    return value


def render_text(text: str, context: Mapping[str, Any]) -> Any:
    """One string: a lone expression's value, rendered text, or the text as it is."""
    if not is_template(text):
        return text
    try:
        expr = _lone(text)
        if expr is not None:
            return _defined(_ENV.compile_expression(expr, undefined_to_none=False)(**context))
        return _ENV.from_string(text).render(**context)
    except TemplateError as exc:
        raise RenderError(f"template {text!r}: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise RenderError(f"template {text!r}: {type(exc).__name__}: {exc}") from None


def truthy(text: Any, context: Mapping[str, Any]) -> bool:
    """A `when`: its rendered value as a condition (the text "false", "0", "" is false)."""
    value = render(text, context) if isinstance(text, str) else text
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "none", "null", "no")
    return bool(value)


def _defined(value: Any) -> Any:
    if isinstance(value, Undefined):
        # A lone expression that names nothing (or what the sandbox hides): the error
        # its rendering as text gives.
        value._fail_with_undefined_error()
    return value
