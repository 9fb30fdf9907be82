"""``/``: a landing page for people, a small JSON index for API clients."""

from __future__ import annotations

import re

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

LINKS = ["/admin/", "/api/docs/", "/api/schema/", "/healthz", "/readyz"]


def test_the_root_serves_a_landing_page_with_the_links_and_the_quick_start():
    response = Client().get("/", HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "<title>Agentsite</title>" in page and "AI agents" in page
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert hrefs == LINKS
    for command in ("make demo", "make test", "make up"):
        assert command in page
    # Nothing fetched from elsewhere, no script.
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_every_link_of_the_landing_page_answers(settings):
    client = Client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/api/docs/").status_code == 200
    assert client.get("/api/schema/").status_code == 200
    admin = client.get("/admin/")
    assert admin.status_code == 302 and admin["Location"].startswith("/admin/login/")


@pytest.mark.parametrize("accept", ["", "*/*", "text/*"])
def test_a_client_that_takes_anything_gets_the_page(accept):
    response = Client().get("/", HTTP_ACCEPT=accept)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")


def test_a_json_client_gets_an_index_of_the_same_links():
    response = Client().get("/", HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Agentsite"
    assert sorted(body["links"].values()) == sorted(LINKS)


def test_the_root_answers_get_and_head_only():
    client = Client()
    assert client.head("/").status_code == 200
    assert client.post("/").status_code == 405
