"""Transforms: user functions named by import path, checked without importing, imported once.

A destination's `transform` names `package.module:function`. Validating a config only
checks the path and that its module is under an allowed prefix (`SLUICE_TRANSFORM_MODULES`);
importing runs the module's code, so it happens only where the transform runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Annotated, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from core.errors import ConfigError
from core.settings import TransformSettings

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
FUNCTION_PATTERN = rf"^{_IDENT}(?:\.{_IDENT})*[:.]{_IDENT}$"
# The validation context key under which the allowed transform modules are passed.
TRANSFORMS_CONTEXT = "transform_modules"

TransformFunction = Callable[[dict[str, Any]], Any]


class Transform(BaseModel):
    """A user function `transform(event) -> event | list[event] | None`, by import path.

    Validating one never imports anything: it checks the path's syntax and, when the
    validation context carries `TransformSettings` (see `parse_config`), that its module
    is allowed. Only `resolve_function`, called where the transform runs, imports.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    function: Annotated[str, Field(pattern=FUNCTION_PATTERN)]
    timeout_s: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _module_allowed(self, info: ValidationInfo) -> Transform:
        context = info.context
        allowed = context.get(TRANSFORMS_CONTEXT) if isinstance(context, dict) else None
        if isinstance(allowed, TransformSettings):
            check_module(self.function, allowed)
        return self


def split_function(path: str) -> tuple[str, str]:
    """`package.module:function` (or `package.module.function`) as (module, function)."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    return module_name, name


def check_module(path: str, transforms: TransformSettings) -> str:
    """The module of transform `path`; ValueError when its module is not allowed."""
    module_name, _ = split_function(path)
    if not transforms.allows(module_name):
        allowed = ", ".join(transforms.modules) or "none"
        raise ValueError(
            f"transform {path!r}: module {module_name!r} is not under an allowed prefix"
            f" (SLUICE_TRANSFORM_MODULES: {allowed})"
        )
    return module_name


def resolve_function(path: str, transforms: TransformSettings) -> TransformFunction:
    """Import the callable at `path`, from an allowed module only.

    ConfigError when the module is not allowed, cannot be imported (any failure while
    importing, `SystemExit` included; only `KeyboardInterrupt` passes) or has no such
    function.
    """
    try:
        module_name = check_module(path, transforms)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    name = split_function(path)[1]
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, name, None)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a module's import runs its code: contain whatever it does
        raise ConfigError(
            f"transform {path!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    if not callable(function):
        raise ConfigError(f"transform {path!r}: {module_name!r} has no function {name!r}")
    return cast(TransformFunction, function)
