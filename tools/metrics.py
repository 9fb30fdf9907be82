"""The tools app's metrics: outbox deliveries, and side effects waiting, read when scraped
(agentsite.metrics); the label of a tool's name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import Metric

from agentsite import metrics
from agentsite.metrics import bounded

from .models import OutboxMessage
from .registry import registry

OUTBOX_DELIVERIES = Counter(
    "agentsite_outbox_deliveries",
    "Side effects the outbox relay tried to deliver, by kind and outcome (delivered; retry: "
    "failed, tried again on a later pass; failed: given up).",
    ["kind", "outcome"],
)


def tool_label(name: Any) -> str:
    """An installed tool's name, or ``other``: the model names the tools it calls, and a
    refused call to a tool that does not exist must not make a series of its own."""
    text = str(name or "")
    return bounded("tool", text) if text in registry else metrics.OTHER


def _outbox_gauges() -> Iterable[Metric]:
    pending = OutboxMessage.objects.filter(status=OutboxMessage.Status.PENDING)
    yield from metrics.waiting_gauges(
        pending, "kind", "kind", "outbox", "Side effects (not yet delivered)"
    )


def register() -> None:
    """Add this app's metrics to agentsite.metrics (ToolsConfig.ready)."""
    metrics.collect_state(_outbox_gauges)
