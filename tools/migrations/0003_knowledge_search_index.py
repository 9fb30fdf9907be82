"""The GIN index that serves knowledge_search's full-text queries (PostgreSQL only).

It indexes the same weighted tsvector expression as ``tools.knowledge.search_vector()`` (title A,
tags B, body C, config "english"); the planner only uses an expression index for a query over an
identical expression, so the two must change together. The expression is written out here rather
than imported, so this migration keeps meaning what it meant when it was applied.

Not in KnowledgeDocument.Meta.indexes: an expression index over SearchVector cannot be built on
SQLite (the embedded database of a zero-config run), so on other databases this does nothing.
"""

from django.db import migrations

INDEX_NAME = "tools_kdoc_search_gin"


def _index():
    from django.contrib.postgres.indexes import GinIndex
    from django.contrib.postgres.search import SearchVector

    vector = (
        SearchVector("title", weight="A", config="english")
        + SearchVector("tags", weight="B", config="english")
        + SearchVector("body", weight="C", config="english")
    )
    return GinIndex(vector, name=INDEX_NAME)


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.add_index(apps.get_model("tools", "KnowledgeDocument"), _index())


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(INDEX_NAME)}")


class Migration(migrations.Migration):
    dependencies = [
        ("tools", "0002_catalogue_grants_outbox"),
    ]

    operations = [
        migrations.RunPython(create_index, drop_index, elidable=False),
    ]
