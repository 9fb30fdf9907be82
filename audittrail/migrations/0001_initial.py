"""The seal chain's tables, and append-only triggers on the audit events and their seals.

The triggers refuse UPDATE and DELETE, row by row, on PostgreSQL (on SQLite, the development
default, there are none; the models refuse in Python as before). TRUNCATE is not refused: the
test framework empties tables with it between tests. In production, revoke TRUNCATE (and
ALTER, i.e. do not let the application role own the tables) from the role the application
connects as; whatever gets past that still breaks the chain, which ``verify_audit`` reports.
"""

import django.utils.timezone
from django.db import migrations, models

PROTECTED_TABLES = ("agents_auditevent", "audittrail_auditseal")


def create_triggers(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    # params=None: the SQL goes to Postgres as written (its % are not placeholders).
    schema_editor.execute(
        """
        CREATE FUNCTION audittrail_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit events are append-only: % on % refused',
                TG_OP, TG_TABLE_NAME;
        END
        $$
        """,
        params=None,
    )
    for table in PROTECTED_TABLES:
        schema_editor.execute(
            f"CREATE TRIGGER audittrail_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audittrail_refuse_change()",
            params=None,
        )


def drop_triggers(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in PROTECTED_TABLES:
        schema_editor.execute(
            f"DROP TRIGGER IF EXISTS audittrail_append_only ON {table}", params=None
        )
    schema_editor.execute("DROP FUNCTION IF EXISTS audittrail_refuse_change()", params=None)


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("agents", "0005_remove_agent_tools"),
    ]

    operations = [
        migrations.CreateModel(
            name="AuditSeal",
            fields=[
                ("seq", models.BigIntegerField(primary_key=True, serialize=False)),
                ("event_id", models.BigIntegerField(unique=True)),
                ("prev_hash", models.CharField(max_length=64)),
                ("hash", models.CharField(max_length=64)),
                ("sealed_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "ordering": ["seq"],
            },
        ),
        migrations.CreateModel(
            name="SealHorizon",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("settled_id", models.BigIntegerField(default=0)),
                ("candidate_id", models.BigIntegerField(null=True)),
                ("candidate_transactions", models.JSONField(default=list)),
            ],
        ),
        migrations.RunPython(create_triggers, drop_triggers),
    ]
