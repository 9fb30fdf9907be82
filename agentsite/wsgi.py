import os

from django.core.wsgi import get_wsgi_application

from agentsite.envfile import settings_or_exit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")
settings_or_exit()  # a bad setting: one line, not a traceback per server worker
application = get_wsgi_application()

# The web process: its log lines say so, and its spans go out over OTLP when configured.
from agentsite import logs, tracing  # noqa: E402  (after Django is set up)

logs.set_service("web")
tracing.configure("agentsite-web")
