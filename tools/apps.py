from importlib import import_module

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models.signals import post_migrate

BUILTIN_TOOL_MODULES = (
    "tools.builtin",
    "tools.knowledge",
    "tools.http",
    "tools.email",
    "tools.demo",
)


class ToolsConfig(AppConfig):
    name = "tools"
    verbose_name = "Tools"

    def ready(self) -> None:
        from .registry import registry

        # Importing a module registers its @tool functions: the built-ins, then the project's
        # own (AGENTSITE_TOOL_MODULES), on every web and worker process alike.
        for module in (*BUILTIN_TOOL_MODULES, *settings.AGENTSITE_TOOL_MODULES):
            try:
                import_module(module)
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"AGENTSITE_TOOL_MODULES: cannot import {module!r}: {exc}"
                ) from exc

        # A tool task's hard limit is its timeout plus a grace; Redis would redeliver a task
        # still running past the visibility timeout, so every tool must fit under it.
        limit = settings.AGENTSITE_BROKER_VISIBILITY_TIMEOUT
        grace = settings.AGENTSITE_TOOL_HARD_LIMIT_GRACE
        for name in registry.names():
            spec = registry.get(name)
            if spec is not None and spec.timeout + grace >= limit:
                raise ImproperlyConfigured(
                    f"tool {name!r} has timeout {spec.timeout}s; it must stay under "
                    f"AGENTSITE_BROKER_VISIBILITY_TIMEOUT ({limit}s) minus "
                    f"AGENTSITE_TOOL_HARD_LIMIT_GRACE ({grace}s)"
                )

        # The catalogue follows the code after every migrate (and `manage.py sync_tools`).
        post_migrate.connect(_sync_after_migrate, sender=self)

        from . import metrics

        metrics.register()


def _sync_after_migrate(sender: AppConfig, using: str = "default", **kwargs: object) -> None:
    from .catalogue import sync_tools

    sync_tools(using=using)
