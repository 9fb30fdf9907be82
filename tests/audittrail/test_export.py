"""export_audit writes one JSON object per line, oldest first, with the event's seal."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from agents.services import submit_run
from audittrail import chain
from audittrail.models import AuditEvent, AuditSeal, SealHorizon
from tests.support.audittrail import add_events

pytestmark = pytest.mark.django_db(transaction=True)

KEYS = {
    "id",
    "created_at",
    "actor_type",
    "actor",
    "action",
    "run_id",
    "step_index",
    "trace_id",
    "payload",
    "seal_seq",
    "seal_hash",
}


def export(*args: str) -> tuple[list[dict], str]:
    out, err = StringIO(), StringIO()
    call_command("export_audit", *args, stdout=out, stderr=err)
    return [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_events_are_written_as_json_lines_with_their_seals(make_agent, tmp_path, monkeypatch):
    # The run is only a source of events: no worker (the session's may be running) may take
    # it and write more while the export is compared with the table.
    monkeypatch.setattr("agents.services.advance_run_on_commit", lambda *args, **kwargs: None)
    run = submit_run(agent=make_agent(), input="hello")
    add_events(1, note="naïve café ☕")
    chain.seal()
    [unsealed] = add_events(1)
    target = tmp_path / "audit.jsonl"

    out, err = StringIO(), StringIO()
    call_command("export_audit", "--output", str(target), stdout=out, stderr=err)

    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    events = list(AuditEvent.objects.order_by("id"))
    assert [line["id"] for line in lines] == [e.pk for e in events]
    assert all(set(line) == KEYS for line in lines)
    for line, event in zip(lines, events, strict=True):
        assert line["created_at"] == event.created_at.isoformat()
        assert line["payload"] == event.payload
        assert (line["action"], line["actor"], line["step_index"]) == (
            event.action,
            event.actor,
            event.step_index,
        )
    submitted = next(line for line in lines if line["action"] == "run.submitted")
    assert (submitted["run_id"], submitted["trace_id"]) == (str(run.pk), run.trace_id)
    seals = {s.event_id: s for s in AuditSeal.objects.all()}
    for line in lines[:-1]:
        assert (line["seal_seq"], line["seal_hash"]) == (
            seals[line["id"]].seq,
            seals[line["id"]].hash,
        )
    assert lines[-1]["id"] == unsealed and lines[-1]["seal_seq"] is None
    assert lines[-1]["seal_hash"] is None
    assert any(line["payload"].get("note") == "naïve café ☕" for line in lines)
    assert out.getvalue() == ""
    # The unsealed event's id is not known final yet (a lower id could still commit): the next
    # export starts below it and gives it again, rather than risk missing one.
    settled = SealHorizon.objects.get().settled_id
    assert settled < unsealed
    assert err.getvalue().strip() == (
        f"exported {len(lines)} events to {target}; the last id is {unsealed}; resume with "
        f"--after-id {settled} (later events may still be committing: some lines will come again)"
    )
    chain.seal()
    lines, err = export("--after-id", str(settled))
    assert [line["id"] for line in lines] == [unsealed] and lines[0]["seal_seq"] is not None
    assert err.strip().endswith(f"the last id is {unsealed}; resume with --after-id {unsealed}")


def test_after_id_and_since_select_the_events():
    ids = add_events(5)
    lines, err = export("--after-id", str(ids[2]))
    assert [line["id"] for line in lines] == ids[3:]

    assert export("--since", (timezone.now() + timedelta(hours=1)).isoformat()) == (
        [],
        "exported 0 events\n",
    )
    lines, _ = export("--since", (timezone.now() - timedelta(hours=1)).isoformat())
    assert [line["id"] for line in lines][-5:] == ids
    lines, _ = export("--since", "2000-01-01")
    assert len(lines) == AuditEvent.objects.count()


def test_a_bad_since_is_refused_with_its_reason():
    with pytest.raises(CommandError, match="--since 'yesterday' is not an ISO 8601 date"):
        export("--since", "yesterday")
    with pytest.raises(CommandError, match="not an ISO 8601"):
        export("--since", "2025-13-45")


def test_an_unwritable_output_is_refused(tmp_path):
    with pytest.raises(CommandError, match=f"cannot write {tmp_path}"):
        export("--output", str(tmp_path))  # a directory
