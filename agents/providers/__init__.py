"""Model providers behind one interface, chosen by a route string ``provider:model``."""

from __future__ import annotations

from django.conf import settings

from .base import (
    InvalidProviderResponse,
    ModelProvider,
    ModelRequest,
    ModelResponse,
    PermanentProviderError,
    ProviderError,
    RateLimitedProviderError,
    ToolCallRequest,
    TransientProviderError,
)
from .openai_compat import OpenAICompatibleProvider
from .scripted import ScriptedProvider

__all__ = [
    "InvalidProviderResponse",
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "PermanentProviderError",
    "ProviderError",
    "RateLimitedProviderError",
    "ToolCallRequest",
    "TransientProviderError",
    "resolve_route",
]

_scripted = ScriptedProvider()


def _bounded(timeout: float) -> float:
    """A call may not outlive its step: keep it under the step's soft time limit."""
    return max(0.1, min(timeout, settings.AGENTSITE_STEP_SOFT_TIME_LIMIT - 5))


def resolve_route(route: str) -> tuple[ModelProvider, str]:
    """Return the provider and model name for ``provider:model``.

    A provider edited in the admin wins over the environment's entry of the same name.
    """
    # Here, not at the top: importing the adapters (base, openai_compat, scripted) does not
    # need Django's app registry, only resolving a route through the database does.
    from agents.models import ModelProvider as ProviderRow
    from agents.secretbox import SecretUnreadable, decrypt

    name, sep, model = route.partition(":")
    if not sep or not name or not model:
        raise PermanentProviderError(f"invalid model route {route!r}: expected provider:model")
    if name == "scripted":
        return _scripted, model
    row = ProviderRow.objects.filter(name=name, enabled=True).first()
    if row is not None:
        try:
            api_key = decrypt(row.api_key_encrypted)
        except SecretUnreadable as exc:
            raise PermanentProviderError(f"provider {name!r}: {exc}") from None
        return (
            OpenAICompatibleProvider(
                name=name,
                base_url=row.base_url,
                api_key=api_key,
                timeout=_bounded(row.timeout_seconds),
                requests_per_minute=row.requests_per_minute,
                tokens_per_minute=row.tokens_per_minute,
            ),
            model,
        )
    conf = settings.AGENTSITE_PROVIDERS.get(name)
    if conf is None and ProviderRow.objects.filter(name=name, enabled=False).exists():
        raise PermanentProviderError(f"model provider {name!r} is disabled in the admin")
    if conf is None:
        raise PermanentProviderError(
            f"unknown model provider {name!r} in route {route!r}: set "
            f"AGENTSITE_PROVIDER_{name.upper()}_BASE_URL or add the provider in the admin"
        )
    try:
        timeout = float(conf.get("timeout", 60))
        rpm, tpm = int(conf.get("rpm") or 0), int(conf.get("tpm") or 0)
    except ValueError:
        raise PermanentProviderError(
            f"provider {name!r}: TIMEOUT, RPM and TPM are numbers"
        ) from None
    return (
        OpenAICompatibleProvider(
            name=name,
            base_url=conf["base_url"],
            api_key=conf.get("api_key", ""),
            timeout=_bounded(timeout),
            requests_per_minute=max(0, rpm),
            tokens_per_minute=max(0, tpm),
        ),
        model,
    )
