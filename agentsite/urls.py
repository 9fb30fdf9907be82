from django.contrib import admin
from django.urls import include, path, re_path
from django.views import defaults
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from agents.api.events import run_events_view
from agents.api.views import AgentViewSet, RunViewSet, usage_report, whoami
from approvals.api import ApprovalViewSet

from .authfailures import guard_login
from .errors import ErrorCode, json_or_default
from .health import healthz, metrics_view, readyz
from .landing import landing

admin.site.site_header = "Agentsite"
admin.site.site_title = "Agentsite admin"

router = SimpleRouter()
router.register("agents", AgentViewSet, basename="agent")
router.register("runs", RunViewSet, basename="run")
router.register("approvals", ApprovalViewSet, basename="approval")

urlpatterns = [
    path("", landing, name="landing"),
    # The admin's own login view, refusing a client over its failed-authentication limit.
    path("admin/login/", guard_login(admin.site.login)),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    # Streams (SSE) under ASGI, or answers the JSON page of RunViewSet.events.
    re_path(
        r"^api/v1/runs/(?P<pk>[0-9a-fA-F-]{32,36})/events/$",
        run_events_view,
        name="run-events-stream",
    ),
    path("api/v1/whoami/", whoami, name="whoami"),
    path("api/v1/usage/", usage_report, name="usage"),
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]

handler404 = json_or_default(defaults.page_not_found, ErrorCode.NOT_FOUND, "Not found.", 404)
handler500 = json_or_default(
    defaults.server_error, ErrorCode.SERVER_ERROR, "Internal server error.", 500
)
handler400 = json_or_default(defaults.bad_request, ErrorCode.BAD_REQUEST, "Bad request.", 400)
handler403 = json_or_default(
    defaults.permission_denied, ErrorCode.PERMISSION_DENIED, "Forbidden.", 403
)
