"""Domain operations on agents and runs that are not engine transitions: defining agents and
versions, submitting, cancelling and retrying runs (through agents.engine.transitions), keys."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from agentsite import tracing
from audittrail import writer as audit
from audittrail.actions import AuditAction
from audittrail.writer import Actor
from tools.catalogue import sync_tools
from tools.models import Tool, ToolGrant
from tools.registry import registry

from . import apikeys, budgets
from .dispatch import advance_run_on_commit
from .engine import transitions
from .errorcodes import RunErrorCode
from .exceptions import (
    AgentNotFound,
    AgentUnavailable,
    IdempotencyConflict,
    InvalidRunInput,
    RunAlreadyFinished,
    RunNotRetryable,
    SessionBusy,
    TooManyActiveRuns,
)
from .jsonsafe import unstorable
from .models import (
    ROUTE_VALIDATOR,
    VERSIONED_FIELDS,
    Agent,
    AgentVersion,
    ApiKey,
    ModelProvider,
    Run,
    Session,
    Step,
    new_trace_id,
)
from .secretbox import encrypt
from .webhooks import check_webhook_url

logger = logging.getLogger(__name__)

MAX_INPUT_BYTES = 256 * 1024


def publish_agent_version(
    *, agent: Agent, user: User | None = None, canary_percent: int = 0
) -> AgentVersion:
    """Freeze the agent's configuration as a new version, unless it equals the current one
    (or, for a canary, the canary).

    With ``canary_percent`` (1-99) the new version is a canary: that share of new runs use it,
    the rest keep the current version, until it is promoted or rolled back. Without, it becomes
    the current version and any canary ends. Runs already started keep the version they
    pinned. Call inside a transaction.
    """
    if not 0 <= canary_percent <= 99:
        raise ValidationError({"canary_percent": "A canary takes 1 to 99 percent of new runs."})
    snapshot = agent.snapshot()
    digest = AgentVersion.digest_of(snapshot)
    # Read the versions under the lock: another admin may have published or promoted meanwhile.
    locked = (
        Agent.objects.select_for_update(no_key=True, of=("self",))
        .select_related("current_version", "canary_version")
        .get(pk=agent.pk)
    )
    current, canary = locked.current_version, locked.canary_version
    agent.current_version, agent.canary_version = current, canary
    agent.canary_percent = locked.canary_percent
    if canary is not None and canary.digest == digest and not canary_percent:
        # Saved again while a canary runs (a live setting changed, say): the canary stays a
        # canary. Only promote_canary makes it every run's.
        return canary
    if canary_percent and current is not None:
        if canary is not None and canary.digest == digest:
            if agent.canary_percent != canary_percent:
                _set_canary(agent, canary, canary_percent, user)
            return canary
        if current.digest == digest:
            return current
    elif current is not None and current.digest == digest:
        if canary is not None:
            _set_canary(agent, None, 0, user, action=AuditAction.AGENT_CANARY_ROLLED_BACK)
        return current
    number = (agent.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = AgentVersion.objects.create(
        agent=agent, number=number, digest=digest, created_by=user, **snapshot
    )
    audit.record(
        AuditAction.AGENT_VERSION_PUBLISHED,
        payload={"agent": agent.slug, "version": number, "digest": digest},
        by=Actor.user(user),
    )
    if canary_percent and current is not None:
        _set_canary(agent, version, canary_percent, user)
        return version
    if canary is not None:
        _set_canary(agent, None, 0, user, action=AuditAction.AGENT_CANARY_REPLACED)
    Agent.objects.filter(pk=agent.pk).update(
        current_version=version, canary_version=None, canary_percent=0
    )
    agent.current_version, agent.canary_version, agent.canary_percent = version, None, 0
    return version


def _set_canary(
    agent: Agent,
    version: AgentVersion | None,
    percent: int,
    user: User | None,
    *,
    action: AuditAction = AuditAction.AGENT_CANARY_STARTED,
) -> None:
    Agent.objects.filter(pk=agent.pk).update(canary_version=version, canary_percent=percent)
    agent.canary_version, agent.canary_percent = version, percent
    audit.record(
        action,
        payload={
            "agent": agent.slug,
            "version": version.number if version else None,
            "percent": percent,
            "current": agent.current_version.number if agent.current_version else None,
        },
        by=Actor.user(user),
    )


@transaction.atomic
def promote_canary(*, agent: Agent, user: User | None = None) -> AgentVersion:
    """The canary becomes the current version for every new run."""
    agent = Agent.objects.select_for_update(no_key=True).get(pk=agent.pk)
    canary = agent.canary_version
    if canary is None:
        raise ValidationError(f"agent {agent.slug!r} has no canary to promote")
    previous = agent.current_version
    Agent.objects.filter(pk=agent.pk).update(
        current_version=canary, canary_version=None, canary_percent=0
    )
    audit.record(
        AuditAction.AGENT_CANARY_PROMOTED,
        payload={
            "agent": agent.slug,
            "version": canary.number,
            "previous": previous.number if previous else None,
        },
        by=Actor.user(user),
    )
    return canary


@transaction.atomic
def roll_back_canary(*, agent: Agent, user: User | None = None) -> AgentVersion | None:
    """New runs stop using the canary. The agent's editable configuration (and its tool
    grants) go back to the current version's, so the next save does not republish the
    rolled-back one. Returns the version rolled back, or None if there was no canary."""
    agent = Agent.objects.select_for_update(no_key=True).get(pk=agent.pk)
    canary, current = agent.canary_version, agent.current_version
    if canary is None or current is None:
        return None
    for field in VERSIONED_FIELDS:
        setattr(agent, field, getattr(current, field))
    agent.canary_version, agent.canary_percent = None, 0
    agent.save()
    set_grants(agent=agent, grants=dict(current.grants or {}))
    audit.record(
        AuditAction.AGENT_CANARY_ROLLED_BACK,
        payload={"agent": agent.slug, "version": canary.number, "current": current.number},
        by=Actor.user(user),
    )
    return canary


def pick_version(agent: Agent, session: Session | None) -> AgentVersion | None:
    """The version a new run uses: the canary for its share of runs, else the current one. A
    session's runs all land on the same side (its id decides), so a conversation does not
    switch prompts mid-way."""
    canary, percent = agent.canary_version, agent.canary_percent
    if canary is None or percent <= 0:
        return agent.current_version
    if session is not None:
        bucket = int(hashlib.sha256(str(session.pk).encode()).hexdigest()[:8], 16) % 100
    else:
        bucket = secrets.randbelow(100)
    return canary if bucket < percent else agent.current_version


GrantSpec = str | dict[str, Any]


@transaction.atomic
def save_agent(
    *,
    agent: Agent,
    user: User | None = None,
    grants: list[str] | dict[str, GrantSpec] | None = None,
) -> Agent:
    """Validate and save an agent (and, if given, replace its tool grants); publish a new
    version when its configuration changed."""
    agent.full_clean()
    agent.save()
    if grants is not None:
        set_grants(agent=agent, grants=grants)
    publish_agent_version(agent=agent, user=user)
    return agent


def set_grants(*, agent: Agent, grants: list[str] | dict[str, GrantSpec]) -> None:
    """Make ``grants`` the agent's tool grants, replacing the others. Does not publish.

    ``grants`` lists tool names (each granted in the tool's default mode), or maps a name to a
    mode (``"allow"``, ``"require_approval"``) or to ``{"mode": ..., "constraints": {...}}``.
    Raises ValidationError naming the tool at fault.
    """
    wanted: dict[str, dict[str, Any]] = {}
    items = grants.items() if isinstance(grants, dict) else ((name, {}) for name in grants)
    for name, spec in items:
        wanted[name] = {"mode": spec} if isinstance(spec, str) else dict(spec)
    tools = {t.name: t for t in Tool.objects.filter(name__in=wanted)}
    if set(wanted) - set(tools) and set(wanted) & set(registry.names()) - set(tools):
        sync_tools()  # registered in code since the last sync
        tools = {t.name: t for t in Tool.objects.filter(name__in=wanted)}
    unknown = sorted(set(wanted) - set(tools))
    if unknown:
        raise ValidationError({"grants": f"Unknown tools: {', '.join(unknown)}."})
    ToolGrant.objects.filter(agent=agent).exclude(tool__name__in=wanted).delete()
    for name, spec in wanted.items():
        tool = tools[name]
        grant = ToolGrant.objects.filter(agent=agent, tool=tool).first() or ToolGrant(
            agent=agent, tool=tool
        )
        grant.mode = spec.get("mode") or tool.default_mode
        grant.constraints = spec.get("constraints") or {}
        try:
            grant.full_clean(exclude=["agent"])
        except ValidationError as exc:
            raise ValidationError({"grants": f"{name}: {'; '.join(exc.messages)}"}) from None
        grant.save()


def _normalise_input(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidRunInput("input must not be empty")
    if not isinstance(value, str | dict):
        raise InvalidRunInput("input must be a string or a JSON object")
    problem = unstorable(value)
    if problem:
        raise InvalidRunInput(f"input {problem}")
    try:
        size = len(json.dumps(value).encode())
    except (TypeError, ValueError):
        raise InvalidRunInput("input must be JSON-serialisable") from None
    if size > MAX_INPUT_BYTES:
        raise InvalidRunInput(f"input is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    return value


def _resolve_session(
    *, agent: Agent, owner: User | None, session: Session | str | None, on_conflict: str
) -> Session | None:
    """The run's session (created on first use of a key), after the ``on_conflict`` check."""
    if session is None:
        return None
    if isinstance(session, str):
        key = session.strip()
        if not key or len(key) > 200:
            raise InvalidRunInput("a session key is 1 to 200 characters", field="session")
        found, _ = Session.objects.get_or_create(owner=owner, key=key, defaults={"agent": agent})
        session = found
    if session.agent_id != agent.pk:
        raise InvalidRunInput("the session belongs to another agent", field="session")
    if on_conflict not in ("enqueue", "reject"):
        raise InvalidRunInput("on_conflict is 'enqueue' or 'reject'", field="on_conflict")
    if on_conflict == "reject":
        # Lock the session's row so two submissions cannot both see it idle.
        Session.objects.select_for_update(no_key=True).filter(pk=session.pk).first()
        if session.runs.filter(status__in=Run.ACTIVE_STATUSES).exists():
            raise SessionBusy(f"session {session.key!r} already has a run in progress")
    return session


def _check_active_run_cap(api_key: ApiKey) -> None:
    """Refuse a run past the key's cap on unfinished runs. Call inside the transaction: the
    key's row lock makes the count and the insert one atomic step across web processes."""
    cap = settings.AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY
    if not cap:
        return
    ApiKey.objects.select_for_update(no_key=True).filter(pk=api_key.pk).first()
    active = Run.objects.filter(api_key=api_key, status__in=Run.ACTIVE_STATUSES).count()
    if active >= cap:
        raise TooManyActiveRuns(
            f"this API key has {active} runs not yet finished; the limit is {cap}"
        )


def submit_run(
    *,
    agent: Agent | str,
    input: Any,
    owner: User | None = None,
    api_key: ApiKey | None = None,
    session: Session | str | None = None,
    on_conflict: str = "enqueue",
    model_route: str | None = None,
    metadata: dict[str, Any] | None = None,
    webhook_url: str = "",
    idempotency_key: str = "",
    request_digest: str = "",
    budget: dict[str, Any] | None = None,
) -> Run:
    """Record a queued run pinned to the agent's current version and nudge a worker on commit.

    ``model_route`` overrides the version's route for this run only. ``session`` is a Session
    or a client's session key (created on first use); with ``on_conflict="reject"`` a session
    that has a run in progress raises SessionBusy, otherwise the run waits its turn. Nothing is
    published unless the run is committed.
    """
    if isinstance(agent, str):
        found = (
            Agent.objects.filter(slug=agent)
            .select_related("current_version", "canary_version")
            .first()
        )
        if found is None:
            raise AgentNotFound(f"no agent with slug {agent!r}")
        agent = found
    if not agent.is_active:
        raise AgentUnavailable(f"agent {agent.slug!r} is disabled")
    version = agent.current_version
    if version is None:
        raise AgentUnavailable(f"agent {agent.slug!r} has no published version")
    value = _normalise_input(input)
    run_budget = budgets.run_budget(version, budget)
    if model_route:
        try:
            ROUTE_VALIDATOR(model_route)
        except ValidationError:
            raise InvalidRunInput(
                f"invalid model route {model_route!r}: expected provider:model", field="model"
            ) from None
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRunInput("metadata must be a JSON object", field="metadata")
    problem = unstorable(metadata) if metadata is not None else ""
    if problem:
        raise InvalidRunInput(f"metadata {problem}", field="metadata")
    if webhook_url:
        check_webhook_url(webhook_url)

    with transaction.atomic():
        if api_key is not None:
            _check_active_run_cap(api_key)
        run_session = _resolve_session(
            agent=agent, owner=owner, session=session, on_conflict=on_conflict
        )
        picked = pick_version(agent, run_session) or version
        if picked != version:
            version = picked
            # Checked against the current version above; a canary's lower limits clamp it
            # rather than refuse a request the other side would take.
            run_budget = budgets.run_budget(version, budget, clamp=True)
        trace_id, span_id = tracing.current_ids()
        run = Run.objects.create(
            trace_id=trace_id or new_trace_id(),
            trace_span_id=span_id,
            agent=agent,
            agent_version=version,
            owner=owner,
            api_key=api_key,
            session=run_session,
            model_route=model_route or version.model_route,
            input=value,
            metadata=metadata or {},
            budget=run_budget,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            request_digest=request_digest,
        )
        audit.record(
            AuditAction.RUN_SUBMITTED,
            run=run,
            payload={
                "agent": agent.slug,
                "version": version.number,
                "model_route": run.model_route,
                **({"canary": True} if version == agent.canary_version else {}),
                "budget": run_budget,
                "session": run_session.key if run_session else None,
                "api_key_prefix": api_key.prefix if api_key else None,
            },
            by=Actor.user(owner),
        )
        advance_run_on_commit(run.pk)
    logger.info(
        "run %s submitted to %s (version %s)",
        run.pk,
        agent.slug,
        version.number,
        extra={"run_id": str(run.pk), "agent": agent.slug},
    )
    return run


def submit_run_idempotently(
    *, owner: User, idempotency_key: str, request_digest: str, **fields: Any
) -> tuple[Run, bool]:
    """``submit_run`` keyed by a client's Idempotency-Key: the same key and request return the
    run first created (``created`` False); the same key with another request raises
    IdempotencyConflict. Safe under concurrent identical requests (a unique constraint decides).
    """
    if len(idempotency_key) > 200:
        raise InvalidRunInput("Idempotency-Key is at most 200 characters", field="idempotency_key")

    def replay() -> Run | None:
        existing = Run.objects.filter(owner=owner, idempotency_key=idempotency_key).first()
        if existing is not None and existing.request_digest != request_digest:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request"
            )
        return existing

    if (existing := replay()) is not None:
        return existing, False
    try:
        with transaction.atomic():
            run = submit_run(
                owner=owner,
                idempotency_key=idempotency_key,
                request_digest=request_digest,
                **fields,
            )
    except IntegrityError:
        if (existing := replay()) is not None:
            return existing, False
        raise
    return run, True


def start_session(*, agent: Agent, owner: User | None = None, key: str | None = None) -> Session:
    """A new conversation: runs naming it see the earlier turns."""
    if key is None:
        return Session.objects.create(agent=agent, owner=owner)
    return Session.objects.create(agent=agent, owner=owner, key=key)


def cancel_run(*, run_id: UUID | str, user: User | None = None) -> Run:
    """Cancel a run that has not finished. A step in flight finishes but its result is not used.

    Raises RunAlreadyFinished for a run in a final status.
    """
    with transaction.atomic():
        run = transitions.lock_run(run_id)
        if run is None:
            raise Run.DoesNotExist(f"no run {run_id}")
        if run.is_final:
            raise RunAlreadyFinished(f"run {run.pk} already {run.status}")
        transitions.finish_run(
            run,
            Run.Status.CANCELLED,
            error_code=RunErrorCode.CANCELLED,
            error="cancelled by " + (user.get_username() if user else "an operator"),
            by=Actor.user(user, otherwise="operator"),
        )
    return run


def retry_run(*, run_id: UUID | str, user: User | None = None) -> Run:
    """Retry a failed run from the step that failed, not from scratch (the dead-letter action).

    The failed model step goes back to pending with a fresh set of attempts, the run to
    running, and a worker takes it; every step that succeeded before stays as it was. Audited
    as ``run.retried`` with the error it had. Raises RunNotRetryable for a run that did not
    fail, failed on no step (a budget or a policy: it would fail again the same way), or whose
    session has moved on to a later run.
    """
    with transaction.atomic(), audit.batched():
        run = transitions.lock_run(run_id)
        if run is None:
            raise Run.DoesNotExist(f"no run {run_id}")
        if run.status != Run.Status.FAILED:
            raise RunNotRetryable(f"run {run.pk} is {run.status}: only failed runs are retried")
        last = run.steps.order_by("-index").first()
        if last is None or last.kind != Step.Kind.MODEL or last.status != Step.Status.FAILED:
            raise RunNotRetryable(
                f"run {run.pk} failed on {run.error_code or 'its policy'}, not on a step: "
                "a retry would fail the same way"
            )
        if (
            run.session_id is not None
            and Run.objects.filter(session_id=run.session_id, created_at__gt=run.created_at)
            .exclude(status=Run.Status.QUEUED)
            .exists()
        ):
            raise RunNotRetryable(
                f"run {run.pk}: a later run of its session has started since; retrying it "
                "would answer out of order"
            )
        transitions.reopen_failed_run(run, step=last, by=Actor.user(user, otherwise="operator"))
    return run


@transaction.atomic
def set_provider_api_key(*, provider: ModelProvider, api_key: str) -> None:
    """Store a provider key encrypted; the plain key is never saved or shown back."""
    provider.api_key_encrypted = encrypt(api_key)
    provider.save(update_fields=["api_key_encrypted", "updated_at"])
    audit.record(
        AuditAction.PROVIDER_KEY_CHANGED,
        payload={"provider": provider.name, "cleared": not api_key},
        by=Actor.system("admin"),
    )


@transaction.atomic
def create_api_key(*, user: User, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``user``; returns the row and the plain key, which is never stored."""
    plain, prefix = apikeys.generate()
    key = ApiKey.objects.create(
        user=user, name=name, prefix=prefix, key_hash=apikeys.hash_key(plain)
    )
    audit.record(
        AuditAction.API_KEY_CREATED,
        payload={"prefix": prefix, "user": user.get_username(), "name": name},
    )
    return key, plain


@transaction.atomic
def revoke_api_key(*, api_key: ApiKey, by: User | None = None) -> None:
    """Revoke a key at once; requests with it answer 401 from now on."""
    if ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    ):
        audit.record(
            AuditAction.API_KEY_REVOKED,
            payload={"prefix": api_key.prefix},
            by=Actor.user(by, otherwise="admin"),
        )
