"""The bearer token of the warehouse query endpoint: where it comes from, how it is checked.

`SLUICE_WAREHOUSE_QUERY_TOKEN` when set; otherwise the sink generates one into
`query_token_file` (mode 0600, readable by its owner only), where `sluice sql` run from
the same folder finds it. No token, no query.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from core.settings import WarehouseSettings


def _from_settings(settings: WarehouseSettings) -> str | None:
    secret = settings.query_token
    return (secret.get_secret_value().strip() or None) if secret is not None else None


def _from_file(path: Path) -> str | None:
    try:
        return path.read_text("utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def configured_token(settings: WarehouseSettings) -> str | None:
    """The token from the settings, or from the token file; None when there is neither."""
    return _from_settings(settings) or _from_file(settings.query_token_file)


def ensure_token(settings: WarehouseSettings) -> str:
    """The endpoint's token; generated into the token file (0600) when none is configured."""
    token = _from_settings(settings)
    if token is not None:
        return token
    token = _from_file(settings.query_token_file)
    if token is not None:
        settings.query_token_file.chmod(0o600)  # closed again if someone opened it to others
        return token
    return _create(settings.query_token_file)


def _create(path: Path) -> str:
    """Write a new token to `path` atomically (two sinks starting at once agree on one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(token + "\n")
        try:
            os.link(tmp, path)  # fails when the file exists: then the other one wins
        except FileExistsError:
            return path.read_text("utf-8").strip()
    finally:
        tmp.unlink(missing_ok=True)
    return token


def authorized(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header carries `Bearer <token>` (compared in constant time)."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))
