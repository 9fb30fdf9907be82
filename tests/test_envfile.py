"""The development .env (agentsite/envfile.py): written once by `make demo`, read by every
process with the environment winning over it; an older checkout's data stays readable; a bad
or missing setting is one line, not a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from agentsite import envfile

ROOT = Path(__file__).resolve().parent.parent
# Settings that a developer's shell or make test would otherwise pass down.
SCRUBBED = ("DEBUG", "SECRET_KEY", "AGENTSITE_ENV_FILE", "AGENTSITE_AUDIT_KEY")


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SCRUBBED and not k.startswith(("AGENTSITE_ENCRYPTION", "AGENTSITE_WEBHOOK"))
    }
    env.update(extra)
    return env


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(DJANGO_SETTINGS_MODULE="agentsite.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_file_is_written_once_for_its_owner_and_never_regenerated(tmp_path):
    target = tmp_path / ".env"

    assert envfile.ensure(target, data_dir=tmp_path / ".data") is True
    first = target.read_text()
    assert "DEBUG=1\n" in first
    key = next(line for line in first.splitlines() if line.startswith("SECRET_KEY="))
    assert len(key) > len("SECRET_KEY=") + 40
    assert "AGENTSITE_AUDIT_KEY" not in first  # a fresh checkout derives it from the new key
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    assert envfile.ensure(target, data_dir=tmp_path / ".data") is False
    assert target.read_text() == first


def test_the_command_make_demo_runs_writes_it(tmp_path):
    target = tmp_path / ".env"
    env = _env(AGENTSITE_DATA_DIR=str(tmp_path / "data"))
    run = [sys.executable, "-m", "agentsite.envfile", str(target)]

    first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert first.returncode == 0 and f"wrote {target}" in first.stdout
    assert first.stderr == ""  # e.g. no runpy warning: nothing imports the module before it runs
    assert second.returncode == 0 and second.stdout == ""


def test_settings_read_it_and_the_environment_wins(tmp_path):
    target = tmp_path / ".env"
    target.write_text("DEBUG=1\nSECRET_KEY=from-the-file\nLOG_LEVEL=DEBUG\n")
    code = "from django.conf import settings as s; print(s.SECRET_KEY, s.DEBUG, s.LOG_LEVEL)"

    from_file = _python(code, AGENTSITE_ENV_FILE=str(target))
    overridden = _python(code, AGENTSITE_ENV_FILE=str(target), SECRET_KEY="from-the-env")
    no_file = _python(code, AGENTSITE_ENV_FILE="", DEBUG="1")

    assert from_file.stdout.split() == ["from-the-file", "True", "DEBUG"], from_file.stderr
    assert overridden.stdout.split() == ["from-the-env", "True", "DEBUG"], overridden.stderr
    assert no_file.stdout.split()[0] == envfile.LEGACY_DEVELOPMENT_KEY


def test_the_first_log_line_names_the_settings_that_came_from_it(tmp_path):
    target = tmp_path / ".env"
    target.write_text("DEBUG=1\nSECRET_KEY=k3y-never-logged\n")

    result = _manage("check", AGENTSITE_ENV_FILE=str(target), LOG_LEVEL="INFO")

    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert f"settings from {target}: DEBUG, SECRET_KEY (the environment wins" in first
    assert "k3y-never-logged" not in result.stderr + result.stdout


def test_a_missing_secret_key_is_one_line_not_a_traceback():
    result = _manage("seed_demo", AGENTSITE_ENV_FILE="")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "agentsite: SECRET_KEY must be set when DEBUG is off: set it in the environment, or "
        "run `make demo` once to write a development .env (DEBUG=1 and a generated key)"
    ]
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr


def test_a_worker_with_a_bad_setting_says_so_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "agentsite", "worker", "-P", "solo"],
        cwd=ROOT,
        env=_env(AGENTSITE_ENV_FILE="", DEBUG="sometimes"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "agentsite: DEBUG='sometimes' is not a boolean (use 1/0, true/false)"
    )
    assert "Traceback" not in result.stderr


ROUND_TRIP = """
import sys
import django
django.setup()
from agents import secretbox
from audittrail.chain import link_hash
if sys.argv[1] == "write":
    print(secretbox.encrypt("sk-provider-key"))
else:
    print(secretbox.decrypt(sys.argv[2]))
print(link_hash("0" * 64, ["1", "run.submitted", "{}"]))
"""


def _round_trip(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, *args],
        cwd=ROOT,
        env=_env(DJANGO_SETTINGS_MODULE="agentsite.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_older_checkouts_data_stays_readable_under_the_new_key(tmp_path):
    # Before .env: DEBUG=1 and no SECRET_KEY, the fixed development key. Its .data/ holds a
    # provider key encrypted under it and an audit chain sealed under it.
    before = _round_trip("write", DEBUG="1", AGENTSITE_ENV_FILE="")
    assert before.returncode == 0, before.stderr
    token, seal = before.stdout.split()
    data = tmp_path / ".data"
    data.mkdir()
    (data / "agentsite.sqlite3").write_bytes(b"")

    target = tmp_path / ".env"
    assert envfile.ensure(target, data_dir=data)
    after = _round_trip("read", token, AGENTSITE_ENV_FILE=str(target))

    assert after.returncode == 0, after.stderr
    assert after.stdout.split() == ["sk-provider-key", seal]
    assert "SECRET_KEY=" + envfile.LEGACY_DEVELOPMENT_KEY not in target.read_text()


def test_a_data_dir_holding_only_static_files_is_not_older_data(tmp_path):
    data = tmp_path / ".data"
    (data / "static").mkdir(parents=True)  # what any DEBUG process creates, make test too

    assert envfile.has_data(data) is False
    (data / "broker").mkdir()
    assert envfile.has_data(data) is True


def test_a_database_url_that_cannot_be_read_is_one_line_without_its_password():
    result = _manage(
        "check", AGENTSITE_ENV_FILE="", DEBUG="1", DATABASE_URL="postgres://u:s3cret@h:port/db"
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "agentsite: DATABASE_URL cannot be read (ParseError); expected e.g. "
        "postgres://user:password@host:5432/name"
    ]
    assert "s3cret" not in result.stderr + result.stdout


def test_the_derived_keys_are_the_ones_deployments_already_have():
    # Computed with the formulas settings and secretbox used before agentsite/derivedkeys.py:
    # a deployment that never set these keys keeps verifying its chain, decrypting its
    # provider keys and signing webhooks as before.
    from agentsite import derivedkeys

    assert derivedkeys.audit_key("k3y") == (
        "7388fc0bc519f73f4f5f5280eafa64bc4ba838088c74ebfb3b0fcb9d612c4bc0"
    )
    assert derivedkeys.webhook_secret("k3y") == (
        "df53bc99a9daa110f87c53cd1654d1e5147ece9fb610d04dbda1b0ea37406e25"
    )
    assert derivedkeys.encryption_key("k3y") == "oyeF8FnE07lKqAZ3Y0kztKxO7wK1Z91Sjc3JQ9hGBy8="


def _make(directory: Path, *args: str) -> str:
    """What ``make`` prints with this checkout's Makefile, run from ``directory``."""
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-f",
            str(ROOT / "Makefile"),
            "-C",
            str(directory),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    return result.stdout


def test_make_up_takes_its_ports_and_reads_no_env_file_through_honcho(tmp_path):
    commands = _make(ROOT, "-n", "up", "PORT=8123", "FLOWER_PORT=5999")

    assert "PORT=8123 FLOWER_PORT=5999" in commands
    # honcho would put .env's values over the environment's: it reads none.
    assert "honcho start -f Procfile -e /dev/null" in commands
    procfile = (ROOT / "Procfile").read_text()
    assert "--port ${PORT:-8000}" in procfile and "--port=${FLOWER_PORT:-5555}" in procfile
    assert "--no-proxy-headers" in procfile
    assert " -Q " not in procfile  # the worker consumes every queue


def test_two_checkouts_get_their_own_test_database_and_key_space(tmp_path):
    show = "show: ; @echo $(TEST_DB_NAME) $(TEST_REDIS_KEY_PREFIX)"
    here = _make(ROOT, "-s", "--eval", show, "show").split()
    there = _make(tmp_path, "-s", "--eval", show, "show").split()

    assert here[0].startswith("test_agentsite_") and here[1].startswith("agentsite-test-")
    assert here[0] != there[0] and here[1] != there[1]
    # make test hands them to the suite, and ignores a developer's .env.
    commands = _make(ROOT, "-n", "test")
    assert f"AGENTSITE_TEST_DB_NAME={here[0]}" in commands
    assert f"AGENTSITE_REDIS_KEY_PREFIX={here[1]}" in commands
    assert "AGENTSITE_ENV_FILE= " in commands
