# manage.py stats reads the latencies of the steps finished in a window. The steps table is the
# engine's busiest: on Postgres the index is built CONCURRENTLY, so that runs go on (writes are
# not locked) while it builds on a large table; elsewhere (SQLite, development) as usual.

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.AddIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
        else:
            migrations.AddIndex.database_backwards(
                self, app_label, schema_editor, from_state, to_state
            )


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("agents", "0007_run_trace_span_id"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="step",
            index=models.Index(
                condition=models.Q(("latency_ms__isnull", False)),
                fields=["finished_at"],
                name="step_finished_latency",
            ),
        ),
    ]
