"""API authentication: Bearer API keys, session auth for staff, and the create_api_key command."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from agents import apikeys
from agents.models import ApiKey, Run
from agents.services import revoke_api_key, submit_run
from audittrail.models import AuditEvent
from tests.support.api import assert_error

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/runs/"


def bearer(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=value)
    return client


def test_a_valid_key_is_accepted(client_a):
    response = client_a.get(RUNS)
    assert response.status_code == 200
    assert response.json()["count"] == 0


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(client_a, scheme):
    assert bearer(f"{scheme} {client_a.plain_key}").get(RUNS).status_code == 200


def test_no_authorization_answers_401_with_a_bearer_challenge(db):
    response = APIClient().get(RUNS)

    error = assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == "Bearer"
    assert "credentials were not provided" in error["message"]


def test_no_authorization_on_submit_answers_401_and_creates_nothing(agent):
    response = APIClient().post(RUNS, {"agent": "helper", "input": "x"}, format="json")
    assert_error(response, 401, "not_authenticated")
    assert not Run.objects.exists()


def test_the_agents_list_needs_a_key_too(db):
    response = APIClient().get("/api/v1/agents/")
    assert_error(response, 401, "not_authenticated")


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    "])
def test_a_bearer_header_without_a_key_answers_401(db, header):
    response = bearer(header).get(RUNS)

    error = assert_error(response, 401, "authentication_failed")
    assert "no key" in error["message"]
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    [
        "Token abc",
        "Basic dXNlcjpwYXNz",
        "bearer-but-no-space",
        "Bearer not-a-key",
        "Bearer ask_",
        "Bearer ask_abc",
        "Bearer xyz_0123456789ab_secret",
        "Bearer ask_0123456789ab_secret extra",
    ],
)
def test_a_malformed_authorization_header_answers_401(db, header):
    response = bearer(header).get(RUNS)

    assert_error(response, 401)
    assert response["WWW-Authenticate"] == "Bearer"


def test_an_unknown_key_answers_401(db):
    plain, _ = apikeys.generate()

    error = assert_error(bearer(f"Bearer {plain}").get(RUNS), 401, "authentication_failed")

    assert "Invalid or revoked API key" in error["message"]


def test_a_known_prefix_with_a_wrong_secret_answers_401(client_a):
    prefix = client_a.api_key.prefix
    assert client_a.plain_key.startswith(f"ask_{prefix}_")
    forged = f"ask_{prefix}_{'A' * 43}"

    assert_error(bearer(f"Bearer {forged}").get(RUNS), 401, "authentication_failed")
    assert_error(
        bearer(f"Bearer {client_a.plain_key[:-1]}").get(RUNS), 401, "authentication_failed"
    )
    assert_error(bearer(f"Bearer {client_a.plain_key}x").get(RUNS), 401, "authentication_failed")


def test_a_revoked_key_answers_401(client_a):
    assert client_a.get(RUNS).status_code == 200

    revoke_api_key(api_key=client_a.api_key)

    error = assert_error(client_a.get(RUNS), 401, "authentication_failed")
    assert "revoked" in error["message"]
    assert ApiKey.objects.get(pk=client_a.api_key.pk).revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.revoked").count() == 1
    revoke_api_key(api_key=client_a.api_key)  # revoking again changes nothing
    assert AuditEvent.objects.filter(action="api_key.revoked").count() == 1


def test_a_revoked_key_cannot_submit(client_a, agent):
    revoke_api_key(api_key=client_a.api_key)
    response = client_a.post(RUNS, {"agent": "helper", "input": "x"}, format="json")
    assert_error(response, 401, "authentication_failed")
    assert not Run.objects.exists()


def test_a_key_of_an_inactive_user_answers_401(client_a):
    User.objects.filter(pk=client_a.user.pk).update(is_active=False)

    assert_error(client_a.get(RUNS), 401, "authentication_failed")


def test_the_other_keys_of_a_user_keep_working_when_one_is_revoked(client_a, make_client):
    second = make_client(user=client_a.user)
    revoke_api_key(api_key=client_a.api_key)

    assert second.get(RUNS).status_code == 200
    assert_error(client_a.get(RUNS), 401)


def test_last_used_at_is_set_on_use(client_a):
    assert ApiKey.objects.get(pk=client_a.api_key.pk).last_used_at is None

    client_a.get(RUNS)

    used = ApiKey.objects.get(pk=client_a.api_key.pk).last_used_at
    assert used is not None
    client_a.get(RUNS)  # within a minute: not written again
    assert ApiKey.objects.get(pk=client_a.api_key.pk).last_used_at == used


def test_a_failed_attempt_does_not_touch_last_used_at(client_a):
    forged = f"ask_{client_a.api_key.prefix}_{'B' * 43}"
    bearer(f"Bearer {forged}").get(RUNS)
    assert ApiKey.objects.get(pk=client_a.api_key.pk).last_used_at is None


def test_session_auth_works_for_a_staff_user(agent):
    staff = User.objects.create_user(username="operator", is_staff=True)
    run = submit_run(agent=agent, input="from the admin", owner=staff)
    submit_run(agent=agent, input="someone else's")
    client = APIClient()
    client.force_login(staff)

    response = client.get(RUNS)

    assert response.status_code == 200
    assert [r["id"] for r in response.json()["results"]] == [str(run.pk)]
    assert client.get(f"{RUNS}{run.pk}/").json()["input"] == "from the admin"


def test_session_auth_serves_the_browsable_api_to_staff(db):
    staff = User.objects.create_user(username="operator", is_staff=True)
    client = APIClient()
    client.force_login(staff)

    response = client.get(RUNS, HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")


def test_session_auth_unsafe_methods_need_the_csrf_token(agent):
    staff = User.objects.create_user(username="operator", is_staff=True)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff)

    response = client.post(RUNS, {"agent": "helper", "input": "x"}, format="json")

    error = assert_error(response, 403, "permission_denied")
    assert "CSRF" in error["message"]
    assert not Run.objects.exists()


# --- the create_api_key command -----------------------------------------------------------------


def create_key(*args: str, **options: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("create_api_key", *args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def test_create_api_key_creates_the_user_and_prints_a_working_key(db):
    out, err = create_key("alice", name="ci")

    plain = out.strip().splitlines()[-1]
    assert plain.startswith("ask_") and plain == plain.strip() and " " not in plain
    user = User.objects.get(username="alice")
    assert not user.has_usable_password()
    key = ApiKey.objects.get()
    assert key.user == user and key.name == "ci" and key.revoked_at is None
    assert plain.startswith(f"ask_{key.prefix}_")
    assert "created user alice" in err and plain not in err

    response = bearer(f"Bearer {plain}").get(RUNS)
    assert response.status_code == 200


def test_create_api_key_stores_only_a_hash(db):
    out, _ = create_key("alice", name="ci")
    plain = out.strip().splitlines()[-1]
    secret = plain.split("_", 2)[2]

    row = ApiKey.objects.filter(user__username="alice").values().get()

    assert row["key_hash"] == hashlib.sha256(plain.encode()).hexdigest()
    for column, value in row.items():
        assert plain not in str(value), column
        assert secret not in str(value), column
    audit = AuditEvent.objects.filter(action="api_key.created").values_list("payload", flat=True)
    assert audit and all(secret not in str(payload) for payload in audit)


def test_create_api_key_twice_for_a_user_creates_a_second_key(db):
    first, _ = create_key("alice")
    second, err = create_key("alice", name="deploy")

    first_key, second_key = first.strip().splitlines()[-1], second.strip().splitlines()[-1]
    assert first_key != second_key
    assert User.objects.filter(username="alice").count() == 1
    assert ApiKey.objects.filter(user__username="alice").count() == 2
    assert "created user" not in err
    assert bearer(f"Bearer {first_key}").get(RUNS).status_code == 200
    assert bearer(f"Bearer {second_key}").get(RUNS).status_code == 200


def test_create_api_key_for_an_existing_user_keeps_their_password(db):
    User.objects.create_user(username="bob", password="s3cret-pass")
    create_key("bob")
    assert User.objects.get(username="bob").check_password("s3cret-pass")


@pytest.mark.parametrize(
    ("args", "options", "words"),
    [
        (("",), {}, "username"),
        (("   ",), {}, "username"),
        (("u" * 151,), {}, "username"),
        (("alice",), {"name": "n" * 101}, "--name"),
    ],
)
def test_create_api_key_with_bad_arguments_raises_command_error(db, args, options, words):
    with pytest.raises(CommandError, match=words):
        create_key(*args, **options)
    assert not ApiKey.objects.exists()
    assert not User.objects.exists()


@pytest.mark.parametrize(
    ("username", "problem"),
    [
        ("<img src=x onerror=alert(9)>", "Enter a valid username"),
        ("alice smith", "Enter a valid username"),
        ("alice\nbob", "Enter a valid username"),
        ("u" * 151, "at most 150 characters"),
    ],
)
def test_create_api_key_refuses_a_username_the_user_form_would(db, username, problem):
    with pytest.raises(CommandError) as raised:
        create_key(username)

    message = str(raised.value)
    assert message.startswith("username ") and problem in message
    assert "\n" not in message  # one line
    assert not User.objects.exists() and not ApiKey.objects.exists()


def test_create_api_key_refuses_a_name_it_cannot_store_and_creates_no_user(db):
    # Bytes that are not UTF-8 in the shell's argument reach Python as lone surrogates.
    with pytest.raises(CommandError, match="--name must not contain surrogate characters"):
        create_key("alice", name="billing \udcff")
    assert not User.objects.exists() and not ApiKey.objects.exists()


def test_create_api_key_accepts_what_the_user_form_accepts(db):
    out, _ = create_key("Zoë+ops@example.com")
    assert User.objects.filter(username="Zoë+ops@example.com").exists()
    assert bearer(f"Bearer {out.strip().splitlines()[-1]}").get(RUNS).status_code == 200


def test_create_api_key_without_a_username_raises_command_error(db):
    with pytest.raises(CommandError):
        create_key()


def test_whoami_names_the_user_and_key_never_the_secret(client_a):
    response = client_a.get("/api/v1/whoami/")
    assert response.status_code == 200
    assert response.json() == {
        "user": "alice-api",
        "key": {"prefix": client_a.api_key.prefix, "name": "tests"},
    }
    assert client_a.plain_key not in response.content.decode()


def test_whoami_without_a_key_answers_401(db):
    response = APIClient().get("/api/v1/whoami/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
