"""GET /api/v1/usage/: a client's tokens, cost and outcomes per agent, version, key, model."""

from __future__ import annotations

from decimal import Decimal

from agents.models import ModelPrice, Run
from agents.services import submit_run
from tests.support.api import assert_error
from tests.support.engine import drive


def test_usage_is_summed_per_agent_version_key_and_model(client_a, client_b, make_agent):
    ModelPrice.objects.create(
        route="scripted:demo", input_per_million=Decimal("2"), output_per_million=Decimal("4")
    )
    agent = make_agent(slug="summed", script=[{"text": "ok"}])
    runs = [
        drive(submit_run(agent=agent, input="x", owner=client_a.user, api_key=client_a.api_key).pk)
        for _ in range(3)
    ]
    failing = make_agent(
        slug="failing", script=[{"fail": "permanent", "message": "no", "text": ""}]
    )
    drive(submit_run(agent=failing, input="x", owner=client_a.user).pk)
    drive(submit_run(agent=agent, input="not alice's", owner=client_b.user).pk)

    body = client_a.get("/api/v1/usage/?group_by=agent").json()
    assert body["group_by"] == "agent"
    groups = {g["agent"]: g for g in body["groups"]}
    assert set(groups) == {"summed", "failing"}  # bob's run is not alice's business
    summed = groups["summed"]
    assert (summed["runs"], summed["succeeded"], summed["failed"]) == (3, 3, 0)
    assert summed["success_rate"] == 1.0 and groups["failing"]["success_rate"] == 0.0
    assert summed["input_tokens"] == sum(r.input_tokens for r in runs) > 0
    assert Decimal(summed["cost"]) == sum(r.cost for r in runs) > 0

    versions = client_a.get("/api/v1/usage/?group_by=version").json()["groups"]
    assert {"agent": "summed", "version": 1, "runs": 3}.items() <= versions[1].items()
    keys = client_a.get("/api/v1/usage/?group_by=api_key").json()["groups"]
    by_key = {g["api_key"]: g["runs"] for g in keys}
    assert by_key == {client_a.api_key.prefix: 3, None: 1}
    models = client_a.get("/api/v1/usage/?group_by=model").json()["groups"]
    assert [(m["model"], m["calls"], m["runs"]) for m in models] == [("scripted:demo", 3, 4)]


def test_usage_filters_by_creation_time(client_a, make_agent):
    agent = make_agent(script=[{"text": "ok"}])
    run = drive(submit_run(agent=agent, input="x", owner=client_a.user).pk)
    after = (run.created_at).isoformat().replace("+00:00", "Z")
    Run.objects.filter(pk=run.pk).update(created_at=run.created_at.replace(year=2020))
    body = client_a.get("/api/v1/usage/", {"since": after}).json()
    assert body["groups"] == []
    body = client_a.get("/api/v1/usage/", {"until": after}).json()
    assert body["groups"][0]["runs"] == 1


def test_bad_usage_queries_answer_400_naming_the_parameter(client_a):
    assert_error(client_a.get("/api/v1/usage/?group_by=planet"), 400, field="group_by")
    assert_error(client_a.get("/api/v1/usage/?since=yesterday"), 400, field="since")
    assert_error(
        client_a.get("/api/v1/usage/?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z"),
        400,
        field="until",
    )
    assert_error(client_a.get("/api/v1/usage/?color=red"), 400, field="color")


def test_a_budget_above_the_agents_is_refused_with_the_field_named(client_a, agent):
    response = client_a.post(
        "/api/v1/runs/",
        {"agent": "helper", "input": "x", "budget": {"max_steps": 10_000}},
        format="json",
    )
    error = assert_error(response, 400, field="budget.max_steps")
    assert "may not exceed the agent's limit" in error["fields"]["budget.max_steps"][0]
    ok = client_a.post(
        "/api/v1/runs/",
        {"agent": "helper", "input": "x", "budget": {"max_steps": 2, "max_cost": 0.25}},
        format="json",
    )
    assert ok.status_code == 202
    assert ok.json()["budget"]["max_steps"] == 2 and ok.json()["budget"]["max_cost"] == "0.250000"
