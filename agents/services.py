"""Domain operations on agents and runs: the only code that changes their state (with engine.py)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max

from . import audit
from .audit import Actor
from .dispatch import advance_run_on_commit
from .exceptions import AgentNotFound, AgentUnavailable, InvalidRunInput, RunAlreadyFinished
from .models import ROUTE_VALIDATOR, Agent, AgentVersion, ModelProvider, Run, Session
from .secretbox import encrypt

MAX_INPUT_BYTES = 256 * 1024


def publish_agent_version(*, agent: Agent, user: User | None = None) -> AgentVersion:
    """Freeze the agent's configuration as a new version, unless it equals the current one.

    Runs already started keep the version they pinned. Call inside a transaction.
    """
    snapshot = agent.snapshot()
    digest = AgentVersion.digest_of(snapshot)
    Agent.objects.select_for_update().filter(pk=agent.pk).first()
    current = agent.current_version
    if current is not None and current.digest == digest:
        return current
    number = (agent.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = AgentVersion.objects.create(
        agent=agent, number=number, digest=digest, created_by=user, **snapshot
    )
    Agent.objects.filter(pk=agent.pk).update(current_version=version)
    agent.current_version = version
    audit.record(
        "agent.version_published",
        payload={"agent": agent.slug, "version": number, "digest": digest},
        by=Actor.user(user),
    )
    return version


@transaction.atomic
def save_agent(*, agent: Agent, user: User | None = None) -> Agent:
    """Validate and save an agent; publish a new version when its configuration changed."""
    agent.full_clean()
    agent.save()
    publish_agent_version(agent=agent, user=user)
    return agent


def _normalise_input(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidRunInput("input must not be empty")
    if not isinstance(value, str | dict):
        raise InvalidRunInput("input must be a string or a JSON object")
    try:
        size = len(json.dumps(value).encode())
    except (TypeError, ValueError):
        raise InvalidRunInput("input must be JSON-serialisable") from None
    if size > MAX_INPUT_BYTES:
        raise InvalidRunInput(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    return value


def submit_run(
    *,
    agent: Agent | str,
    input: Any,
    owner: User | None = None,
    session: Session | None = None,
    model_route: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Run:
    """Record a queued run pinned to the agent's current version and nudge a worker on commit.

    ``model_route`` overrides the version's route for this run only.
    """
    if isinstance(agent, str):
        found = Agent.objects.filter(slug=agent).select_related("current_version").first()
        if found is None:
            raise AgentNotFound(f"no agent with slug {agent!r}")
        agent = found
    if not agent.is_active:
        raise AgentUnavailable(f"agent {agent.slug!r} is disabled")
    version = agent.current_version
    if version is None:
        raise AgentUnavailable(f"agent {agent.slug!r} has no published version")
    value = _normalise_input(input)
    if model_route:
        try:
            ROUTE_VALIDATOR(model_route)
        except ValidationError:
            raise InvalidRunInput(
                f"invalid model route {model_route!r}: expected provider:model", field="model"
            ) from None
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRunInput("metadata must be a JSON object", field="metadata")
    if session is not None and session.agent_id != agent.pk:
        raise InvalidRunInput("the session belongs to another agent", field="session")

    with transaction.atomic():
        run = Run.objects.create(
            agent=agent,
            agent_version=version,
            owner=owner,
            session=session,
            model_route=model_route or version.model_route,
            input=value,
            metadata=metadata or {},
        )
        audit.record(
            "run.submitted",
            run=run,
            payload={
                "agent": agent.slug,
                "version": version.number,
                "model_route": run.model_route,
                "session": str(session.pk) if session else None,
            },
            by=Actor.user(owner),
        )
        advance_run_on_commit(run.pk)
    return run


def start_session(*, agent: Agent, owner: User | None = None) -> Session:
    """A new conversation: runs naming it see the earlier turns."""
    return Session.objects.create(agent=agent, owner=owner)


def cancel_run(*, run_id: UUID | str, user: User | None = None) -> Run:
    """Cancel a run that has not finished. A step in flight finishes but its result is not used.

    Raises RunAlreadyFinished for a run in a final status.
    """
    from .engine import finish_run

    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run_id)
        if run.is_final:
            raise RunAlreadyFinished(f"run {run.pk} already {run.status}")
        finish_run(
            run,
            Run.Status.CANCELLED,
            error_code="cancelled",
            error="cancelled by " + (user.get_username() if user else "an operator"),
            by=Actor.user(user, otherwise="operator"),
        )
    return run


@transaction.atomic
def set_provider_api_key(*, provider: ModelProvider, api_key: str) -> None:
    """Store a provider key encrypted; the plain key is never saved or shown back."""
    provider.api_key_encrypted = encrypt(api_key)
    provider.save(update_fields=["api_key_encrypted", "updated_at"])
    audit.record(
        "provider.key_changed",
        payload={"provider": provider.name, "cleared": not api_key},
        by=Actor.system("admin"),
    )
