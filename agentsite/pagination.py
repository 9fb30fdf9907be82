from django.conf import settings
from rest_framework.pagination import LimitOffsetPagination


class ClampedLimitOffsetPagination(LimitOffsetPagination):
    """``?limit=`` above the maximum is clamped to it, not refused."""

    max_limit = settings.AGENTSITE_API_MAX_PAGE_SIZE
