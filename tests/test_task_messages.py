"""What the workers refuse before Celery unpacks a task message (agentsite.celery)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agents.tasks import advance_run, execute_tool_call
from agentsite.celery import message_problem

RUN = "9b1f0c1e-63a4-4c55-9c55-6a3c2f0e8f11"
GOOD = {"id": "t-1", "task": "agents.advance_run"}


def message(payload: object, **headers: object) -> SimpleNamespace:
    return SimpleNamespace(headers={**GOOD, **headers}, payload=payload)


def test_a_well_formed_message_passes():
    assert message_problem(advance_run, message([[RUN], {}, None])) == ""
    assert message_problem(advance_run, message([[], {"run_id": RUN}, {}])) == ""
    assert message_problem(execute_tool_call, message([[RUN, 2], {}, {"callbacks": None}])) == ""


@pytest.mark.parametrize(
    ("payload", "headers", "problem"),
    [
        (5, {}, "the body is a int"),
        (None, {}, "the body is a NoneType"),
        ({"run_id": RUN}, {}, "the body is a dict"),
        ([[RUN], {}], {}, "the body is a list, not [args, kwargs, embed]"),
        ([RUN, {}, {}], {}, "args is a str"),
        ([[RUN], [], {}], {}, "kwargs is a list"),
        ([[RUN], {}, 5], {}, "embed is a int"),
        ([[RUN], {}, {}], {"id": None}, "its 'id' header is missing"),
        ([[RUN], {}, {}], {"task": 3}, "its 'task' header is missing or not a string"),
        ([[], {}, {}], {}, "its arguments do not fit agents.advance_run"),
        ([[RUN, "extra"], {}, {}], {}, "its arguments do not fit agents.advance_run"),
        ([[RUN], {"nope": 1}, {}], {}, "its arguments do not fit agents.advance_run"),
    ],
)
def test_a_malformed_message_is_named(payload, headers, problem):
    assert problem in message_problem(advance_run, message(payload, **headers))
