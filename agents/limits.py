"""Model quotas moved to agents.providers.quotas."""

# transitional: re-exported for the engine split (issue 18); removed when merged
from .providers.quotas import BUCKETS, Quota, acquire, pause, settle

__all__ = ["BUCKETS", "Quota", "acquire", "pause", "settle"]
