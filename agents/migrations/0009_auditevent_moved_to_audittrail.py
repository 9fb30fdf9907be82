"""AuditEvent now belongs to the audittrail app (its migration 0002): removed from this app's
state only; the table, ``agents_auditevent``, stays as it is."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0008_step_finished_latency_index"),
        ("audittrail", "0002_auditevent"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="AuditEvent")],
            database_operations=[],
        ),
    ]
