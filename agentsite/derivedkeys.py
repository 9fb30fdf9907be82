"""The keys derived from ``SECRET_KEY`` when they are not set on their own, in one place:
settings (the audit chain's HMAC key, the webhook secret), agents.secretbox (the Fernet key of
stored provider keys) and agentsite.envfile (which pins an older checkout's keys) all use these.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def audit_key(secret_key: str) -> str:
    """``AGENTSITE_AUDIT_KEY``'s default: the HMAC key of the audit trail's hash chain."""
    return hmac.new(secret_key.encode(), b"agentsite-audit-chain", hashlib.sha256).hexdigest()


def webhook_secret(secret_key: str) -> str:
    """``AGENTSITE_WEBHOOK_SECRET``'s default: the key webhooks are signed with."""
    return hashlib.sha256(f"agentsite-webhook:{secret_key}".encode()).hexdigest()


def encryption_key(secret_key: str) -> str:
    """``AGENTSITE_ENCRYPTION_KEY``'s default: the Fernet key of provider API keys at rest."""
    digest = hashlib.sha256(f"agentsite-secretbox:{secret_key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()
