"""Encryption at rest for provider API keys.

Keys are encrypted with Fernet under ``AGENTSITE_ENCRYPTION_KEY`` when set, else under a key
derived from ``SECRET_KEY``. Rotating SECRET_KEY without setting AGENTSITE_ENCRYPTION_KEY makes
stored keys unreadable: re-enter them in the admin.
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

from agentsite import derivedkeys


class SecretUnreadable(Exception):
    pass


def _fernet() -> Fernet:
    configured = os.environ.get("AGENTSITE_ENCRYPTION_KEY", "")
    if configured:
        return Fernet(configured.encode())
    return Fernet(derivedkeys.encryption_key(settings.SECRET_KEY).encode())


def encrypt(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode() if plaintext else ""


def decrypt(token: str) -> str:
    if not token:
        return ""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "a stored API key cannot be decrypted (was SECRET_KEY or AGENTSITE_ENCRYPTION_KEY "
            "changed?); re-enter it in the admin"
        ) from None
