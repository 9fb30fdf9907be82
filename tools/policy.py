"""Whether a run may make a tool call, and how: the engine asks here, never the model.

A call is allowed only if the agent holds a grant for the tool both in the version the run
pinned and now (an operator's revocation, disabling or narrowing takes effect on runs already
in flight; a grant added later does not widen them), the tool is enabled and installed, the
arguments validate against the tool's schema, and they satisfy the constraints of both grants.
The stricter mode of the two grants wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentsite import breaker

from . import cumulative
from .constraints import approval_needed, check
from .models import Tool, ToolGrant
from .registry import ToolArgumentsInvalid, ToolSpec, registry

if TYPE_CHECKING:
    from agents.models import AgentVersion, Run


@dataclass
class Authorization:
    """The verdict on one call. ``refusal`` (the model may correct it) and ``unavailable`` (the
    tool's circuit is open) are messages for the model; both empty means the call may go ahead,
    after a reviewer's approval when ``mode`` is ``require_approval``."""

    spec: ToolSpec | None = None
    refusal: str = ""
    unavailable: str = ""
    mode: str = ToolGrant.Mode.ALLOW
    # The rule sets of the version's grant and of the current grant; a value must pass both.
    constraint_sets: tuple[dict[str, Any], ...] = ()
    # Why an ``allow`` grant still needs a reviewer for these arguments (``approve_above``).
    approval_reason: str = ""

    @property
    def allowed(self) -> bool:
        return not (self.refusal or self.unavailable)


def version_grants(version: AgentVersion) -> dict[str, dict[str, Any]]:
    """The grants a version froze; versions from before grants existed allowed their ``tools``."""
    if version.grants:
        return dict(version.grants)
    return {name: {"mode": ToolGrant.Mode.ALLOW, "constraints": {}} for name in version.tools}


def live_grants(agent_id: int) -> dict[str, ToolGrant]:
    """The agent's grants now, with the two catalogue fields the policy reads (this runs on
    every model turn and tool call: the catalogue's JSON schema is not fetched or parsed)."""
    grants = (
        ToolGrant.objects.filter(agent_id=agent_id)
        .select_related("tool")
        .only("mode", "constraints", "tool__name", "tool__enabled")
        .order_by()
    )
    return {g.tool.name: g for g in grants}


def offered_tools(run: Run) -> list[ToolSpec]:
    """The tools shown to the model: granted (then and now), enabled and installed."""
    frozen = version_grants(run.agent_version)
    live = live_grants(run.agent_id)
    specs = []
    for name in sorted(frozen):
        grant = live.get(name)
        spec = registry.get(name)
        if grant is not None and grant.tool.enabled and spec is not None:
            specs.append(spec)
    return specs


def authorize(
    run: Run,
    name: str,
    arguments: Any,
    *,
    arguments_error: str = "",
    live: dict[str, ToolGrant] | None = None,
    step_index: int | None = None,
) -> Authorization:
    """Decide one tool call of ``run`` (the step at ``step_index``; None when it is not
    recorded yet). Nothing here executes the tool. A grant's running totals (``sum_max``,
    ``approve_sum_above``, ``max_calls``: tools.cumulative) are read under the run's lock."""
    frozen = version_grants(run.agent_version).get(name)
    grant = (live if live is not None else live_grants(run.agent_id)).get(name)
    if frozen is None or grant is None:
        return Authorization(refusal=f"tool {name!r} is not available to this agent")
    tool: Tool = grant.tool
    spec = registry.get(name)
    if not tool.enabled:
        return Authorization(spec=spec, refusal=f"tool {name!r} is disabled by an operator")
    # Whether the code is installed is this process's registry's to say (the catalogue's
    # ``available`` reflects the process that last synced it, which may differ).
    if spec is None:
        return Authorization(refusal=f"tool {name!r} is not installed on this server")
    if arguments_error:
        return Authorization(spec=spec, refusal=f"{arguments_error} for {name}")
    try:
        # By alias: the names the model (and the operator writing constraints) sees in the
        # schema. Python mode keeps Decimal and other numbers numeric for min/max. Defaults are
        # included: they are what the tool will run with.
        validated = spec.validate(arguments).model_dump(by_alias=True)
    except ToolArgumentsInvalid as exc:
        return Authorization(spec=spec, refusal=str(exc))
    rule_sets = (dict(frozen.get("constraints") or {}), dict(grant.constraints or {}))
    for rules in rule_sets:
        problem = check(validated, rules)
        if problem:
            return Authorization(
                spec=spec, refusal=f"arguments for {name} break the agent's grant: {problem}"
            )
    modes = {frozen.get("mode"), grant.mode}
    escalation = next((why for r in rule_sets if (why := approval_needed(validated, r))), "")
    running = cumulative.check(run, name, validated, rule_sets, step_index=step_index)
    if running.refusal:
        refusal = f"arguments for {name} break the agent's grant: {running.refusal}"
        return Authorization(spec=spec, refusal=refusal)
    escalation = escalation or running.approval_reason
    mode = (
        ToolGrant.Mode.REQUIRE_APPROVAL
        if ToolGrant.Mode.REQUIRE_APPROVAL in modes or escalation
        else ToolGrant.Mode.ALLOW
    )
    verdict = Authorization(
        spec=spec, mode=mode, constraint_sets=rule_sets, approval_reason=escalation
    )
    state = breaker.status(name)
    if state.state == "open":
        verdict.unavailable = unavailable_message(name, state.retry_in)
    return verdict


def unavailable_message(name: str, retry_in: float) -> str:
    return (
        f"tool {name!r} is temporarily unavailable after repeated failures (circuit open); "
        f"it may be tried again in about {max(1, round(retry_in))} s"
    )
