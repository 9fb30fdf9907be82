"""AuditEvent moves from the agents app to this one: in Django's state only.

The table keeps its name (``agents_auditevent``) and its rows, indexes and append-only trigger:
nothing in the database changes, so the seals still vouch for the same events. Migration
agents 0009 removes the model from the agents app's state; 0003 here moves its content type
(and with it the permissions granted on it)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0008_step_finished_latency_index"),
        ("audittrail", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="AuditEvent",
                    fields=[
                        (
                            "id",
                            models.BigAutoField(
                                auto_created=True,
                                primary_key=True,
                                serialize=False,
                                verbose_name="ID",
                            ),
                        ),
                        ("created_at", models.DateTimeField(auto_now_add=True, db_index=True)),
                        (
                            "actor_type",
                            models.CharField(
                                choices=[("system", "System"), ("user", "User"), ("agent", "Agent")],
                                max_length=10,
                            ),
                        ),
                        ("actor", models.CharField(blank=True, max_length=200)),
                        ("action", models.CharField(db_index=True, max_length=64)),
                        ("step_index", models.PositiveIntegerField(blank=True, null=True)),
                        ("trace_id", models.CharField(blank=True, max_length=32)),
                        ("payload", models.JSONField(blank=True, default=dict)),
                        (
                            "run",
                            models.ForeignKey(
                                blank=True,
                                db_constraint=False,
                                null=True,
                                on_delete=django.db.models.deletion.DO_NOTHING,
                                related_name="audit_events",
                                to="agents.run",
                            ),
                        ),
                    ],
                    options={
                        "db_table": "agents_auditevent",
                        "ordering": ["id"],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
