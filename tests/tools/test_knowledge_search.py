"""knowledge_search: full-text search on PostgreSQL, word matching elsewhere, one result shape."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from pydantic import ValidationError

from tools import knowledge
from tools.knowledge import KnowledgeSearchArgs, knowledge_search
from tools.models import KnowledgeDocument
from tools.registry import ToolContext, registry

CTX = ToolContext(
    run_id="r", step_index=1, idempotency_key="r:1", attempt=1, tool="knowledge_search"
)

Search = Callable[..., dict[str, Any]]


def doc(title: str, body: str, tags: str = "") -> KnowledgeDocument:
    return KnowledgeDocument.objects.create(title=title, body=body, tags=tags)


@pytest.fixture(params=["database", "word-matching"])
def search(request: pytest.FixtureRequest, db: None, monkeypatch: pytest.MonkeyPatch) -> Search:
    """The tool as the database in use runs it, and its word-matching fallback (what SQLite
    gets), both through the tool function."""
    if request.param == "word-matching":
        monkeypatch.setattr(knowledge, "_uses_postgres", lambda: False)
    elif connection.vendor != "postgresql":
        pytest.skip("the database backend is the word-matching fallback here")

    def run(query: str, **fields: Any) -> dict[str, Any]:
        return knowledge_search(KnowledgeSearchArgs(query=query, **fields), CTX)

    return run


@pytest.fixture
def pg_search(db: None) -> Search:
    if connection.vendor != "postgresql":
        pytest.skip("full-text search needs PostgreSQL")
    assert knowledge._uses_postgres()

    def run(query: str, **fields: Any) -> dict[str, Any]:
        return knowledge_search(KnowledgeSearchArgs(query=query, **fields), CTX)

    return run


def titles(result: dict[str, Any]) -> list[str]:
    return [d["title"] for d in result["documents"]]


@pytest.fixture
def kb(db: None) -> None:
    doc(
        "Refund policy",
        "You can get your money back within 30 days of purchase. Send the receipt to support.",
        tags="refund, returns, money",
    )
    doc(
        "Shipping times",
        "Orders ship within 2 days. Delivery takes a week. Shipping costs get no refund.",
        tags="delivery",
    )
    doc("Password reset", "Use the forgot password link on the sign-in page.", tags="account")
    doc(
        "Store credit",
        "Instead of a refund to your card we can issue store credit, valid one year.",
    )


# --- both backends ---------------------------------------------------------------------------


def test_result_shape_and_title_match_ranks_above_body_match(search: Search, kb: None) -> None:
    result = search("refund")
    assert result["query"] == "refund"
    assert set(result) == {"query", "documents"}
    documents = result["documents"]
    # The title (and tags) match beats the documents that only mention it in their text.
    assert titles(result)[0] == "Refund policy"
    assert set(titles(result)) == {"Refund policy", "Shipping times", "Store credit"}
    for document in documents:
        assert set(document) == {"title", "excerpt", "score"}
        assert type(document["score"]) is float
        assert document["excerpt"] == KnowledgeDocument.objects.get(title=document["title"]).body
    scores = [d["score"] for d in documents]
    assert scores[0] > scores[1] >= scores[2] > 0
    # Equal scores are ordered by title.
    if scores[1] == scores[2]:
        assert titles(result)[1:] == sorted(titles(result)[1:])


def test_tags_count_more_than_body(search: Search, db: None) -> None:
    doc("Alpha", "Nothing about it here, but the warranty is mentioned once.")
    doc("Beta", "Nothing at all.", tags="warranty")
    assert titles(search("warranty")) == ["Beta", "Alpha"]


def test_plural_query_finds_the_singular(search: Search, kb: None) -> None:
    result = search("refunds")
    assert "Store credit" in titles(result)  # its text says "refund", never "refunds"
    assert titles(result)[0] == "Refund policy"


@pytest.mark.parametrize("query", ["the and of", "???", "!!! ... ,,, ;;;", "-", '""', "a the"])
def test_query_of_stop_words_or_punctuation_finds_nothing(
    search: Search, kb: None, query: str
) -> None:
    assert search(query) == {"query": query, "documents": []}


def test_no_match_is_an_empty_list(search: Search, kb: None) -> None:
    assert search("kangaroo")["documents"] == []


def test_limit_is_respected(search: Search, db: None) -> None:
    for n in range(12):
        doc(f"FAQ {n:02d}", f"Frequently asked question number {n} about invoices.")
    assert len(search("invoices")["documents"]) == 3  # the default
    assert titles(search("invoices", limit=2)) == ["FAQ 00", "FAQ 01"]
    assert len(search("invoices", limit=10)["documents"]) == 10


def test_excluded_word_is_excluded(search: Search, kb: None) -> None:
    result = search("refund -shipping")
    assert "Shipping times" not in titles(result)
    assert {"Refund policy", "Store credit"} <= set(titles(result))


def test_long_body_is_excerpted_around_the_match(search: Search, db: None) -> None:
    filler = "Lorem ipsum dolor sit amet consectetur. " * 60
    body = filler + "The warranty covers water damage for two years. " + filler
    assert len(body) > 4000
    doc("Warranty terms", body)
    [found] = search("warranty")["documents"]
    assert 0 < len(found["excerpt"]) <= 1000
    assert "warranty covers water damage" in found["excerpt"]


@pytest.mark.parametrize(
    "query",
    [
        "'",
        '"',
        '"unclosed phrase',
        "\\",
        "refund\\",
        "\\'; --",
        "&|!:*",
        "refund & shipping | !password",
        "refund:* <-> (money)",
        "!!(refund",
        "'); DROP TABLE tools_knowledgedocument; --",
        "refund' OR '1'='1",
        "%_%",
        "refund\x00money",
        "-\\- -' -\" --refund",
        "OR or OR -",
        "ümlaut naïve 日本語",
        "a:*B & " * 60,
    ],
)
def test_hostile_input_never_raises(search: Search, kb: None, query: str) -> None:
    result = search(query[:500])
    assert result["query"] == query[:500]
    assert isinstance(result["documents"], list)
    assert KnowledgeDocument.objects.count() == 4


def test_injected_operators_are_searched_as_words(search: Search, kb: None) -> None:
    # The tsquery operators are not interpreted: "!password" does not mean "not password".
    assert titles(search("password & !reset:*"))[:1] == ["Password reset"]
    assert "Password reset" not in titles(search("%"))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"query": ""}, "at least 1 character"),
        ({"query": "x" * 501}, "at most 500 characters"),
        ({"query": "refund", "limit": 0}, "greater than or equal to 1"),
        ({"query": "refund", "limit": 11}, "less than or equal to 10"),
    ],
)
def test_arguments_are_validated(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        KnowledgeSearchArgs(**fields)


def test_registered_with_a_description_of_what_it_searches() -> None:
    spec = registry.get("knowledge_search")
    assert spec is not None and spec.func is knowledge_search
    assert "knowledge base" in spec.description
    assert {"title", "tags", "text"} <= set(spec.description.replace(",", " ").split())
    schema = spec.parameters_schema()
    assert schema["properties"]["query"]["maxLength"] == 500
    assert schema["properties"]["limit"]["maximum"] == 10
    assert schema["properties"]["limit"]["default"] == 3


# --- PostgreSQL full-text search -------------------------------------------------------------


def test_stemming(pg_search: Search, db: None) -> None:
    doc("Returns", "Items can be returned unused.")
    doc("Payments", "We are refunding the payment.")
    assert titles(pg_search("refunded")) == ["Payments"]
    assert titles(pg_search("return")) == ["Returns"]


def test_exact_phrase(pg_search: Search, db: None) -> None:
    doc("A", "Read the refund policy before buying.")
    doc("B", "Our policy on any refund is generous.")
    assert set(titles(pg_search("refund policy"))) == {"A", "B"}
    assert titles(pg_search('"refund policy"')) == ["A"]
    assert titles(pg_search('"policy refund"')) == []


def test_all_words_must_match_unless_or(pg_search: Search, kb: None) -> None:
    assert titles(pg_search("refund card")) == ["Store credit"]
    assert set(titles(pg_search("password or delivery"))) == {"Password reset", "Shipping times"}
    # Operators are taken literally: no broadening to documents with any of the words.
    assert titles(pg_search("refund -money -card -delivery")) == []


def test_a_question_without_a_document_holding_every_word_finds_any_word(
    pg_search: Search, kb: None
) -> None:
    result = pg_search("how long does it take to get my money back after a refund request")
    # No document has "request"; the ones with the most of the other words come first.
    assert titles(result)[0] == "Refund policy"
    assert len(result["documents"]) == 3


def test_query_uses_the_gin_index(db: None) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the index is PostgreSQL's")
    KnowledgeDocument.objects.bulk_create(
        KnowledgeDocument(
            title=f"Document {n}",
            body=f"Body text number {n} about topic{n % 97} and subject{n % 13}.",
            tags=f"tag{n % 7}",
        )
        for n in range(3000)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE tools_knowledgedocument")
        # Otherwise a small table may be read whole; with seq scans priced out, only a
        # matching expression lets the planner use the index at all.
        cursor.execute("SET LOCAL enable_seqscan = off")
    for query in (
        knowledge.websearch_query("topic5 subject3"),
        knowledge.any_word_query("topic5 subject3"),
    ):
        assert query is not None
        plan = knowledge.matching_documents(query)[:3].explain()
        assert f"Bitmap Index Scan on {knowledge.SEARCH_INDEX_NAME}" in plan, plan


def test_index_exists_after_migrations(db: None) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the index is PostgreSQL's")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename, indexdef FROM pg_indexes WHERE indexname = %s",
            [knowledge.SEARCH_INDEX_NAME],
        )
        rows = cursor.fetchall()
    assert len(rows) == 1
    table, definition = rows[0]
    assert table == "tools_knowledgedocument"
    assert "USING gin" in definition
    for column, weight in (("title", "A"), ("tags", "B"), ("body", "C")):
        # e.g. setweight(to_tsvector('english'::regconfig, COALESCE(body, ''::text)), 'C'::"char")
        pattern = (
            rf"setweight\(to_tsvector\('english'::regconfig, \(?COALESCE\({column}, "
            rf"''::[a-z ]+\)(\)::text)?\), '{weight}'::\"char\"\)"
        )
        assert re.search(pattern, definition), (column, definition)
