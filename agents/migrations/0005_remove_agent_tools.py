from django.db import migrations


class Migration(migrations.Migration):
    """Agent.tools became ToolGrant rows (tools 0002 moved them)."""

    dependencies = [
        ("agents", "0004_agentversion_grants_step_awaiting_approval"),
        ("tools", "0002_catalogue_grants_outbox"),
    ]

    operations = [
        migrations.RemoveField(model_name="agent", name="tools"),
    ]
