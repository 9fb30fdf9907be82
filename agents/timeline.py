"""A run's timeline for its admin page: steps and approvals as bars on one time axis.

``build_timeline`` is pure (instances in, geometry out: percentages of the axis, computed here so
the template needs no arithmetic and no JavaScript); ``run_timeline`` reads what it needs in two
queries, however long the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from django.db.models import Count, Window
from django.urls import reverse
from django.utils.text import Truncator

from approvals.models import Approval

from .models import Run, Step

# Rows beyond this are counted, not drawn: a page of thousands of bars helps nobody.
MAX_STEPS = 200
MAX_APPROVALS = 200
ERROR_CHARS = 120  # in the row; the bar's title carries more
TITLE_ERROR_CHARS = 500
TARGET_TICKS = 5
# Tick spacings, in seconds, that read as round numbers (beyond a day: whole days).
TICK_STEPS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
)
DAY = 86400


@dataclass(frozen=True)
class Bar:
    """A span of the axis in percent of its length (a width of 0 is a point in time)."""

    left: float
    width: float

    @property
    def style(self) -> str:
        # Formatted here, not in the template: a localized "12,5%" would be invalid CSS.
        return f"left:{self.left:.2f}%;width:{self.width:.2f}%"


@dataclass(frozen=True)
class Tick:
    label: str
    left: float

    @property
    def style(self) -> str:
        return f"left:{self.left:.2f}%"

    @property
    def align(self) -> str:
        """Labels at the ends stay inside the axis."""
        if self.left < 5:
            return "start"
        return "end" if self.left > 95 else "middle"


@dataclass(frozen=True)
class StepRow:
    is_approval: ClassVar[bool] = False

    index: int
    kind: str
    what: str  # the model route of a model step, the tool of a tool step
    status: str
    attempts: int
    input_tokens: int
    output_tokens: int
    cost: Decimal
    queued_ms: int | None
    executing_ms: int | None
    open: bool  # the last span runs to now: its figure is "so far"
    error: str  # truncated
    parent_index: int | None
    parallel: int  # tool calls of this step's model turn (0 for a model step)
    queued: Bar | None
    executing: Bar | None
    marker: Bar | None  # a step not started yet: where it was queued
    title: str


@dataclass(frozen=True)
class ApprovalRow:
    is_approval: ClassVar[bool] = True

    step_index: int
    reason: str
    tool_name: str
    status: str
    reviewer: str
    requested_ms: int  # from the run's start
    wait_ms: int
    pending: bool
    bar: Bar
    url: str
    title: str


@dataclass(frozen=True)
class Timeline:
    run_status: str
    active: bool
    duration_ms: int
    rows: list[StepRow | ApprovalRow]
    ticks: list[Tick]
    grid_step: float  # percent of the axis between two ticks (0: no grid)
    shown_steps: int
    hidden_steps: int
    hidden_approvals: int

    @property
    def duration_label(self) -> str:
        seconds = self.duration_ms / 1000
        if seconds < 1:
            return f"{self.duration_ms} ms"
        if seconds < 120:
            return f"{seconds:.2f} s"
        whole = round(seconds)
        if whole < 7200:
            minutes, rest = divmod(whole, 60)
            return f"{minutes} min {rest} s"
        hours, rest = divmod(whole, 3600)
        return f"{hours} h {rest // 60} min"

    @property
    def grid_css(self) -> str:
        """A hairline under each tick, drawn by the bar tracks' background."""
        if self.grid_step <= 0:
            return "none"
        return (
            "repeating-linear-gradient(to right, var(--hairline-color, #ddd) 0 1px, "
            f"transparent 1px {self.grid_step:.4f}%)"
        )


def _ms(start: datetime, end: datetime) -> int:
    return max(0, round((end - start).total_seconds() * 1000))


def _axis_end(
    run: Run, steps: Sequence[Step], approvals: Sequence[Approval], now: datetime
) -> datetime:
    if run.status in Run.ACTIVE_STATUSES:
        end = now
    elif run.finished_at is not None:
        end = run.finished_at
    else:  # a final run without its end recorded: the last thing known to have happened
        moments = [
            t for s in steps for t in (s.created_at, s.started_at, s.finished_at) if t is not None
        ] + [t for a in approvals for t in (a.created_at, a.decided_at) if t is not None]
        end = max(moments, default=run.created_at)
    return max(end, run.created_at)


def _tick_step(total_s: float) -> float:
    target = total_s / TARGET_TICKS
    for step in TICK_STEPS:
        if step >= target:
            return float(step)
    return float(DAY * -(-target // DAY))


def _tick_label(seconds: float, step: float) -> str:
    if seconds == 0:
        return "0 s"
    if step < 1:
        decimals = len(f"{step:g}".split(".")[1])
        return f"{seconds:.{decimals}f} s"
    if step < 60:
        return f"{seconds:.0f} s"
    if step < 3600:
        return f"{seconds / 60:g} min"
    if step < DAY:
        return f"{seconds / 3600:g} h"
    return f"{seconds / DAY:g} d"


def _ticks(total_s: float) -> tuple[list[Tick], float]:
    if total_s <= 0:
        return [Tick("0 s", 0.0)], 0.0
    step = _tick_step(total_s)
    count = int(total_s / step + 1e-9)
    ticks = [
        Tick(_tick_label(k * step, step), round(k * step / total_s * 100, 2))
        for k in range(count + 1)
    ]
    return ticks, step / total_s * 100


def build_timeline(
    run: Run,
    steps: Sequence[Step],
    approvals: Sequence[Approval],
    now: datetime,
    *,
    total_steps: int | None = None,
    total_approvals: int | None = None,
    limit: int = MAX_STEPS,
) -> Timeline:
    """The timeline of ``run`` from its steps (in index order) and approvals, at ``now``.

    The axis runs from the run's creation to its end, or to ``now`` while it is active; spans
    outside it are clipped to it. Only the first ``limit`` steps are drawn; ``total_steps`` and
    ``total_approvals`` (when the caller read only some) say how many there are in all, so the
    page can say how many are not shown. An approval is placed after the step it is about;
    approvals about steps not drawn are counted as hidden.
    """
    start = run.created_at
    shown = list(steps[:limit])
    end = _axis_end(run, shown, approvals, now)
    total = end - start
    active = run.status in Run.ACTIVE_STATUSES

    def pct(moment: datetime) -> float:
        if not total:
            return 0.0
        return min(100.0, max(0.0, (moment - start) / total * 100))

    def bar(begin: datetime, finish: datetime) -> Bar:
        left = round(pct(begin), 2)
        return Bar(left, round(max(0.0, round(pct(finish), 2) - left), 2))

    turn_sizes = Counter(s.parent_index for s in shown if s.kind == Step.Kind.TOOL)
    step_rows: list[StepRow] = []
    for step in shown:
        what = step.tool_name if step.kind == Step.Kind.TOOL else step.model_route
        queued = executing = marker = None
        queued_ms = executing_ms = None
        is_open = False
        if step.started_at is not None:
            queued = bar(step.created_at, step.started_at)
            queued_ms = _ms(step.created_at, step.started_at)
            until = step.finished_at or end
            executing = bar(step.started_at, until)
            is_open = step.finished_at is None and active
            executing_ms = (
                step.latency_ms if step.latency_ms is not None else _ms(step.started_at, until)
            )
        elif step.finished_at is not None:  # ended without running (refused, cancelled)
            queued = bar(step.created_at, step.finished_at)
            queued_ms = _ms(step.created_at, step.finished_at)
        else:  # not taken yet: a marker where it was queued, the wait so far in words
            marker = bar(step.created_at, step.created_at)
            queued_ms = _ms(step.created_at, end)
            is_open = active
        so_far = " so far" if is_open else ""
        title = f"#{step.index} {step.kind} {what}: {step.status}"
        if queued_ms is not None:
            title += f"; queued {queued_ms} ms" + ("" if executing_ms is not None else so_far)
        if executing_ms is not None:
            title += f"; executing {executing_ms} ms{so_far}"
        if step.error:
            title += f"; error: {Truncator(step.error).chars(TITLE_ERROR_CHARS)}"
        step_rows.append(
            StepRow(
                index=step.index,
                kind=step.kind,
                what=what,
                status=step.status,
                attempts=step.attempts,
                input_tokens=step.input_tokens,
                output_tokens=step.output_tokens,
                cost=step.cost,
                queued_ms=queued_ms,
                executing_ms=executing_ms,
                open=is_open,
                error=Truncator(step.error).chars(ERROR_CHARS),
                parent_index=step.parent_index,
                parallel=turn_sizes[step.parent_index] if step.kind == Step.Kind.TOOL else 0,
                queued=queued,
                executing=executing,
                marker=marker,
                title=title,
            )
        )

    approval_rows: list[ApprovalRow] = []
    for approval in sorted(approvals, key=lambda a: (a.step_index, a.created_at)):
        pending = approval.status == Approval.Status.PENDING
        if approval.decided_at is not None:
            decided = approval.decided_at
        else:  # pending: waiting until now; ended without a decision time: a point
            decided = end if pending else approval.created_at
        reviewer = approval.decided_by.get_username() if approval.decided_by else ""
        wait_ms = _ms(approval.created_at, decided)
        subject = approval.tool_name or "the answer"
        title = (
            f"approval of #{approval.step_index} {subject} ({approval.get_reason_display()}): "
            f"{approval.status}; waited {wait_ms} ms{' so far' if pending else ''}"
            + (f"; reviewer {reviewer}" if reviewer else "")
        )
        approval_rows.append(
            ApprovalRow(
                step_index=approval.step_index,
                reason=approval.get_reason_display(),
                tool_name=approval.tool_name,
                status=approval.status,
                reviewer=reviewer,
                requested_ms=_ms(start, approval.created_at),
                wait_ms=wait_ms,
                pending=pending,
                bar=bar(approval.created_at, decided),
                url=reverse("admin:approvals_approval_change", args=[approval.pk]),
                title=title,
            )
        )

    total_steps = len(steps) if total_steps is None else total_steps
    hidden_steps = max(0, total_steps - len(shown))
    # Approvals go after the step they are about; those about steps not drawn are hidden.
    rows: list[StepRow | ApprovalRow] = []
    waiting = approval_rows
    for row in step_rows:
        rows.extend(a for a in waiting if a.step_index < row.index)
        waiting = [a for a in waiting if a.step_index >= row.index]
        rows.append(row)
        rows.extend(a for a in waiting if a.step_index == row.index)
        waiting = [a for a in waiting if a.step_index > row.index]
    if not hidden_steps:
        rows.extend(waiting)
        waiting = []
    placed = len(approval_rows) - len(waiting)
    total_approvals = len(approvals) if total_approvals is None else total_approvals

    total_s = total.total_seconds()
    ticks, grid_step = _ticks(total_s)
    return Timeline(
        run_status=run.status,
        active=active,
        duration_ms=_ms(start, end),
        rows=rows,
        ticks=ticks,
        grid_step=grid_step,
        shown_steps=len(shown),
        hidden_steps=hidden_steps,
        hidden_approvals=max(0, total_approvals - placed),
    )


def run_timeline(run: Run, *, now: datetime, limit: int | None = None) -> Timeline:
    """The timeline of ``run``, in two queries (steps, approvals) however many rows it has:
    the first ``limit`` steps (MAX_STEPS by default) and MAX_APPROVALS approvals.

    The large JSON columns (prompts, responses, context) are not read: the timeline shows none.
    """
    limit = MAX_STEPS if limit is None else limit
    steps = list(
        Step.objects.filter(run=run)
        .defer("request", "response")
        .annotate(in_all=Window(Count("id")))
        .order_by("index")[:limit]
    )
    approvals = list(
        Approval.objects.filter(run=run)
        .select_related("decided_by")
        .defer(
            "context",
            "proposed_arguments",
            "proposed_output",
            "approved_arguments",
            "approved_output",
        )
        .annotate(in_all=Window(Count("id")))
        .order_by("step_index", "created_at")[:MAX_APPROVALS]
    )
    return build_timeline(
        run,
        steps,
        approvals,
        now,
        total_steps=getattr(steps[0], "in_all", len(steps)) if steps else 0,
        total_approvals=getattr(approvals[0], "in_all", len(approvals)) if approvals else 0,
        limit=limit,
    )
