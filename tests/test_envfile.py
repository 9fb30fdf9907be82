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
