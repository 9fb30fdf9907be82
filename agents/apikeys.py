"""API keys: ``ask_<prefix>_<secret>``. Only the SHA-256 of the whole key is stored; the prefix
finds the row, and the hash is compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from django.utils import timezone

from .models import ApiKey

SCHEME = "ask"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # at most one write per key per minute


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def generate() -> tuple[str, str]:
    """A new (plain key, prefix)."""
    prefix = secrets.token_hex(6)
    return f"{SCHEME}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def lookup(plain: str) -> ApiKey | None:
    """The active key matching ``plain``, or None. Records when it was last used."""
    parts = plain.split("_")
    if len(parts) < 3 or parts[0] != SCHEME:
        return None
    key = ApiKey.objects.select_related("user").filter(prefix=parts[1]).first()
    if key is None or not hmac.compare_digest(key.key_hash, hash_key(plain)):
        return None
    if key.revoked_at is not None or not key.user.is_active:
        return None
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
