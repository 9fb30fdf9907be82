# syntax=docker/dockerfile:1
# One image for every Agentsite process: web (gunicorn + uvicorn workers, ASGI), worker, beat, flower and migrate.
# docker-compose.yml picks the process with `command:`; the default is the web server.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=agentsite.settings \
    AGENTSITE_DATA_DIR=/app/.data \
    STATIC_ROOT=/app/staticfiles

# A fixed, unprivileged uid/gid so mounted volumes can be given to it.
RUN groupadd --system --gid 10001 agentsite \
    && useradd --system --uid 10001 --gid agentsite --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin agentsite

WORKDIR /app

# Dependencies first, read from pyproject.toml, so editing code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself. The code stays owned by root: the app user can read it, not change it.
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# Static files are collected at build time; settings refuse to load without SECRET_KEY when
# DEBUG is off, so a throwaway key is given for this one command only (it is not kept in the
# image). Importing settings without DATABASE_URL creates the SQLite data dir, which is then
# handed to the app user so the embedded default still works in a bare container.
RUN SECRET_KEY=collectstatic-build-only DEBUG=0 python manage.py collectstatic --noinput \
    && rm -rf /app/.data \
    && install -d -o agentsite -g agentsite /app/.data

USER agentsite

EXPOSE 8000

# exec so gunicorn is PID 1 and gets SIGTERM directly for a graceful shutdown.
CMD ["sh", "-c", "exec gunicorn agentsite.asgi:application --worker-class uvicorn_worker.UvicornWorker --bind 0.0.0.0:8000 --workers \"${WEB_CONCURRENCY:-2}\" --config gunicorn.conf.py"]
