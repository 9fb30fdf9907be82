"""The local ``.env`` file: settings for a development checkout, so that ``manage.py`` commands
run as the README shows them, with nothing to export.

``make demo`` (and ``make up``, ``make migrate``) write it once, if it is absent, with
``DEBUG=1`` and a generated ``SECRET_KEY``; it is git-ignored and never regenerated. Settings
read it before anything else (``apply``), and the environment always wins over it. Its path is
``AGENTSITE_ENV_FILE`` (default ``<checkout>/.env``; empty: no file, as ``make test`` runs).

A checkout whose ``.data/`` predates the file ran on the fixed development key: its audit chain
and its stored provider keys were derived from that key. The file then also pins those derived
keys, so the chain still verifies and the keys still decrypt under the new ``SECRET_KEY``.

Run as ``python -m agentsite.envfile [PATH]`` to write the file if it is missing.
"""

from __future__ import annotations

import datetime
import os
import secrets
import sys
from pathlib import Path

from dotenv import dotenv_values

from agentsite import derivedkeys

BASE_DIR = Path(__file__).resolve().parent.parent
# What SECRET_KEY was in development before .env existed (DEBUG=1 and no SECRET_KEY). Kept only
# to derive, for an older checkout's data, the keys that were derived from it.
LEGACY_DEVELOPMENT_KEY = "insecure-development-key-do-not-use-in-production"  # noqa: S105


def path() -> Path | None:
    """The env file this process reads, or None when ``AGENTSITE_ENV_FILE`` is empty."""
    configured = os.environ.get("AGENTSITE_ENV_FILE")
    if configured is None:
        return BASE_DIR / ".env"
    return Path(configured) if configured.strip() else None


def apply(env_path: Path | None) -> list[str]:
    """Put the file's settings into ``os.environ`` where the environment does not set them, and
    return their names (the ones that came from the file). A missing file is no error."""
    if env_path is None or not env_path.is_file():
        return []
    taken = []
    for name, value in dotenv_values(env_path).items():
        if value is None or name in os.environ:
            continue
        os.environ[name] = value
        taken.append(name)
    return taken


def legacy_keys(secret_key: str = LEGACY_DEVELOPMENT_KEY) -> dict[str, str]:
    """The keys settings derive from ``secret_key`` when they are not set: the audit chain's
    HMAC key, the Fernet key of stored provider keys, and the webhook signing secret."""
    return {
        "AGENTSITE_AUDIT_KEY": derivedkeys.audit_key(secret_key),
        "AGENTSITE_ENCRYPTION_KEY": derivedkeys.encryption_key(secret_key),
        "AGENTSITE_WEBHOOK_SECRET": derivedkeys.webhook_secret(secret_key),
    }


def render(*, existing_data: bool) -> str:
    """The text of a new development ``.env``."""
    today = datetime.date.today().isoformat()
    lines = [
        f"# Written by `make demo` on {today} for local development; never regenerated.",
        "# Not for production: set the real settings in the environment there (they win).",
        "DEBUG=1",
        f"SECRET_KEY={secrets.token_urlsafe(50)}",
    ]
    if existing_data:
        lines += [
            "# .data/ was made before this file, under the fixed development key: these keep",
            "# its audit chain verifying and its stored provider keys readable.",
            *(f"{name}={value}" for name, value in legacy_keys().items()),
        ]
    return "\n".join(lines) + "\n"


def has_data(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds anything made under the old key: any entry but the static
    files directory, which every development process creates empty."""
    if not data_dir.is_dir():
        return False
    return any(
        entry.name != "static" or (entry.is_dir() and any(entry.iterdir()))
        for entry in data_dir.iterdir()
    )


def ensure(env_path: Path, *, data_dir: Path) -> bool:
    """Write ``env_path`` if it does not exist (readable by its owner only). True if written."""
    if env_path.exists():
        return False
    text = render(existing_data=has_data(data_dir))
    fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return True


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else (path() or BASE_DIR / ".env")
    data_dir = Path(os.environ.get("AGENTSITE_DATA_DIR", BASE_DIR / ".data"))
    try:
        written = ensure(target, data_dir=data_dir)
    except OSError as exc:
        print(f"agentsite: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    if written:
        print(f"wrote {target} (DEBUG=1 and a new SECRET_KEY; git-ignored, for development)")
    return 0


def settings_or_exit() -> None:
    """Load Django's settings, or end the process with their one-line complaint (a missing
    ``SECRET_KEY``, a value that is not a number...) instead of a traceback. Every entry point
    calls it first: ``manage.py``, the Celery app (worker, beat, Flower) and the web servers."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        settings.INSTALLED_APPS  # noqa: B018  (importing the settings checks them)
    except ImproperlyConfigured as exc:
        raise SystemExit(f"agentsite: {exc}") from None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
