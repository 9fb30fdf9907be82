"""Data the built-in tools read."""

from django.db import models


class KnowledgeArticle(models.Model):
    """An entry of the small knowledge base searched by the ``search_knowledge`` tool."""

    title = models.CharField(max_length=200, unique=True)
    body = models.TextField()
    tags = models.CharField(max_length=200, blank=True, help_text="Comma-separated keywords.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["title"]

    def __str__(self) -> str:
        return self.title
