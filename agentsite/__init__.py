"""Agentsite: a Django + Celery backend for running AI agents in production."""

from .celery import app as celery_app

__all__ = ("celery_app",)
