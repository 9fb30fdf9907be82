"""Traces: one per run, from the API request that submits it through every Celery task.

A run's trace id is the id of the request that submitted it: taken from the client's W3C
``traceparent`` header when it sends one, made up otherwise, and stored on the run
(``Run.trace_id``, with the request's span id in ``Run.trace_span_id``). Celery messages carry
the publisher's context in a ``traceparent`` header; a task continues it, and a step's span is
always put in its run's trace (linked to the task's span when a message came from elsewhere,
such as the reconciler or a reviewer's decision in the admin).

Spans: the API request (``GET /api/v1/runs/{pk}/``...), the Celery task, each step
(``agent.step``), each model call (``model.call``) and each tool call (``tool.call``). They are
exported with OTLP over HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, with the standard ``OTEL_*`` variables for
headers, sampling and batching. Otherwise no SDK is installed: the OpenTelemetry API's no-op
tracer hands back the parent's context, so trace ids still reach the logs and the runs, and
nothing is recorded or sent.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .logs import bound
from .metrics import agent_slug
from .redaction import redact

if TYPE_CHECKING:
    from agents.models import Run

logger = logging.getLogger(__name__)

TRACER = trace.get_tracer("agentsite")  # a proxy: the SDK's tracer once configure() ran
PROPAGATOR = TraceContextTextMapPropagator()
_provider: Any = None


def endpoint() -> str:
    """The OTLP endpoint traces go to, or "" (tracing off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def enabled() -> bool:
    return _provider is not None


def configure(service: str) -> bool:
    """Install the SDK with an OTLP/HTTP exporter if an endpoint is configured (once per
    process; a prefork child calls it after the fork, as the exporter's thread does not
    survive one). ``OTEL_SERVICE_NAME`` overrides ``service``."""
    global _provider
    if _provider is not None or not endpoint():
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info("tracing: exporting spans of %s over OTLP to %s", service, endpoint())
    return True


def shutdown() -> None:
    """Export what is buffered (a worker shutting down)."""
    if _provider is not None:
        _provider.shutdown()


# --- Ids --------------------------------------------------------------------------------------


def _random_bits(bits: int) -> int:
    value = 0
    while value == 0:  # zero is the invalid id
        value = random.getrandbits(bits)
    return value


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span as hex, or ("", "")."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _hex(value: str, digits: int) -> int | None:
    if len(value) != digits:
        return None
    try:
        number = int(value, 16)
    except ValueError:
        return None
    return number or None


def remote_parent(trace_id: str, span_id: str = "") -> otel_context.Context | None:
    """A context whose parent is the span ``span_id`` of trace ``trace_id`` (hex), elsewhere;
    None if ``trace_id`` is not a valid id."""
    tid = _hex(trace_id, 32)
    if tid is None:
        return None
    sid = _hex(span_id, 16) or _random_bits(64)
    parent = SpanContext(
        trace_id=tid, span_id=sid, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def incoming(headers: Mapping[str, str]) -> otel_context.Context:
    """The context a request or message continues: its ``traceparent``, or a new trace.

    Without the SDK a new trace is made up here, so that what the request does (a run it
    submits, its logs) still has a trace id."""
    ctx = PROPAGATOR.extract(carrier={k.lower(): v for k, v in headers.items()})
    if trace.get_current_span(ctx).get_span_context().is_valid or enabled():
        return ctx
    made_up = SpanContext(
        trace_id=_random_bits(128),
        span_id=_random_bits(64),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(made_up), ctx)


def inject(carrier: dict[str, Any]) -> None:
    """Put the current context in ``carrier`` (message headers) as ``traceparent``."""
    if trace.get_current_span().get_span_context().is_valid:
        PROPAGATOR.inject(carrier)


# --- Spans ------------------------------------------------------------------------------------


def failed(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed with a redacted, bounded description (exception messages carry
    provider answers and tool output)."""
    if span.is_recording():
        description = str(redact(f"{type(exc).__name__}: {exc}"))[:500]
        span.set_status(Status(StatusCode.ERROR, description))
        span.set_attribute("exception.type", type(exc).__name__)


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    parent: otel_context.Context | None = None,
    links: list[Link] | None = None,
) -> Iterator[Span]:
    """A span, current within the block; an exception marks it failed (redacted) and goes on."""
    with TRACER.start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, exc)
            raise


@contextmanager
def run_span(
    run: Run, name: str, *, step: int | None = None, attributes: Mapping[str, Any] | None = None
) -> Iterator[Span]:
    """A span in ``run``'s trace: a child of the current span when that is in the run's trace,
    else of the run's own root (linked to the current span), so that whatever published the
    message (the reconciler, a reviewer's request) every step of a run is in one trace.

    The logs written within carry the run's id and agent too (agentsite.logs)."""
    trace_id, _ = current_ids()
    parent = None
    links = None
    if trace_id != run.trace_id:
        parent = remote_parent(run.trace_id, getattr(run, "trace_span_id", ""))
        here = trace.get_current_span().get_span_context()
        links = [Link(here)] if here.is_valid else None
    agent = agent_slug(run.agent_id, loaded=run.agent if type(run).agent.is_cached(run) else None)
    attrs = {"agentsite.run_id": str(run.pk), "agentsite.agent": agent, "agentsite.step": step}
    attrs.update(attributes or {})
    with (
        span(name, attributes=attrs, parent=parent, links=links) as current,
        bound(run_id=str(run.pk), agent=agent, step=step),
    ):
        yield current


# --- Celery tasks -----------------------------------------------------------------------------

_STATE = "_agentsite_trace"


def task_started(task: Any, task_id: str) -> None:
    """A task begins: a consumer span continuing the message's ``traceparent`` (if any), current
    until the task ends, and log lines that name the task."""
    from contextlib import ExitStack

    request = task.request
    carrier = {k: v for k in ("traceparent", "tracestate") if isinstance(v := request.get(k), str)}
    parent = PROPAGATOR.extract(carrier=carrier) if carrier else None
    delivery = request.delivery_info or {}
    stack = ExitStack()
    current = stack.enter_context(
        TRACER.start_as_current_span(
            f"celery.task {task.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "celery",
                "messaging.destination.name": str(delivery.get("routing_key") or ""),
                "messaging.message.id": task_id,
                "celery.task_name": task.name,
                "celery.retries": int(request.retries or 0),
            },
            record_exception=False,
            set_status_on_exception=False,
        )
    )
    stack.enter_context(bound(task=task.name, task_id=task_id))
    setattr(request, _STATE, (stack, current))


def task_ended(task: Any, state: str | None, retval: Any) -> None:
    found = getattr(task.request, _STATE, None)
    if found is None:
        return
    setattr(task.request, _STATE, None)
    stack, current = found
    if state == "FAILURE" and isinstance(retval, BaseException):
        failed(current, retval)
    stack.close()
