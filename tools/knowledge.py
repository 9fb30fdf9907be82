"""The built-in ``knowledge_search`` tool: full-text search over the KnowledgeDocument table.

On PostgreSQL it is a real full-text search (English stemming and stop words, web-search syntax,
ranking that weighs the title over the tags over the body), served by the GIN index that
migration ``0003_knowledge_search_index`` creates over :func:`search_vector`. On other databases
(the embedded SQLite of a zero-config run) a simple word-matching search stands in, with the same
arguments and result shape.
"""

from __future__ import annotations

import re
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Any, TypedDict

from django.db import connections
from django.db.models import F, Q, QuerySet
from django.db.models.expressions import CombinedExpression
from pydantic import BaseModel, Field

from .models import KnowledgeDocument
from .registry import ToolContext, tool

if TYPE_CHECKING:
    from django.contrib.postgres.search import SearchQuery
    from django_stubs_ext import WithAnnotations

SEARCH_CONFIG = "english"
# Created by tools/migrations/0003_knowledge_search_index.py (PostgreSQL only).
SEARCH_INDEX_NAME = "tools_kdoc_search_gin"
EXCERPT_CHARS = 1000
# At most this many words of a query take part in the "any word" search (both backends).
MAX_QUERY_WORDS = 32


class KnowledgeSearchArgs(BaseModel):
    query: str = Field(
        min_length=1,
        max_length=500,
        description=(
            'What to look for, in words. Supports "exact phrase", -excluded and OR, '
            "like a web search."
        ),
    )
    limit: int = Field(default=3, ge=1, le=10, description="How many documents at most.")


@tool(
    name="knowledge_search",
    description=(
        "Full-text search of the knowledge base documents (their titles, tags and text). "
        "Returns the best matching documents, most relevant first, each with its title, an "
        "excerpt of its text (the whole text when short) and a relevance score."
    ),
    risk="low",
    timeout=10,
)
def knowledge_search(args: KnowledgeSearchArgs, ctx: ToolContext) -> dict[str, Any]:
    # PostgreSQL text cannot hold NUL characters (psycopg refuses them); they mean nothing here.
    text = args.query.replace("\x00", " ")
    if _uses_postgres():
        documents = _search_postgres(text, args.limit)
    else:
        documents = _search_words(text, args.limit)
    return {"query": args.query, "documents": documents}


def _uses_postgres() -> bool:
    return connections[KnowledgeDocument.objects.db].vendor == "postgresql"


# --- PostgreSQL: full-text search ------------------------------------------------------------


def search_vector() -> CombinedExpression:
    """The weighted tsvector of a document: title A, tags B, body C.

    Migration 0003 builds its GIN index over the same expression (written out there, as a
    migration must not change when this code does); change both together, or the index stops
    being used (tests/tools/test_knowledge_search.py checks that it is).
    """
    from django.contrib.postgres.search import SearchVector

    return (
        SearchVector("title", weight="A", config=SEARCH_CONFIG)
        + SearchVector("tags", weight="B", config=SEARCH_CONFIG)
        + SearchVector("body", weight="C", config=SEARCH_CONFIG)
    )


def websearch_query(text: str) -> SearchQuery:
    """The query as a web-search engine reads it: all words, "phrases", -excluded, OR."""
    from django.contrib.postgres.search import SearchQuery

    return SearchQuery(text, search_type="websearch", config=SEARCH_CONFIG)


def any_word_query(text: str) -> SearchQuery | None:
    """Documents with any of the query's words (stemmed, stop words dropped); None if it has no
    words."""
    from django.contrib.postgres.search import SearchQuery

    words = _WORD.findall(text)[:MAX_QUERY_WORDS]
    if not words:
        return None
    queries = [SearchQuery(word, search_type="plain", config=SEARCH_CONFIG) for word in words]
    result: SearchQuery = reduce(or_, queries)
    return result


class _Ranked(TypedDict):
    rank: float


def matching_documents(
    query: SearchQuery,
) -> QuerySet[WithAnnotations[KnowledgeDocument, _Ranked]]:
    """Documents matching ``query``, best first, annotated with ``rank``; the ``@@`` filter is
    over :func:`search_vector`, so it is answered from the GIN index."""
    from django.contrib.postgres.search import SearchRank

    return (
        KnowledgeDocument.objects.alias(search=search_vector())
        .filter(search=query)
        .annotate(rank=SearchRank(F("search"), query))
        .order_by("-rank", "title")
    )


def _search_postgres(text: str, limit: int) -> list[dict[str, Any]]:
    from django.contrib.postgres.search import SearchHeadline

    query = websearch_query(text)
    found = list(matching_documents(query)[:limit])
    if not found and _is_plain(text):
        # A question in plain words ("how long do refunds take to arrive") rarely has every
        # word in one document: rank the documents with any of them instead.
        broader = any_word_query(text)
        if broader is not None:
            query = broader
            found = list(matching_documents(query)[:limit])
    long_ids = [doc.pk for doc in found if len(doc.body) > EXCERPT_CHARS]
    headlines: dict[int, str] = {}
    if long_ids:
        headlines = dict(
            KnowledgeDocument.objects.filter(pk__in=long_ids)
            .annotate(
                headline=SearchHeadline(
                    "body",
                    query,
                    config=SEARCH_CONFIG,
                    start_sel="",
                    stop_sel="",
                    max_words=60,
                    min_words=20,
                    max_fragments=4,
                    fragment_delimiter=" … ",
                )
            )
            .values_list("pk", "headline")
        )
    return [_result(doc, float(doc.rank), headlines.get(doc.pk) or doc.body) for doc in found]


def _is_plain(text: str) -> bool:
    """True when the query uses none of the web-search operators ("phrase", -word, OR)."""
    return '"' not in text and not _OPERATOR.search(text)


_OPERATOR = re.compile(r"(?:^|\s)-\w|\bor\b", re.IGNORECASE)


# --- Other databases: word matching ----------------------------------------------------------

_WORD = re.compile(r"\w+")
# A "phrase" (an unclosed quote runs to the end), a -word (a minus after a space, not e-mail's) or
# a word.
_TERM = re.compile(r'"([^"]*)"?|((?<!\S)-)?(\w+)')
_STOPWORDS = {
    *("a", "about", "an", "and", "are", "as", "at", "be", "been", "but", "by", "can", "could"),
    *("did", "do", "does", "for", "from", "had", "has", "have", "how", "i", "if", "in", "into"),
    *("is", "it", "its", "me", "my", "no", "not", "of", "on", "or", "our", "so", "than", "that"),
    *("the", "their", "them", "then", "there", "these", "they", "this", "to", "was", "we"),
    *("were", "what", "when", "where", "which", "who", "why", "will", "with", "would", "you"),
    "your",
}
# Where a word is found says how much it matters: the title most, then the tags, then the body.
_WEIGHTS = {"title": 3, "tags": 2, "body": 1}


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _search_words(text: str, limit: int) -> list[dict[str, Any]]:
    """A stand-in for full-text search: documents containing any of the query's words (crudely
    stemmed, stop words dropped) and every "phrase", none of the -excluded words, scored by
    where the words are found."""
    words: list[str] = []
    phrases: list[str] = []
    excluded: list[str] = []
    for phrase, minus, word in _TERM.findall(text.lower()):
        if minus:
            excluded.append(_stem(word))
        elif word:
            words.append(word)
        elif phrase.strip():
            phrases.append(" ".join(_WORD.findall(phrase)))
            words.extend(_WORD.findall(phrase))
    stems = list(dict.fromkeys(_stem(w) for w in words if w not in _STOPWORDS and len(w) > 1))
    stems = stems[:MAX_QUERY_WORDS]
    if not stems:
        return []

    def anywhere(term: str) -> Q:
        return Q(title__icontains=term) | Q(tags__icontains=term) | Q(body__icontains=term)

    documents = KnowledgeDocument.objects.filter(reduce(or_, map(anywhere, stems)))
    for phrase in phrases:
        documents = documents.filter(anywhere(phrase))
    for term in excluded:
        documents = documents.exclude(anywhere(term))

    best = max(_WEIGHTS.values()) * len(stems)
    scored = []
    for doc in documents[:500]:
        fields = {"title": doc.title.lower(), "tags": doc.tags.lower(), "body": doc.body.lower()}
        score = sum(
            weight for stem in stems for name, weight in _WEIGHTS.items() if stem in fields[name]
        )
        scored.append((score / best, doc))
    scored.sort(key=lambda item: (-item[0], item[1].title))
    return [_result(doc, score, _excerpt_around(doc.body, stems)) for score, doc in scored[:limit]]


def _excerpt_around(body: str, terms: list[str]) -> str:
    """The whole body when short, else EXCERPT_CHARS of it starting a little before the first
    term found in it."""
    if len(body) <= EXCERPT_CHARS:
        return body
    lowered = body.lower()
    positions = [p for p in (lowered.find(t) for t in terms) if p >= 0]
    start = max(0, min(positions, default=0) - 200)
    excerpt = body[start : start + EXCERPT_CHARS - 2]
    return ("…" if start else "") + excerpt + "…"


# --- Both -------------------------------------------------------------------------------------


def _result(doc: KnowledgeDocument, score: float, excerpt: str) -> dict[str, Any]:
    if len(excerpt) > EXCERPT_CHARS:
        excerpt = excerpt[: EXCERPT_CHARS - 1] + "…"
    return {"title": doc.title, "excerpt": excerpt, "score": round(score, 4)}
