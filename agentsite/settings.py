"""Agentsite settings, read from the environment in this one place.

With nothing set, the embedded default runs: SQLite and kombu's filesystem broker under ``.data/``,
so ``make demo`` works on a bare machine. Set ``DATABASE_URL`` and ``CELERY_BROKER_URL`` to run on
Postgres and Redis, as docker-compose.yml and production do.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

import dj_database_url
import kombu as _kombu
from django.core.exceptions import ImproperlyConfigured

from agentsite import derivedkeys as _derivedkeys
from agentsite import envfile as _envfile
from agentsite import outbound as _outbound
from agentsite import redaction as _redaction

BASE_DIR = Path(__file__).resolve().parent.parent
# A development checkout's .env (written by `make demo`; AGENTSITE_ENV_FILE names another, or
# none when empty) fills in what the environment does not set. Which names it gave is logged
# when the process starts (agents.apps), so a .env carried into production is seen.
AGENTSITE_ENV_FILE = _envfile.path()
AGENTSITE_SETTINGS_FROM_ENV_FILE = _envfile.apply(AGENTSITE_ENV_FILE)
DATA_DIR = Path(os.environ.get("AGENTSITE_DATA_DIR", BASE_DIR / ".data"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false)")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r} is not a number") from None


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_networks(name: str) -> list[str]:
    """Networks in CIDR form (an address alone is one host), comma-separated, normalised."""
    networks = []
    for entry in env_list(name):
        try:
            networks.append(str(_outbound.parse_network(entry)))
        except ValueError as exc:
            raise ImproperlyConfigured(f"{name}: {exc}") from None
    return networks


# --- Core -------------------------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off: set it in the environment, or run "
            "`make demo` once to write a development .env (DEBUG=1 and a generated key)"
        )
    SECRET_KEY = _envfile.LEGACY_DEVELOPMENT_KEY

# The HMAC key of the audit trail's hash chain (audittrail.chain). It must not change once events
# are sealed: every seal made with the old key would then fail verify_audit. The default is
# derived from SECRET_KEY, so set this explicitly before rotating SECRET_KEY.
AGENTSITE_AUDIT_KEY = os.environ.get("AGENTSITE_AUDIT_KEY", "") or _derivedkeys.audit_key(
    SECRET_KEY
)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "agents",
    "tools",
    "approvals",
    "audittrail",
]

MIDDLEWARE = [
    "agentsite.middleware.ObservabilityMiddleware",
    "agentsite.middleware.RequestSizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "agentsite.urls"
WSGI_APPLICATION = "agentsite.wsgi.application"
ASGI_APPLICATION = "agentsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        # The project's own pages (the landing page at /); the apps' templates are in the apps.
        "DIRS": [BASE_DIR / "agentsite" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
# Postgres uses Django's psycopg 3 connection pool (CONN_MAX_AGE must then be 0). Connections
# are health-checked on checkout (CONN_HEALTH_CHECKS), so a restarted Postgres costs a retry,
# not a worker full of dead sockets.

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    try:
        _db = dj_database_url.parse(
            DATABASE_URL,
            conn_max_age=0,
            conn_health_checks=env_bool("AGENTSITE_DB_HEALTH_CHECKS", True),
        )
    except ValueError as _exc:  # ParseError, UnknownSchemeError, a port that is not a number
        # Not the URL itself: it may carry a password.
        raise ImproperlyConfigured(
            f"DATABASE_URL cannot be read ({type(_exc).__name__}); expected e.g. "
            "postgres://user:password@host:5432/name"
        ) from None
    if _db["ENGINE"] == "django.db.backends.postgresql":
        _db["OPTIONS"] = {
            **_db.get("OPTIONS", {}),
            "pool": {
                "min_size": env_int("AGENTSITE_DB_POOL_MIN", 1),
                "max_size": env_int("AGENTSITE_DB_POOL_MAX", 20),
                "timeout": env_float("AGENTSITE_DB_POOL_TIMEOUT", 30.0),
            },
        }
        _db["TEST"] = {"NAME": os.environ.get("AGENTSITE_TEST_DB_NAME") or None}
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    _db = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": str(DATA_DIR / "agentsite.sqlite3"),
        # IMMEDIATE transactions serialise writers up front, which is what select_for_update
        # (a no-op on SQLite) gives us on Postgres; WAL lets the web process read meanwhile.
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT", str(DATA_DIR / "static"))
# WhiteNoise serves the admin's static files from gunicorn; no separate web server is needed.
if DEBUG:
    # Development serves static files straight from the apps (no collectstatic needed).
    WHITENOISE_USE_FINDERS = True
    Path(STATIC_ROOT).mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- REST framework ---------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "agents.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["agentsite.ratelimit.ApiKeyRateThrottle"],
    "DEFAULT_PAGINATION_CLASS": "agentsite.pagination.ClampedLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_PARSER_CLASSES": ["agentsite.jsonparse.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "EXCEPTION_HANDLER": "agentsite.errorhandler.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agentsite API",
    "DESCRIPTION": "Submit agent runs, follow them, cancel them. Authenticate with "
    "`Authorization: Bearer <key>` (`python manage.py create_api_key <user>`).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Celery -----------------------------------------------------------------------------------
# Read by agentsite/celery.py with namespace="CELERY"; tests check that every CELERY_* name here
# is a real Celery setting, because a misspelt one is silently ignored.
# Reference: https://docs.celeryq.dev/en/stable/userguide/configuration.html

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "") or "filesystem://localhost/"
REDIS_URL = os.environ.get("REDIS_URL", "")
if not REDIS_URL and CELERY_BROKER_URL.startswith("redis"):
    REDIS_URL = CELERY_BROKER_URL
# Every key in Redis starts with this: Agentsite's own (agentsite/rediskeys.py) and the broker's
# (kombu's global_keyprefix), so deployments or test suites can share one Redis database.
# Empty by default: the keys keep the names they always had.
AGENTSITE_REDIS_KEY_PREFIX = os.environ.get("AGENTSITE_REDIS_KEY_PREFIX", "")
if AGENTSITE_REDIS_KEY_PREFIX and not re.fullmatch(
    r"[A-Za-z0-9_.:-]{1,64}", AGENTSITE_REDIS_KEY_PREFIX
):
    raise ImproperlyConfigured(
        f"AGENTSITE_REDIS_KEY_PREFIX={AGENTSITE_REDIS_KEY_PREFIX!r}: use 1 to 64 letters, digits "
        "and . _ : -"
    )

# Hard limits bound how long a step may hold a worker slot; the broker's visibility timeout must
# exceed every hard limit and every retry countdown, or Redis redelivers a task still running.
AGENTSITE_STEP_SOFT_TIME_LIMIT = env_int("AGENTSITE_STEP_SOFT_TIME_LIMIT", 120)
AGENTSITE_STEP_HARD_TIME_LIMIT = env_int("AGENTSITE_STEP_HARD_TIME_LIMIT", 150)
AGENTSITE_RETRY_BACKOFF_MAX = env_int("AGENTSITE_RETRY_BACKOFF_MAX", 60)
# A provider's Retry-After is honoured up to this many seconds.
AGENTSITE_RETRY_AFTER_MAX = env_int("AGENTSITE_RETRY_AFTER_MAX", 3600)
# The longest countdown a retry message carries. A longer wait (a long Retry-After) is kept in
# Postgres only (the step's not_before) and the reconciler resumes the run when it is due: Redis
# would redeliver a message held past the visibility timeout again and again.
AGENTSITE_MAX_COUNTDOWN = env_int("AGENTSITE_MAX_COUNTDOWN", 300)
AGENTSITE_BROKER_VISIBILITY_TIMEOUT = env_int("AGENTSITE_BROKER_VISIBILITY_TIMEOUT", 900)
if (
    max(AGENTSITE_STEP_HARD_TIME_LIMIT, AGENTSITE_RETRY_BACKOFF_MAX, AGENTSITE_MAX_COUNTDOWN)
    >= AGENTSITE_BROKER_VISIBILITY_TIMEOUT
):
    raise ImproperlyConfigured(
        "AGENTSITE_BROKER_VISIBILITY_TIMEOUT must exceed AGENTSITE_STEP_HARD_TIME_LIMIT, "
        "AGENTSITE_RETRY_BACKOFF_MAX and AGENTSITE_MAX_COUNTDOWN, or Redis redelivers tasks "
        "that are still running or waiting"
    )

if CELERY_BROKER_URL.startswith("filesystem"):
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": AGENTSITE_BROKER_VISIBILITY_TIMEOUT,
        # Redis connections per worker process. A gevent worker acks and publishes from hundreds
        # of greenlets at once; kombu's default (10) fails the excess with "Too many
        # connections", and a lost ack is a task Redis redelivers a visibility timeout later.
        "max_connections": env_int("AGENTSITE_BROKER_MAX_CONNECTIONS", 1000),
    }
    if AGENTSITE_REDIS_KEY_PREFIX:
        CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = AGENTSITE_REDIS_KEY_PREFIX
# Producers kept for publishing (Celery's default is 10, shared by every greenlet).
CELERY_BROKER_POOL_LIMIT = env_int("AGENTSITE_BROKER_POOL_LIMIT", 100)

# Postgres is the source of truth; no task result is ever read, so none is stored.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Messages a worker reserves per pool slot: 1, so a prefork child busy in a long call holds no
# second message. A gevent worker is started with --prefetch-multiplier 2 (Procfile, compose):
# with exactly one per slot a full pool stops its consumer until the next poll (up to 2 s), and
# a 500 ms task waits longer for its slot than it runs (bench: 230 vs 620 waiting tasks/s).
CELERY_WORKER_PREFETCH_MULTIPLIER = env_int("AGENTSITE_PREFETCH_MULTIPLIER", 1)
CELERY_TASK_SOFT_TIME_LIMIT = AGENTSITE_STEP_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = AGENTSITE_STEP_HARD_TIME_LIMIT
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# When the broker connection drops (Redis restarted, fail-over), running steps go on: their
# result is recorded in Postgres, and the message, if Redis still has it, comes back later as a
# stale nudge that does nothing. Cancelling them (Celery's choice for tasks that are not
# idempotent) would throw away model calls in flight and leave their steps claimed until their
# leases expire (the chaos suite saw steps lost this way on every Redis restart).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "agents.advance_run": {"queue": "models"},
    "agents.reconcile_runs": {"queue": "maintenance"},
    "agents.deliver_webhook": {"queue": "maintenance"},
    "tools.execute_tool_call": {"queue": "tools"},
    "tools.deliver_outbox": {"queue": "maintenance"},
    "approvals.expire_overdue": {"queue": "maintenance"},
    "audittrail.seal_audit": {"queue": "maintenance"},
}
# Every queue a task is routed to is declared, so `celery -A agentsite worker` without -Q
# consumes them all (Celery's default is the default queue alone); -Q still dedicates a worker.
# Each as Celery would create it on demand (an exchange of its name, its name as the routing
# key), so a deployment's existing queues and bindings keep working.
CELERY_TASK_QUEUES = [
    _kombu.Queue(name, _kombu.Exchange(name), routing_key=name)
    for name in sorted(
        {CELERY_TASK_DEFAULT_QUEUE, *(route["queue"] for route in CELERY_TASK_ROUTES.values())}
    )
]
# Each worker refreshes a heartbeat naming the queues it consumes (agentsite/heartbeats.py);
# one not refreshed for this many seconds is gone. A run queued longer than
# AGENTSITE_QUEUE_NO_CONSUMER_AFTER seconds on a queue no live worker consumes is flagged (the
# admin, manage.py stats, run_agent --wait; /readyz and the agentsite_queue_consumers gauge
# show the queues without a consumer).
AGENTSITE_WORKER_HEARTBEAT_TTL = env_float("AGENTSITE_WORKER_HEARTBEAT_TTL", 20.0)
AGENTSITE_QUEUE_NO_CONSUMER_AFTER = env_float("AGENTSITE_QUEUE_NO_CONSUMER_AFTER", 30.0)
if AGENTSITE_WORKER_HEARTBEAT_TTL < 2:
    raise ImproperlyConfigured(
        "AGENTSITE_WORKER_HEARTBEAT_TTL must be at least 2 seconds (workers refresh it four "
        "times per TTL, at most every 5 s)"
    )
# Task events cost three extra broker messages per task; Flower switches them on at run time
# (it broadcasts enable_events), so they flow while someone watches. AGENTSITE_TASK_EVENTS=1
# turns them on from the start (e.g. for a monitoring tool that does not enable them).
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("AGENTSITE_TASK_EVENTS", False)
CELERY_TASK_SEND_SENT_EVENT = CELERY_WORKER_SEND_TASK_EVENTS
AGENTSITE_RECONCILE_INTERVAL = env_int("AGENTSITE_RECONCILE_INTERVAL", 30)
# The audit trail is sealed into its hash chain this often (seconds); newer events wait for it.
AGENTSITE_AUDIT_SEAL_INTERVAL = env_int("AGENTSITE_AUDIT_SEAL_INTERVAL", 5)
CELERY_BEAT_SCHEDULE = {
    # Outbox rows whose on-commit nudge was lost (broker down) are delivered on the next pass.
    "deliver-outbox": {
        "task": "tools.deliver_outbox",
        "schedule": float(AGENTSITE_RECONCILE_INTERVAL),
        "options": {"expires": float(AGENTSITE_RECONCILE_INTERVAL)},
    },
    "expire-approvals": {
        "task": "approvals.expire_overdue",
        "schedule": float(AGENTSITE_RECONCILE_INTERVAL),
        "options": {"expires": float(AGENTSITE_RECONCILE_INTERVAL)},
    },
    "reconcile-runs": {
        "task": "agents.reconcile_runs",
        "schedule": float(AGENTSITE_RECONCILE_INTERVAL),
        "options": {"expires": float(AGENTSITE_RECONCILE_INTERVAL)},
    },
    "seal-audit": {
        "task": "audittrail.seal_audit",
        "schedule": float(AGENTSITE_AUDIT_SEAL_INTERVAL),
        "options": {"expires": float(AGENTSITE_AUDIT_SEAL_INTERVAL)},
    },
}

# --- The run engine ---------------------------------------------------------------------------

# Attempts per step (first try included) for transient model/tool errors, with exponential
# backoff and full jitter between them.
AGENTSITE_STEP_MAX_ATTEMPTS = env_int("AGENTSITE_STEP_MAX_ATTEMPTS", 4)
AGENTSITE_RETRY_BACKOFF_BASE = env_float("AGENTSITE_RETRY_BACKOFF_BASE", 1.0)
# A step claimed by a worker is leased for this long; past it, the worker is presumed dead and
# another may take the step over.
AGENTSITE_STEP_LEASE_SECONDS = env_int(
    "AGENTSITE_STEP_LEASE_SECONDS", AGENTSITE_STEP_HARD_TIME_LIMIT + 30
)
# A queued/running run with no progress for this long is nudged again by the reconciler.
AGENTSITE_STALLED_AFTER = env_int("AGENTSITE_STALLED_AFTER", 60)
AGENTSITE_MAX_TOOL_RESULT_CHARS = env_int("AGENTSITE_MAX_TOOL_RESULT_CHARS", 20_000)
AGENTSITE_MAX_REFUSALS = env_int("AGENTSITE_MAX_REFUSALS", 3)

# --- Human review -----------------------------------------------------------------------------

# An escalation is due this many minutes after it is raised (an agent's escalation_policy
# "review_sla_minutes" overrides it); past due, the policy's "on_expiry" applies.
AGENTSITE_REVIEW_SLA_MINUTES = env_int("AGENTSITE_REVIEW_SLA_MINUTES", 240)
# Four-eyes: a reviewer may not decide on a run they submitted themselves, unless this is set.
AGENTSITE_ALLOW_SELF_APPROVAL = env_bool("AGENTSITE_ALLOW_SELF_APPROVAL")

# --- Tools ------------------------------------------------------------------------------------

# Modules of your own @tool functions, imported at start-up by every process (comma-separated).
AGENTSITE_TOOL_MODULES = env_list("AGENTSITE_TOOL_MODULES")
# A tool call's hard time limit is its timeout plus this grace (the soft limit lets it clean
# up); its lease adds a margin past the hard limit, after which its worker is presumed dead.
AGENTSITE_TOOL_HARD_LIMIT_GRACE = env_int("AGENTSITE_TOOL_HARD_LIMIT_GRACE", 10)
AGENTSITE_TOOL_LEASE_MARGIN = env_int("AGENTSITE_TOOL_LEASE_MARGIN", 30)
# Circuit breaker per tool, shared by all workers through Redis: after FAILURES failures within
# WINDOW seconds calls are short-circuited for COOLDOWN seconds, then one probe call decides.
AGENTSITE_BREAKER_FAILURES = env_int("AGENTSITE_BREAKER_FAILURES", 5)
AGENTSITE_BREAKER_WINDOW = env_int("AGENTSITE_BREAKER_WINDOW", 60)
AGENTSITE_BREAKER_COOLDOWN = env_int("AGENTSITE_BREAKER_COOLDOWN", 30)
# http_get: the most bytes of a response body it reads, and redirects it follows (same host).
AGENTSITE_HTTP_GET_MAX_BYTES = env_int("AGENTSITE_HTTP_GET_MAX_BYTES", 1_000_000)
AGENTSITE_HTTP_GET_MAX_REDIRECTS = env_int("AGENTSITE_HTTP_GET_MAX_REDIRECTS", 3)
# http_get and webhooks contact public addresses only (every address the name resolves to is
# checked, and the connection goes to the checked one), except in these networks
# (comma-separated CIDRs, e.g. 10.20.0.0/16,fd00:1::/64). The test suite allows 127.0.0.0/8.
AGENTSITE_OUTBOUND_ALLOWED_NETWORKS = env_networks("AGENTSITE_OUTBOUND_ALLOWED_NETWORKS")
# The outbox relay gives up on a side effect after this many failed deliveries.
AGENTSITE_OUTBOX_MAX_ATTEMPTS = env_int("AGENTSITE_OUTBOX_MAX_ATTEMPTS", 5)

# E-mail that send_email puts in the outbox is delivered by the relay through this backend:
# printed to the worker's log by default; set EMAIL_BACKEND to Django's SMTP backend
# (django.core.mail.backends.smtp.EmailBackend) and EMAIL_HOST etc. to really send.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
# Django's file backend (django.core.mail.backends.filebased.EmailBackend) writes here.
EMAIL_FILE_PATH = os.environ.get("EMAIL_FILE_PATH") or str(DATA_DIR / "mail")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS")
# The relay holds a row lock while it sends; a bounded send keeps that short.
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "agentsite@localhost")

# Named OpenAI-compatible providers: AGENTSITE_PROVIDER_<NAME>_BASE_URL, ..._API_KEY and
# optionally ..._TIMEOUT (seconds), ..._RPM and ..._TPM (the provider's requests and tokens per
# minute, kept across all workers). A route "local:llama-3.1-8b" uses provider "local".
_provider_re = re.compile(r"^AGENTSITE_PROVIDER_([A-Z0-9_]+?)_(BASE_URL|API_KEY|TIMEOUT|RPM|TPM)$")
AGENTSITE_PROVIDERS: dict[str, dict[str, str]] = {}
for _key, _value in os.environ.items():
    _match = _provider_re.match(_key)
    if _match:
        _name, _field = _match.group(1).lower(), _match.group(2).lower()
        AGENTSITE_PROVIDERS.setdefault(_name, {})[_field] = _value
for _name, _conf in AGENTSITE_PROVIDERS.items():
    if "base_url" not in _conf:
        raise ImproperlyConfigured(
            f"AGENTSITE_PROVIDER_{_name.upper()}_BASE_URL is missing for provider {_name!r}"
        )
if "scripted" in AGENTSITE_PROVIDERS:
    raise ImproperlyConfigured("provider name 'scripted' is reserved for the built-in provider")


# Model prices per million tokens, {"provider:model" or "provider:*": {"input": x, "output": y}};
# rows in the admin's model prices win. A run with a cost limit refuses unpriced models.
def _price_table(name: str) -> dict[str, tuple[Decimal, Decimal]]:
    text = os.environ.get(name, "").strip()
    if not text:
        return {}
    try:
        table = json.loads(text)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object")
    prices = {}
    for route, price in table.items():
        pair = [price.get("input"), price.get("output")] if isinstance(price, dict) else price
        try:
            values = tuple(Decimal(str(v)) for v in pair) if isinstance(pair, list) else ()
        except InvalidOperation:
            values = ()
        if len(values) != 2 or not all(v.is_finite() and v >= 0 for v in values):
            raise ImproperlyConfigured(
                f"{name}[{route!r}]: give input and output prices per million tokens, e.g. "
                '{"input": 0.15, "output": 0.6}'
            )
        prices[route] = (values[0], values[1])
    return prices


AGENTSITE_MODEL_PRICES = _price_table("AGENTSITE_MODEL_PRICES")
# A model step moves to the next route after this many retryable failures on one route.
AGENTSITE_FALLBACK_AFTER = env_int("AGENTSITE_FALLBACK_AFTER", 2)
# The span of the per-minute rate limits (providers' and agents'), in seconds; 60 unless a
# test compresses time.
AGENTSITE_RATE_WINDOW_SECONDS = env_float("AGENTSITE_RATE_WINDOW_SECONDS", 60.0)
# A model's answer larger than this (bytes on the wire, characters of text) is refused as
# invalid (and the step falls back to the next route).
AGENTSITE_MAX_MODEL_RESPONSE_BYTES = env_int("AGENTSITE_MAX_MODEL_RESPONSE_BYTES", 4_000_000)
AGENTSITE_MAX_MODEL_OUTPUT_CHARS = env_int("AGENTSITE_MAX_MODEL_OUTPUT_CHARS", 200_000)

# --- REST API ---------------------------------------------------------------------------------

# Bodies larger than this are refused with 413 before anything parses them.
AGENTSITE_MAX_REQUEST_BYTES = env_int("AGENTSITE_MAX_REQUEST_BYTES", 512 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = AGENTSITE_MAX_REQUEST_BYTES
# Arrays and objects nested in one JSON value (a body's field, an admin JSON field, a value a
# service stores): deeper is a 400 naming the field (agentsite/jsonparse.py), checked before
# Python's json recurses (RecursionError near 1000) or anything renders the value.
AGENTSITE_MAX_JSON_DEPTH = env_int("AGENTSITE_MAX_JSON_DEPTH", 64)
if not 1 <= AGENTSITE_MAX_JSON_DEPTH <= 200:
    raise ImproperlyConfigured(
        f"AGENTSITE_MAX_JSON_DEPTH={AGENTSITE_MAX_JSON_DEPTH}: use 1 to 200 (deeper values "
        "overflow Python's recursion limit where they are rendered)"
    )
AGENTSITE_API_MAX_PAGE_SIZE = env_int("AGENTSITE_API_MAX_PAGE_SIZE", 100)
# Requests per key per window ("<n>/<second|minute|hour>"; empty disables), counted in Redis.
AGENTSITE_API_RATE_LIMIT = os.environ.get("AGENTSITE_API_RATE_LIMIT", "1200/minute").strip()
# Runs not yet finished per API key (0 disables).
AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY = env_int("AGENTSITE_MAX_ACTIVE_RUNS_PER_KEY", 200)
# Event streams (SSE) open at once per API key (per user for an admin session), counted across
# web processes in Redis (per process without it); past it, 429. 0 disables. Each holds a
# database poll every AGENTSITE_EVENTS_POLL_SECONDS.
AGENTSITE_MAX_STREAMS_PER_KEY = env_int("AGENTSITE_MAX_STREAMS_PER_KEY", 20)
# Failed authentications (API key, metrics token, admin password) per client address and window;
# past it, 429 before any credentials are checked. Empty disables; counted in Redis.
AGENTSITE_AUTH_FAILURE_RATE_LIMIT = os.environ.get(
    "AGENTSITE_AUTH_FAILURE_RATE_LIMIT", "20/minute"
).strip()
# Both rates are checked here: a bad one failed every request later (a 500 per request).
for _rate_name in ("AGENTSITE_API_RATE_LIMIT", "AGENTSITE_AUTH_FAILURE_RATE_LIMIT"):
    _rate = globals()[_rate_name]
    if _rate and not re.fullmatch(r"\d+/(second|minute|hour|day)s?", _rate):
        raise ImproperlyConfigured(
            f"{_rate_name}={_rate!r}: use '<n>/<second|minute|hour|day>', or empty for no limit"
        )


# Reverse proxies (addresses or CIDRs) whose X-Forwarded-For is believed: when the peer is one,
# the client is the right-most forwarded address that is not a trusted proxy. Empty: the peer.
AGENTSITE_TRUSTED_PROXIES = env_networks("AGENTSITE_TRUSTED_PROXIES")
# Hosts webhooks may be sent to: name, name:port, name:* (any port), .domain (and subdomains),
# [v6 address]:port; without a port, only the scheme's default (80 for http, 443 for https).
AGENTSITE_WEBHOOK_ALLOWED_HOSTS = env_list("AGENTSITE_WEBHOOK_ALLOWED_HOSTS")
for _entry in AGENTSITE_WEBHOOK_ALLOWED_HOSTS:
    try:
        _outbound.parse_host_pattern(_entry, wildcard=".")
    except ValueError as _exc:
        raise ImproperlyConfigured(f"AGENTSITE_WEBHOOK_ALLOWED_HOSTS: {_entry!r}: {_exc}") from None
AGENTSITE_WEBHOOK_SECRET = os.environ.get(
    "AGENTSITE_WEBHOOK_SECRET", ""
) or _derivedkeys.webhook_secret(SECRET_KEY)
AGENTSITE_EVENTS_POLL_SECONDS = env_float("AGENTSITE_EVENTS_POLL_SECONDS", 0.5)
AGENTSITE_EVENTS_MAX_SECONDS = env_int("AGENTSITE_EVENTS_MAX_SECONDS", 600)
AGENTSITE_WEBHOOK_TIMEOUT = env_float("AGENTSITE_WEBHOOK_TIMEOUT", 10.0)
AGENTSITE_WEBHOOK_MAX_ATTEMPTS = env_int("AGENTSITE_WEBHOOK_MAX_ATTEMPTS", 8)

# --- Redaction --------------------------------------------------------------------------------
# Personal data and secrets are replaced by markers in audit payloads and log messages
# (agentsite/redaction.py). KINDS picks the built-in detectors (email, phone, card, secret);
# PATTERNS adds your own as a JSON object {"name": "regex"}, each match becoming "[name]".
# A bad kind or pattern stops start-up, naming it.
AGENTSITE_REDACT = env_bool("AGENTSITE_REDACT", True)
AGENTSITE_REDACT_KINDS = _redaction.parse_kinds(
    env_list("AGENTSITE_REDACT_KINDS", ",".join(_redaction.KINDS))
)
AGENTSITE_REDACT_PATTERNS = _redaction.parse_patterns(
    os.environ.get("AGENTSITE_REDACT_PATTERNS", "")
)

# --- Observability ----------------------------------------------------------------------------
# README, Observability. Metrics: the web process at /metrics (with AGENTSITE_METRICS_TOKEN set,
# only with "Authorization: Bearer <token>"; without, only with DEBUG or AGENTSITE_METRICS_PUBLIC);
# a worker on AGENTSITE_WORKER_METRICS_PORT (unset: none). Traces: OTLP when
# OTEL_EXPORTER_OTLP_ENDPOINT is set (agentsite/tracing.py).
AGENTSITE_METRICS_TOKEN = os.environ.get("AGENTSITE_METRICS_TOKEN", "")
if (
    not AGENTSITE_METRICS_TOKEN.isascii()
    or AGENTSITE_METRICS_TOKEN.strip() != AGENTSITE_METRICS_TOKEN
):
    # An HTTP header carries it: other characters, or spaces at its ends, could never match.
    raise ImproperlyConfigured(
        "AGENTSITE_METRICS_TOKEN must be ASCII without leading or trailing spaces"
    )
# Without a token, /metrics answers only with DEBUG on, or with this set (a private port).
AGENTSITE_METRICS_PUBLIC = env_bool("AGENTSITE_METRICS_PUBLIC", False)
AGENTSITE_METRICS_MAX_LABEL_VALUES = env_int("AGENTSITE_METRICS_MAX_LABEL_VALUES", 200)
_metrics_port = os.environ.get("AGENTSITE_WORKER_METRICS_PORT", "").strip()
AGENTSITE_WORKER_METRICS_PORT = (
    env_int("AGENTSITE_WORKER_METRICS_PORT", 0) if _metrics_port else None
)
if AGENTSITE_WORKER_METRICS_PORT is not None and not 0 <= AGENTSITE_WORKER_METRICS_PORT < 65536:
    raise ImproperlyConfigured(
        f"AGENTSITE_WORKER_METRICS_PORT={_metrics_port!r} is not a port (0 to 65535)"
    )
AGENTSITE_WORKER_METRICS_ADDR = os.environ.get("AGENTSITE_WORKER_METRICS_ADDR", "127.0.0.1")

# --- Logging ----------------------------------------------------------------------------------
# One JSON object per line (json), or lines for a terminal (text, the default with DEBUG on);
# both carry the run, step, agent and trace of what wrote them (agentsite/logs.py).

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
AGENTSITE_LOG_FORMAT = os.environ.get("AGENTSITE_LOG_FORMAT", "").strip().lower() or (
    "text" if DEBUG else "json"
)
if AGENTSITE_LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(
        f"AGENTSITE_LOG_FORMAT={AGENTSITE_LOG_FORMAT!r} is not one of: json, text"
    )
_console = {
    "class": "logging.StreamHandler",
    "formatter": AGENTSITE_LOG_FORMAT,
    "filters": ["context", "redact"],
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "agentsite.logs.JsonFormatter"},
        "text": {"()": "agentsite.logs.TextFormatter"},
    },
    # Every handler takes the context and the redacting filter, so records propagated from
    # any logger carry their run and trace, and are redacted before they are written.
    "filters": {
        "context": {"()": "agentsite.logs.ContextFilter"},
        "redact": {"()": "agentsite.redaction.RedactingFilter"},
    },
    "handlers": {"console": _console},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "httpx": {"level": "WARNING"},
        # The servers' own loggers write through the same handler (JSON in production), at
        # the level their command line gave.
        **{
            name: {"handlers": ["console"], "propagate": False}
            for name in ("uvicorn", "uvicorn.error", "gunicorn.error")
        },
        # Their access logs are off: the app writes a line per request, with its trace id
        # (agentsite.request). uvicorn writes access lines while its logger has a handler.
        **{
            name: {"handlers": [], "propagate": False}
            for name in ("uvicorn.access", "gunicorn.access")
        },
    },
}

if not DEBUG:
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
