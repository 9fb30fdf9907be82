"""The audit events' content type moves with the model, from ``agents`` to ``audittrail``.

Permissions hang on the content type, so moving it keeps every grant: a group or user that
could view audit events as ``agents.view_auditevent`` can as ``audittrail.view_auditevent``,
and the admin's history (LogEntry) follows too. Where both content types exist already (a
``migrate`` run in between created the new one), the grants of the old permissions are added
to the new ones and the old content type is deleted."""

from django.db import migrations

MODEL = "auditevent"


def _move(apps, schema_editor, source, target):
    ContentType = apps.get_model("contenttypes", "ContentType")
    Permission = apps.get_model("auth", "Permission")
    db = schema_editor.connection.alias
    types = ContentType.objects.using(db)
    old = types.filter(app_label=source, model=MODEL).first()
    if old is None:  # a fresh database: post_migrate creates the new one
        return
    new = types.filter(app_label=target, model=MODEL).first()
    if new is None:
        old.app_label = target
        old.save(update_fields=["app_label"])
    else:
        permissions = Permission.objects.using(db)
        for previous in permissions.filter(content_type=old):
            current, _ = permissions.get_or_create(
                content_type=new,
                codename=previous.codename,
                defaults={"name": previous.name},
            )
            current.group_set.add(*previous.group_set.all())
            current.user_set.add(*previous.user_set.all())
        LogEntry = apps.get_model("admin", "LogEntry")
        LogEntry.objects.using(db).filter(content_type=old).update(content_type=new)
        old.delete()  # and its permissions, whose grants were copied above
    ContentType.objects.clear_cache()


def forwards(apps, schema_editor):
    _move(apps, schema_editor, "agents", "audittrail")


def backwards(apps, schema_editor):
    _move(apps, schema_editor, "audittrail", "agents")


class Migration(migrations.Migration):
    dependencies = [
        ("audittrail", "0002_auditevent"),
        ("agents", "0009_auditevent_moved_to_audittrail"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("admin", "0003_logentry_add_action_flag_choices"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
