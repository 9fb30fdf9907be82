"""Celery entry point for the review SLA sweep (run by beat)."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(name="approvals.expire_overdue", acks_late=True, ignore_result=True)
def expire_overdue() -> int:
    """Apply the agents' expiry policy to approvals past their due time."""
    return services.expire_overdue()
