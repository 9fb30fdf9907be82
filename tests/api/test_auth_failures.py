"""Failed authentications limited per client address (AGENTSITE_AUTH_FAILURE_RATE_LIMIT), and
which address a request is counted under (AGENTSITE_TRUSTED_PROXIES), in-process against the
real Redis. Across API processes: tests/integration/test_stream_limits.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
from django.contrib.auth.models import User
from django.test import Client
from rest_framework.test import APIClient

from agents import apikeys
from agentsite import rediskeys
from agentsite.clientaddress import client_address
from tests.support.api import assert_error
from tests.test_settings import _import_settings

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/runs/"


@pytest.fixture
def limit(settings):
    """Three failures a minute per address; the test's counters start empty (conftest)."""
    assert settings.REDIS_URL, "failures are counted in Redis: run with `make test`"
    settings.AGENTSITE_AUTH_FAILURE_RATE_LIMIT = "3/minute"
    return 3


def bad_key() -> str:
    return f"Bearer {apikeys.generate()[0]}"


def test_past_the_limit_an_address_is_answered_429_before_its_key_is_checked(limit, client_a):
    for _ in range(limit):
        assert_error(
            APIClient().get(RUNS, HTTP_AUTHORIZATION=bad_key()), 401, "authentication_failed"
        )

    refused = client_a.get(RUNS)  # a valid key, from the same address

    error = assert_error(refused, 429, "throttled")
    assert "failed authentication" in error["message"]
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert APIClient().get(RUNS, HTTP_AUTHORIZATION=bad_key()).status_code == 429
    # Another address is not held up by this one, and a request with no key is not refused.
    assert client_a.get(RUNS, REMOTE_ADDR="192.0.2.7").status_code == 200
    assert_error(APIClient().get(RUNS), 401, "not_authenticated")


def test_a_bearer_header_without_a_key_is_a_failed_authentication(limit, client_a):
    for _ in range(limit):
        assert_error(APIClient().get(RUNS, HTTP_AUTHORIZATION="Bearer "), 401)

    assert_error(client_a.get(RUNS), 429, "throttled")


def test_the_limit_can_be_switched_off(settings, client_a):
    settings.AGENTSITE_AUTH_FAILURE_RATE_LIMIT = ""
    for _ in range(25):
        assert APIClient().get(RUNS, HTTP_AUTHORIZATION=bad_key()).status_code == 401
    assert client_a.get(RUNS).status_code == 200


def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(limit, client_a):
    for n in range(limit):  # a new forwarded address for every guess
        response = APIClient().get(
            RUNS, HTTP_AUTHORIZATION=bad_key(), HTTP_X_FORWARDED_FOR=f"198.51.100.{n}"
        )
        assert response.status_code == 401

    assert_error(client_a.get(RUNS, HTTP_X_FORWARDED_FOR="198.51.100.99"), 429, "throttled")


def test_behind_a_trusted_proxy_failures_count_per_forwarded_client(limit, settings, client_a):
    settings.AGENTSITE_TRUSTED_PROXIES = ["10.0.0.0/8"]
    via_proxy = {"REMOTE_ADDR": "10.0.0.2"}
    for n in range(limit):  # the client writes what it likes to the left of what the proxy adds
        response = APIClient().get(
            RUNS,
            HTTP_AUTHORIZATION=bad_key(),
            HTTP_X_FORWARDED_FOR=f"203.0.113.{n}, 198.51.100.1",
            **via_proxy,
        )
        assert response.status_code == 401

    blocked = client_a.get(RUNS, HTTP_X_FORWARDED_FOR="198.51.100.1", **via_proxy)
    assert_error(blocked, 429, "throttled")
    # ... through two trusted proxies, the same client
    two_hops = client_a.get(RUNS, HTTP_X_FORWARDED_FOR="198.51.100.1, 10.9.9.9", **via_proxy)
    assert two_hops.status_code == 429
    # Another client of the proxy, and the proxy itself, are not held up.
    assert client_a.get(RUNS, HTTP_X_FORWARDED_FOR="198.51.100.2", **via_proxy).status_code == 200
    assert client_a.get(RUNS, **via_proxy).status_code == 200


@pytest.mark.parametrize(
    ("meta", "trusted", "expected"),
    [
        ({"REMOTE_ADDR": "192.0.2.1"}, [], "192.0.2.1"),
        ({"REMOTE_ADDR": "192.0.2.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6"}, [], "192.0.2.1"),
        (
            {"REMOTE_ADDR": "192.0.2.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6"},
            ["10.0.0.0/8"],
            "192.0.2.1",
        ),
        (
            {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.4"},
            ["10.0.0.0/8"],
            "198.51.100.4",
        ),
        (
            {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "198.51.100.4, 10.0.0.7"},
            ["10.0.0.0/8"],
            "198.51.100.4",
        ),
        (  # every hop trusted: the farthest is the client
            {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "10.1.1.1, 10.0.0.7"},
            ["10.0.0.0/8"],
            "10.1.1.1",
        ),
        ({"REMOTE_ADDR": "10.0.0.1"}, ["10.0.0.0/8"], "10.0.0.1"),
        (  # ports and brackets are dropped
            {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "[2001:db8::5]:443"},
            ["10.0.0.1"],
            "2001:db8::5",
        ),
        (  # an entry that is not an address where the client should be stops the walk: the
            # client's own entries to its left are not believed
            {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "1.2.3.4, unknown"},
            ["10.0.0.1"],
            "unknown:unknown",
        ),
        (
            {"REMOTE_ADDR": "::ffff:10.0.0.1", "HTTP_X_FORWARDED_FOR": "198.51.100.4:5678"},
            ["10.0.0.1"],
            "198.51.100.4",
        ),
        ({}, [], "unknown"),
    ],
)
def test_the_client_address(settings, meta, trusted, expected):
    settings.AGENTSITE_TRUSTED_PROXIES = trusted
    assert client_address(meta) == expected


def test_the_unauthenticated_rate_limit_counts_the_client_address_not_its_header(settings):
    settings.AGENTSITE_API_RATE_LIMIT = "2/minute"
    docs = "/api/docs/"  # open to anonymous callers, so their requests are throttled per address
    peer = {"REMOTE_ADDR": "192.0.2.55"}
    redis.Redis.from_url(settings.REDIS_URL).delete(rediskeys.key("rate:ip:192.0.2.55"))
    for n in range(2):
        assert (
            APIClient().get(docs, HTTP_X_FORWARDED_FOR=f"198.51.100.{n}", **peer).status_code == 200
        )

    response = APIClient().get(docs, HTTP_X_FORWARDED_FOR="198.51.100.77", **peer)

    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1


def test_a_wrong_metrics_token_is_a_failed_authentication(limit, settings):
    settings.AGENTSITE_METRICS_TOKEN = "s3cret-scrape"
    client = APIClient()
    for _ in range(limit):
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer guess").status_code == 401

    refused = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape")

    assert_error(refused, 429, "throttled")
    assert int(refused["Retry-After"]) >= 1
    # A wrong token counts against API keys from the same address too: one budget of guesses.
    assert_error(APIClient().get(RUNS, HTTP_AUTHORIZATION=bad_key()), 429, "throttled")
    other = client.get(
        "/metrics", HTTP_AUTHORIZATION="Bearer s3cret-scrape", REMOTE_ADDR="192.0.2.9"
    )
    assert other.status_code == 200


def test_wrong_admin_passwords_are_failed_authentications(limit):
    User.objects.create_user(username="ops", password="right-horse-battery", is_staff=True)
    browser = Client()
    for _ in range(limit):
        wrong = browser.post("/admin/login/", {"username": "ops", "password": "guess"})
        assert wrong.status_code == 200 and b"correct username and password" in wrong.content

    refused = browser.post("/admin/login/", {"username": "ops", "password": "right-horse-battery"})

    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert "failed authentication" in refused.content.decode()
    assert "_auth_user_id" not in browser.session
    assert browser.get("/admin/login/").status_code == 200  # the form itself is still shown
    elsewhere = Client(REMOTE_ADDR="192.0.2.10")
    signed_in = elsewhere.post(
        "/admin/login/", {"username": "ops", "password": "right-horse-battery"}
    )
    assert signed_in.status_code == 302


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AGENTSITE_TRUSTED_PROXIES": "10.0.0.0/8, proxy.internal"}, "'proxy.internal'"),
        ({"AGENTSITE_TRUSTED_PROXIES": "10.0.0.300"}, "'10.0.0.300'"),
        ({"AGENTSITE_AUTH_FAILURE_RATE_LIMIT": "20/fortnight"}, "'20/fortnight'"),
        ({"AGENTSITE_API_RATE_LIMIT": "lots"}, "'lots'"),
        ({"AGENTSITE_MAX_STREAMS_PER_KEY": "lots"}, "AGENTSITE_MAX_STREAMS_PER_KEY"),
    ],
)
def test_a_bad_limit_setting_stops_start_up_naming_it(env, named):
    result = _import_settings(DEBUG="1", **env)
    assert result.returncode != 0
    assert named in result.stderr and next(iter(env)) in result.stderr


def test_the_limit_settings_are_read_from_the_environment():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from agentsite import settings as s; "
            "print(s.AGENTSITE_TRUSTED_PROXIES, s.AGENTSITE_AUTH_FAILURE_RATE_LIMIT, "
            "s.AGENTSITE_MAX_STREAMS_PER_KEY)",
        ],  # fmt: skip
        env={
            **os.environ,
            "DEBUG": "1",
            "AGENTSITE_TRUSTED_PROXIES": " 10.1.2.3/8 , ::1",
            "AGENTSITE_AUTH_FAILURE_RATE_LIMIT": "",
            "AGENTSITE_MAX_STREAMS_PER_KEY": "0",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split("\n")[0] == "['10.0.0.0/8', '::1/128']  0"
