"""The audit trail's writer, now ``audittrail.writer``."""

# transitional: re-exported for the engine split (issue 18); removed when merged
from audittrail.writer import ENGINE, Actor, batched, record

__all__ = ["ENGINE", "Actor", "batched", "record"]
