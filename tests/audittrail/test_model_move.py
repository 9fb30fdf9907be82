"""AuditEvent moved from the agents app to audittrail (issue 18): the real migrations, run
backwards and forwards, keep the table and every grant of the old permissions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from approvals.apps import REVIEWERS_GROUP
from audittrail.models import AuditEvent

BEFORE_THE_MOVE = [
    ("agents", "0008_step_finished_latency_index"),
    ("audittrail", "0001_initial"),
]
AFTER_THE_MOVE = [
    ("agents", "0009_auditevent_moved_to_audittrail"),
    ("audittrail", "0003_auditevent_content_type"),
]


def migrate(targets: list[tuple[str, str]]) -> None:
    MigrationExecutor(connection).migrate(targets)
    ContentType.objects.clear_cache()


@pytest.fixture
def before_the_move(db: None) -> Iterator[None]:
    """The database as an installation before the move has it (the test's transaction undoes
    it all), and the migrations applied again afterwards."""
    migrate(BEFORE_THE_MOVE)
    try:
        yield
    finally:
        migrate(AFTER_THE_MOVE)


def test_the_model_keeps_its_table() -> None:
    assert AuditEvent._meta.db_table == "agents_auditevent"
    assert AuditEvent._meta.app_label == "audittrail"


def test_going_back_gives_the_content_type_back_to_agents(before_the_move: None) -> None:
    assert ContentType.objects.filter(app_label="agents", model="auditevent").exists()
    assert not ContentType.objects.filter(app_label="audittrail", model="auditevent").exists()


def test_a_group_and_a_user_keep_their_audit_permissions(before_the_move: None) -> None:
    old = Permission.objects.get(content_type__app_label="agents", codename="view_auditevent")
    auditors = Group.objects.create(name="auditors")
    auditors.permissions.add(old)
    user = User.objects.create_user("auditor", is_staff=True)
    user.user_permissions.add(old)
    reviewers = Group.objects.get(name=REVIEWERS_GROUP)
    reviewer_perms = set(reviewers.permissions.values_list("pk", flat=True))

    migrate(AFTER_THE_MOVE)

    assert set(auditors.permissions.values_list("content_type__app_label", "codename")) == {
        ("audittrail", "view_auditevent")
    }
    fresh = User.objects.get(pk=user.pk)
    assert fresh.has_perm("audittrail.view_auditevent")
    assert not fresh.has_perm("agents.view_auditevent")
    assert set(reviewers.permissions.values_list("pk", flat=True)) == reviewer_perms
    assert not ContentType.objects.filter(app_label="agents", model="auditevent").exists()


def test_grants_are_merged_when_both_content_types_exist(before_the_move: None) -> None:
    """A ``migrate`` that ran post_migrate between the two steps created the new content type
    and its permissions already: the old grants are added to them, the old type goes."""
    old = Permission.objects.get(content_type__app_label="agents", codename="view_auditevent")
    auditors = Group.objects.create(name="auditors")
    auditors.permissions.add(old)
    new_type = ContentType.objects.create(app_label="audittrail", model="auditevent")
    Permission.objects.create(
        content_type=new_type, codename="view_auditevent", name="Can view audit event"
    )

    migrate(AFTER_THE_MOVE)

    assert set(auditors.permissions.values_list("content_type__app_label", "codename")) == {
        ("audittrail", "view_auditevent")
    }
    assert not ContentType.objects.filter(app_label="agents", model="auditevent").exists()
    assert ContentType.objects.get_for_model(AuditEvent).pk == new_type.pk
