"""How the suite runs on several processes (pytest-xdist, ``--dist loadgroup``; README, Testing).

Loaded with ``-p tests.support.parallel`` (pyproject's addopts), before Django reads its
settings: each xdist worker (gw0, gw1...) takes a Redis key prefix of its own, the suite's
prefix plus its id, so its keys, its Celery queues (kombu's global_keyprefix is the same prefix)
and the session's Celery worker it starts are its own; pytest-django gives it a database of its
own (the test database's name with ``_gw0``...). Nothing a test does is seen by another xdist
worker's tests.

Tests that run real processes are grouped (``xdist_group``): the tests of one group run one
after the other on one xdist worker. Those that use the session's Celery worker form a few groups
(each xdist worker that takes one starts its own Celery worker, lazily, when the first of them
asks); the chaos and demo runs, which start whole deployments, run in groups of their own and are
handed out first, so they overlap the rest of the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    os.environ["AGENTSITE_REDIS_KEY_PREFIX"] = (
        os.environ.get("AGENTSITE_REDIS_KEY_PREFIX", "") + f"{_worker}:"
    )

# Started first (xdist hands out work in collection order with --no-loadscope-reorder): the
# longest tests, each a whole deployment of real processes; then the groups, then the rest.
FIRST = ("tests/integration/test_chaos.py", "tests/integration/test_demo.py")
# The tests that use the session's Celery worker are spread over this many groups by module;
# each group's xdist worker runs a Celery worker of its own.
WORKER_GROUPS = 3
# Fixtures that start a real process the xdist worker keeps for the session.
SESSION_PROCESSES = {"celery_worker": "worker", "api_server": "worker"}


def _module(item: pytest.Item) -> str:
    return Path(str(item.path)).relative_to(item.config.rootpath).as_posix()


def _group(item: pytest.Item, worker_modules: list[str]) -> str | None:
    module = _module(item)
    if module in FIRST:
        return Path(module).stem.removeprefix("test_")
    if any(name in item.fixturenames for name in SESSION_PROCESSES):
        return f"worker-{worker_modules.index(module) % WORKER_GROUPS}"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of real processes with their group, and put the longest first."""
    # schemathesis names one test per API operation (``test_x[GET /api/v1/agents/]``) but, under
    # pytest 9, leaves them one node id; xdist hands out tests by node id and would run one of
    # them: each gets the id its name says.
    for item in items:
        if not item.nodeid.endswith(item.name) and item.parent is not None:
            item._id = item.parent.id.child(item.name)
    worker_modules = sorted(
        {_module(i) for i in items if any(n in i.fixturenames for n in SESSION_PROCESSES)}
    )
    for item in items:
        group = _group(item, worker_modules)
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
        if group is not None:
            item.add_marker(pytest.mark.processes)  # make test-fast leaves these out
    # Then the worker groups, then the rest (a stable sort: each module keeps its order).
    rank = {module: n for n, module in enumerate(FIRST)}

    def order(item: pytest.Item) -> int:
        if _module(item) in rank:
            return rank[_module(item)]
        marker = item.get_closest_marker("xdist_group")
        return len(FIRST) if marker is not None else len(FIRST) + 1

    items.sort(key=order)
