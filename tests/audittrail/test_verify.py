"""verify_audit passes an intact trail and names each kind of tampering, one line each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.db import connection

from audittrail import chain
from audittrail.models import AuditEvent, AuditSeal
from tests.support.audittrail import add_events, triggers_off, verify

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
HEAD = re.compile(r"head seq (\d+) hash ([0-9a-f]{64})")


def seal_of(event_id: int) -> int:
    return AuditSeal.objects.get(event_id=event_id).seq


def problems(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("CommandError:")]


def test_an_intact_trail_passes_with_a_summary():
    ids = add_events(4)
    status, out, err = verify()
    assert status == 0 and err == ""
    total = AuditEvent.objects.count()
    head = AuditSeal.objects.order_by("-seq").first()
    assert head.event_id == ids[-1]
    assert out.strip() == (
        f"audit trail intact: {total} events, {total} sealed, head seq {head.seq} hash {head.hash}"
    )


def test_events_not_yet_sealed_are_counted_not_reported():
    add_events(2)
    chain.seal()
    add_events(3)
    status, out, _ = verify("--no-seal")
    assert status == 0
    assert out.strip().endswith("; 3 recent events not yet sealed")


def test_the_json_report():
    add_events(2)
    status, out, _ = verify("--json")
    report = json.loads(out)
    assert status == 0 and report["intact"] is True and report["problems"] == []
    assert report["events"] == report["sealed"] == AuditEvent.objects.count()
    head = AuditSeal.objects.order_by("-seq").first()
    assert report["head"] == {"seq": head.seq, "event_id": head.event_id, "hash": head.hash}

    with triggers_off() as cursor:
        cursor.execute("DELETE FROM agents_auditevent WHERE id = %s", [head.event_id])
    status, out, _ = verify("--json")
    report = json.loads(out)
    assert status == 1 and report["intact"] is False
    assert report["problems"] == [f"event {head.event_id} removed (seal {head.seq} points to it)"]


def test_an_event_edited_with_the_trigger_disabled_is_named():
    ids = add_events(3)
    chain.seal()
    with triggers_off() as cursor:
        cursor.execute(
            "UPDATE agents_auditevent SET payload = '{\"n\": 99}'::jsonb WHERE id = %s", [ids[1]]
        )
    status, _, err = verify()
    assert status == 1
    assert problems(err) == [
        f"event {ids[1]} altered (its hash does not match seal {seal_of(ids[1])})"
    ]
    assert err.splitlines()[-1].startswith("CommandError: audit trail NOT intact: 1 problem,")


def test_a_deleted_event_is_named():
    ids = add_events(3)
    chain.seal()
    seq = seal_of(ids[1])
    with triggers_off() as cursor:
        cursor.execute("DELETE FROM agents_auditevent WHERE id = %s", [ids[1]])
    status, _, err = verify()
    assert status == 1
    assert problems(err) == [f"event {ids[1]} removed (seal {seq} points to it)"]


def test_an_event_inserted_between_sealed_ones_is_named():
    [before] = add_events(1)
    with connection.cursor() as cursor:  # an id taken and never used, as by a rollback
        cursor.execute("SELECT nextval(pg_get_serial_sequence('agents_auditevent', 'id'))")
        [gap] = cursor.fetchone()
    [after] = add_events(1)
    chain.seal()
    assert verify()[0] == 0  # the gap is no problem

    with triggers_off() as cursor:
        cursor.execute(
            "INSERT INTO agents_auditevent (id, created_at, actor_type, actor, action, "
            "step_index, trace_id, payload) VALUES (%s, now(), 'user', 'mallory', "
            "'run.approved', NULL, '', '{}')",
            [gap],
        )
    status, _, err = verify()
    assert status == 1
    assert problems(err) == [
        f"event {gap} inserted outside the chain "
        f"(between seal {seal_of(before)} and seal {seal_of(after)})"
    ]


def test_an_event_inserted_with_an_id_the_sequence_never_gave_is_named():
    add_events(2)
    with connection.cursor() as cursor:
        cursor.execute("SELECT max(id) + 1000 FROM agents_auditevent")
        [forged] = cursor.fetchone()
        cursor.execute(
            "INSERT INTO agents_auditevent (id, created_at, actor_type, actor, action, "
            "trace_id, payload) VALUES (%s, now(), 'user', 'mallory', 'run.approved', '', '{}')",
            [forged],
        )
    status, _, err = verify()
    assert status == 1
    assert problems(err) == [
        f"event {forged} inserted outside the chain "
        "(its id was never handed out by the id sequence)"
    ]


def test_a_removed_tail_is_caught_with_the_expected_head():
    ids = add_events(4)
    status, out, _ = verify()
    seq, digest = HEAD.search(out).groups()
    assert status == 0 and verify("--expect-head", f"{seq}:{digest}")[0] == 0

    # The last two events go, with their seals: what is left is a consistent, shorter chain.
    with triggers_off() as cursor:
        cursor.execute("DELETE FROM agents_auditevent WHERE id >= %s", [ids[2]])
        cursor.execute("DELETE FROM audittrail_auditseal WHERE event_id >= %s", [ids[2]])
    assert verify()[0] == 0  # nothing else can tell
    status, _, err = verify("--expect-head", f"{seq}:{digest}")
    assert status == 1
    assert problems(err) == [
        f"the chain's last seal is {int(seq) - 2}, but the expected head is seal {seq} "
        "(seals were removed from the tail)"
    ]

    # New events sealed over the cut give seal <seq> another hash: caught the same.
    add_events(2)
    status, _, err = verify("--expect-head", f"{seq}:{digest}")
    assert status == 1
    assert problems(err) == [
        f"seal {seq}'s hash is {AuditSeal.objects.get(seq=seq).hash[:16]}…, not the expected "
        f"head's {digest[:16]}… (the chain was rewritten)"
    ]


def test_removed_seals_are_named_with_the_events_they_leave_unsealed():
    add_events(5)
    chain.seal()
    first = AuditSeal.objects.order_by("seq").first().seq
    with triggers_off() as cursor:
        cursor.execute(
            "DELETE FROM audittrail_auditseal WHERE seq IN (%s, %s)", [first + 1, first + 2]
        )
    status, _, err = verify("--no-seal")
    assert status == 1
    assert problems(err) == [
        f"seals {first + 1}-{first + 2} removed (the chain breaks between seal {first} and seal "
        f"{first + 3}; 2 events there are no longer sealed)"
    ]


def test_an_altered_seal_is_told_from_an_altered_event():
    ids = add_events(3)
    chain.seal()
    seq = seal_of(ids[1])
    with triggers_off() as cursor:
        cursor.execute("UPDATE audittrail_auditseal SET hash = %s WHERE seq = %s", ["f" * 64, seq])
    status, _, err = verify()
    assert status == 1
    assert problems(err) == [
        f"seal {seq} altered (its hash matches neither event {ids[1]} nor seal {seq + 1}'s "
        "prev_hash)"
    ]


def test_a_changed_key_is_pointed_out(settings):
    add_events(2)
    chain.seal()
    settings.AGENTSITE_AUDIT_KEY = "another key"
    status, _, err = verify()
    assert status == 1
    assert problems(err)[-1].startswith(
        "every seal fails its hash while the seals link up: AGENTSITE_AUDIT_KEY is not the key"
    )


def test_a_malformed_expected_head_is_refused():
    status, _, err = verify("--expect-head", "12:not-a-hash")
    assert status == 1 and "--expect-head '12:not-a-hash': give SEQ:HASH" in err


def test_the_command_line_exit_status_and_output_have_no_traceback():
    # As chaos/checks.py runs it: a subprocess, judged by its exit status and its last line.
    ids = add_events(2)
    parts = urlsplit(os.environ["DATABASE_URL"])
    env = {
        **os.environ,
        "DATABASE_URL": urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"])),
    }

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "verify_audit"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("audit trail intact: ")

    with triggers_off() as cursor:
        cursor.execute("DELETE FROM agents_auditevent WHERE id = %s", [ids[0]])
    done = run()
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"event {ids[0]} removed" in done.stderr.strip().splitlines()[-1]
