"""``/``: what this server is and where to go from here (a page for people, an index for JSON
clients)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_safe

QUICK_START = [
    ("make demo", "create .venv, migrate, seed, run three demo agents on a real Celery worker"),
    ("make test", "the whole suite against Postgres, Redis, a real worker and a fake model server"),
    ("make up", "web on :8000, a worker, beat and Flower on :5555"),
]


def _links() -> list[tuple[str, str, str]]:
    return [
        ("admin", reverse("admin:index"), "the admin: agents, tools, runs, the review queue"),
        ("docs", reverse("docs"), "the REST API, in Swagger UI"),
        ("schema", reverse("schema"), "its OpenAPI 3 schema"),
        ("healthz", reverse("healthz"), "liveness: the process answers"),
        ("readyz", reverse("readyz"), "readiness: the database and the broker answer"),
    ]


@require_safe
def landing(request: HttpRequest) -> HttpResponse:
    """A short page on Agentsite with links to the admin, the API docs and the probes; JSON
    (the same links) for a client that prefers it."""
    links = _links()
    if request.get_preferred_type(["text/html", "application/json"]) == "application/json":
        return JsonResponse(
            {
                "name": "Agentsite",
                "description": "A Django and Celery backend for running AI agents.",
                "links": {name: url for name, url, _ in links},
            }
        )
    return render(request, "agentsite/landing.html", {"links": links, "quick_start": QUICK_START})
