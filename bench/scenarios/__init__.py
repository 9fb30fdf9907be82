"""The scenarios, each ``run(ctx, result)`` filling its ScenarioResult (raising HarnessError when
the bench breaks). ``api`` runs first, before any worker starts (its runs must stay queued);
``idle`` last, with beat added."""

from __future__ import annotations

from collections.abc import Callable

from . import api, approval, engine, idle, io
from .base import Context, ScenarioResult

Scenario = Callable[[Context, ScenarioResult], None]

WITHOUT_WORKERS: dict[str, Scenario] = {"api": api.run}
WITH_WORKERS: dict[str, Scenario] = {
    "engine": engine.run,
    "io": io.run,
    "approval": approval.run,
    "idle": idle.run,
}
