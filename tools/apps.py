from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class ToolsConfig(AppConfig):
    name = "tools"
    verbose_name = "Tools"

    def ready(self) -> None:
        # Importing registers the built-in tools with the registry.
        from . import builtin  # noqa: F401
        from .registry import registry

        # A tool task's hard limit is its timeout + 10 s; Redis would redeliver a task still
        # running past the visibility timeout, so every tool must fit under it.
        limit = settings.AGENTSITE_BROKER_VISIBILITY_TIMEOUT
        for name in registry.names():
            spec = registry.get(name)
            if spec is not None and spec.timeout + 10 >= limit:
                raise ImproperlyConfigured(
                    f"tool {name!r} has timeout {spec.timeout}s; it must stay under "
                    f"AGENTSITE_BROKER_VISIBILITY_TIMEOUT ({limit}s) minus 10 s"
                )
