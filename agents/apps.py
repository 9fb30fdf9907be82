from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from .governance import forget_prices
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
