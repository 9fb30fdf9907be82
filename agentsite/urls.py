from django.contrib import admin
from django.urls import path

from .health import healthz, readyz

admin.site.site_header = "Agentsite"
admin.site.site_title = "Agentsite admin"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]
