import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")
application = get_wsgi_application()

# The web process: its log lines say so, and its spans go out over OTLP when configured.
from agentsite import logs, tracing  # noqa: E402  (after Django is set up)

logs.set_service("web")
tracing.configure("agentsite-web")
