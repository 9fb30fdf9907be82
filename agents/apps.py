import logging

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from django.conf import settings

        from .providers.prices import forget_prices

        taken = settings.AGENTSITE_SETTINGS_FROM_ENV_FILE
        if taken:
            # The first line a process logs: a development .env in production is seen at once.
            logging.getLogger("agentsite.settings").log(
                logging.INFO if settings.DEBUG else logging.WARNING,
                "settings from %s: %s (the environment wins over the file)",
                settings.AGENTSITE_ENV_FILE,
                ", ".join(sorted(taken)),
            )
        from .models import ModelPrice

        # An edit is seen at once by the process that made it; other processes within the
        # price table's TTL (10 s).
        for signal in (post_save, post_delete):
            signal.connect(
                lambda **_: forget_prices(),
                sender=ModelPrice,
                weak=False,
                dispatch_uid=f"forget-prices-{id(signal)}",
            )
        from django.contrib.auth.signals import user_login_failed

        from agentsite.authfailures import on_login_failed

        # A wrong admin password counts against its client's failed-authentication limit.
        user_login_failed.connect(on_login_failed, dispatch_uid="agentsite-auth-failures")

        from . import metrics

        metrics.register()
