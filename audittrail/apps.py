from django.apps import AppConfig


class AuditTrailConfig(AppConfig):
    name = "audittrail"
    verbose_name = "Audit trail"
