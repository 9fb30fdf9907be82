from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "tools"
    verbose_name = "Tools"

    def ready(self) -> None:
        # Importing registers the built-in tools with the registry.
        from . import builtin  # noqa: F401
