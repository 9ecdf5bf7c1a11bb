"""Named credentials of workflow steps, and their redaction.

A step names a credential (`auth: pg_main`); only the tool runner resolves the name, when
the step runs: from a file of that name in `SLUICE_WORKFLOWS_CREDENTIALS_DIR`, else from
the variable `SLUICE_CREDENTIAL_<NAME>` (upper case, `-` and `.` as `_`). Events, jobs and
statuses carry the name only. The value is a JSON object (connection parameters, a
`token`, `headers`) or plain text (a libpq DSN or URI, a token).

Every string a credential holds that could give it away (the raw value, each string of
its JSON object, the password of a DSN or URI) is a secret: `redact` replaces each one in
a step's result and error with `***` before they leave the runner. Secrets shorter than
four characters are not redacted (they would blank out ordinary words), and are named in
the README as too short to keep out of results.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MIN_SECRET = 4
MASK = "***"


class CredentialError(ValueError):
    """A credential that cannot be resolved (its name is in the message, never its value)."""


@dataclass(frozen=True)
class Credential:
    """A resolved credential: its text, its JSON object (if it is one), its secrets."""

    name: str
    value: str
    fields: dict[str, Any] | None
    secrets: tuple[str, ...]


def env_name(name: str) -> str:
    """The variable a credential may come from."""
    return "SLUICE_CREDENTIAL_" + re.sub(r"[-.]", "_", name).upper()


def resolve(name: Any, directory: Path | None, env: Mapping[str, str] | None = None) -> Credential:
    """The credential called `name`; CredentialError when there is none."""
    if not isinstance(name, str) or not NAME.match(name):
        raise CredentialError(f"{name!r} is not a credential name (letters, digits, _ . -)")
    value: str | None = None
    if directory is not None:
        path = directory / name
        try:
            value = path.read_text("utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            value = None
        except OSError as exc:
            raise CredentialError(
                f"credential {name!r}: its file cannot be read ({exc.strerror})"
            ) from None
    if value is None:
        value = (env if env is not None else os.environ).get(env_name(name))
    if not value:
        where = f"{directory}/{name} or " if directory is not None else ""
        raise CredentialError(f"no credential {name!r} ({where}{env_name(name)})")
    fields: dict[str, Any] | None = None
    if value.startswith("{"):
        try:
            loaded = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise CredentialError(f"credential {name!r} starts with {{ but is not JSON") from None
        if isinstance(loaded, dict):
            fields = loaded
    return Credential(name, value, fields, _secrets(value, fields))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _secrets(value: str, fields: dict[str, Any] | None) -> tuple[str, ...]:
    found = {value}
    if fields is not None:
        found.update(_strings(fields))
    else:
        # A keyword DSN's password (quoted or not), and a URI's `password=` parameter.
        for pattern in (r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", r"password=([^\s&#]+)"):
            for match in re.finditer(pattern, value):
                found.update({match.group(1).strip("'"), unquote(match.group(1))})
        if "://" in value:
            try:
                url = urlsplit(value)
            except ValueError:
                url = None
            if url is not None and url.password:
                found.update({url.password, unquote(url.password)})
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """`value` (JSON-like) with every secret in its strings (keys too) replaced by `***`."""
    ordered = sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True)
    if not ordered:
        return value
    return _redact(value, ordered)


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, secrets) for v in value]
    return value
