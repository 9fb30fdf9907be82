from django.apps import AppConfig
from django.db.models.signals import post_migrate

REVIEWERS_GROUP = "reviewers"
# Exactly what a reviewer needs: see the queue and decide. Not agents, tools or grants.
REVIEWER_PERMISSIONS = ("view_approval", "decide_approval")


class ApprovalsConfig(AppConfig):
    name = "approvals"
    verbose_name = "Approvals"

    def ready(self) -> None:
        post_migrate.connect(ensure_reviewers_group, sender=self)

        from . import metrics

        metrics.register()


def ensure_reviewers_group(sender: AppConfig, using: str = "default", **kwargs: object) -> None:
    """The ``reviewers`` group exists with exactly the reviewer permissions (after migrate)."""
    from django.contrib.auth.models import Group, Permission

    group, _ = Group.objects.using(using).get_or_create(name=REVIEWERS_GROUP)
    permissions = Permission.objects.using(using).filter(
        content_type__app_label="approvals", codename__in=REVIEWER_PERMISSIONS
    )
    group.permissions.set(permissions)
