"""Step.request, typed: rows written before the schema had a version still read; what is
written reads back the same."""

from __future__ import annotations

from agents.engine.requests import SCHEMA_VERSION, ModelStepRequest, ToolStepRequest
from agents.models import Step


def step_with(request: object) -> Step:
    return Step(request=request)


def test_a_model_step_row_from_before_the_version_reads_as_it_was_written():
    legacy = {"tools": ["calculator"], "routine": True, "route_failures": {"a:b": {"transient": 2}}}
    request = ModelStepRequest.of(step_with({**legacy, "throttled": 3}))
    assert request == ModelStepRequest(
        tools=["calculator"], routine=True, route_failures={"a:b": {"transient": 2}}, throttled=3
    )
    assert request.to_json() == {"v": SCHEMA_VERSION, **legacy, "throttled": 3}


def test_a_fresh_model_request_forgets_failures_and_deferrals_only():
    request = ModelStepRequest(tools=["t"], routine=True, route_failures={"r": {}}, throttled=2)
    assert request.fresh().to_json() == {"v": SCHEMA_VERSION, "tools": ["t"], "routine": True}


def test_a_tool_request_keeps_null_arguments_and_says_whether_a_reviewer_edited_it():
    plain = ToolStepRequest.of(step_with({"arguments": None}))
    assert plain.to_json() == {"v": SCHEMA_VERSION, "arguments": None} and not plain.edited
    edited = ToolStepRequest(arguments={"x": 2}, approval="abc", proposed_arguments={"x": 1})
    again = ToolStepRequest.of(step_with(edited.to_json()))
    assert again == edited and again.edited and again.approval == "abc"


def test_an_empty_or_foreign_request_reads_as_defaults():
    assert ModelStepRequest.of(step_with(None)) == ModelStepRequest()
    assert ToolStepRequest.of(step_with(["not", "a", "dict"])) == ToolStepRequest()
