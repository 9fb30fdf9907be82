"""The built-in ``http_get``: fetch a web page from a host the agent's grant allows.

Defence in depth: the engine checks the URL against the grant's ``url.hosts`` rule (host and
port) before the call, and the tool checks it again, with every redirect it follows (same host
only, at most ``AGENTSITE_HTTP_GET_MAX_REDIRECTS``). Each request resolves the host once,
refuses it if any address is not public (``agentsite.outbound``), and connects to the checked
address. The body is streamed and cut at ``AGENTSITE_HTTP_GET_MAX_BYTES``; the whole call has
a deadline a little under the tool's timeout (the worker's soft time limit stays the backstop,
e.g. for a slow DNS lookup).

Failures worth retrying (connection errors, timeouts, 5xx and 429, a DNS server failing) raise
TransientToolError; the rest (4xx, disallowed hosts, ports or addresses, a name that does not
exist, bad URLs, too many redirects) raise ToolError.
"""

from __future__ import annotations

import codecs
import time
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from django.conf import settings
from pydantic import BaseModel, Field, field_validator

from agentsite import outbound

from .constraints import url_host, url_not_allowed
from .registry import ToolContext, ToolError, TransientToolError, tool

TIMEOUT = 15
# The whole call (every redirect and every byte) must finish by then: under TIMEOUT, so the tool
# reports its own clear error before the worker's soft time limit interrupts it.
DEADLINE = TIMEOUT - 2
CONNECT_TIMEOUT = 5.0
USER_AGENT = "agentsite-http-get/1"
MAX_URL_LENGTH = 2000
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "application/xhtml+xml",
    }
)


def _problem_with_url(url: str) -> str | None:
    """Why ``url`` cannot be fetched, or None. Never echoes credentials."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "only http:// and https:// URLs can be fetched"
    if "@" in parts.netloc:
        return "URLs with a user name or password are not allowed"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _display(url: str) -> str:
    """``url`` without any user info or fragment, for messages and results."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


class HttpGetArgs(BaseModel):
    url: str = Field(
        max_length=MAX_URL_LENGTH,
        description="The http:// or https:// URL to fetch (its host must be allowed).",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many bytes of the body (capped by the server's limit).",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        problem = _problem_with_url(value)
        if problem:
            raise ValueError(problem)
        return value


def _allowed_hosts(ctx: ToolContext) -> list[list[str]]:
    """The hosts allowlist of every grant that applies; a host must be on each of them."""
    allowlists = []
    for constraints in ctx.all_constraint_sets():
        rules = constraints.get("url") if isinstance(constraints, Mapping) else None
        hosts = rules.get("hosts") if isinstance(rules, Mapping) else None
        if not isinstance(hosts, list | tuple) or not hosts:
            raise ToolError(
                "http_get needs a hosts allowlist on its grant (constraints "
                '{"url": {"hosts": [...]}}); ask the operator to add one'
            )
        allowlists.append([str(h) for h in hosts])
    return allowlists


def _check_allowed(url: str, allowed: list[list[str]]) -> None:
    for hosts in allowed:
        refused = url_not_allowed(url, hosts)
        if refused:
            raise ToolError(refused)


def _pin(url: str) -> outbound.Target:
    """Resolve the URL's host and check its addresses (agentsite.outbound), for http_get."""
    shown = _display(url)
    try:
        return outbound.pin(url)
    except outbound.DestinationRefused as exc:
        raise ToolError(f"cannot fetch {shown}: {exc}; http_get fetches public addresses only")
    except outbound.DestinationUnresolved as exc:
        error = TransientToolError if exc.temporary else ToolError
        raise error(f"cannot fetch {shown}: {exc}")
    except ValueError as exc:
        raise ToolError(f"cannot fetch {shown}: {exc}")


def _same_host_redirect(current: str, location: str) -> str:
    """The absolute URL a redirect from ``current`` to ``location`` points at, if http_get may
    follow it: http(s), no credentials, the same host, and no downgrade from https to http."""
    target = urljoin(current, location.strip())
    problem = _problem_with_url(target)
    if problem:
        raise ToolError(f"{_display(current)} redirects to a URL http_get cannot follow: {problem}")
    here, there = url_host(current) or "", url_host(target) or ""
    if there.rstrip(".") != here.rstrip("."):
        raise ToolError(
            f"{_display(current)} redirects to another host, {there!r} ({_display(target)}); "
            "http_get only follows redirects on the same host. Fetch that URL directly if its "
            "host is allowed."
        )
    if urlsplit(current).scheme == "https" and urlsplit(target).scheme == "http":
        raise ToolError(
            f"{_display(current)} redirects from https to plain http ({_display(target)}); "
            "http_get does not follow that"
        )
    return target


def _is_text(mime: str, body: bytes) -> bool:
    if not mime:  # no Content-Type: text unless it looks binary
        return b"\x00" not in body
    return mime.startswith("text/") or mime in TEXT_TYPES or mime.endswith(("+json", "+xml"))


def _read_body(
    response: httpx.Response, limit: int, deadline: float, url: str
) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the (decompressed) body, and whether there was more."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    inflater = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(47)  # a gzip or zlib header; output is bounded below
    elif encoding not in ("", "identity"):
        raise ToolError(f"{url} sent its body with content-encoding {encoding!r}, unsupported")
    body = bytearray()
    try:
        for raw in response.iter_raw():
            if time.monotonic() > deadline:
                raise TransientToolError(f"{url} took longer than {DEADLINE}s to send its body")
            chunk = raw if inflater is None else inflater.decompress(raw, limit + 1 - len(body))
            body += chunk
            if len(body) > limit:
                return bytes(body[:limit]), True
        if inflater is not None:
            body += inflater.flush()
    except zlib.error:
        raise ToolError(f"{url} sent a {encoding} body that could not be decompressed")
    if len(body) > limit:
        return bytes(body[:limit]), True
    return bytes(body), False


def _decode(body: bytes, charset: str | None, truncated: bool) -> str:
    try:
        encoding = codecs.lookup(charset or "utf-8").name
    except LookupError:  # an unknown charset
        encoding = "utf-8"
    # An incremental decoder drops a character cut in half by the size limit.
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    return decoder.decode(body, final=not truncated)


@tool(
    name="http_get",
    description=(
        "Fetch a web page or document with an HTTP GET and return its text. Only hosts allowed "
        "for this agent can be fetched; redirects are followed on the same host only; long "
        "bodies are cut off (truncated: true). Binary content is not returned."
    ),
    risk="medium",
    timeout=TIMEOUT,
    retries=2,
)
def http_get(args: HttpGetArgs, ctx: ToolContext) -> dict[str, Any]:
    allowed = _allowed_hosts(ctx)
    url = args.url.strip()
    problem = _problem_with_url(url)
    if problem:
        raise ToolError(f"cannot fetch {_display(url)}: {problem}")
    _check_allowed(url, allowed)
    server_limit = settings.AGENTSITE_HTTP_GET_MAX_BYTES
    limit = min(args.max_bytes or server_limit, server_limit)
    max_redirects = settings.AGENTSITE_HTTP_GET_MAX_REDIRECTS
    deadline = time.monotonic() + DEADLINE
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Accept": "*/*"}

    with outbound.http_client(follow_redirects=False, headers=headers) as client:
        redirects = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientToolError(f"fetching {_display(url)} took longer than {DEADLINE}s")
            timeout = httpx.Timeout(remaining, connect=min(CONNECT_TIMEOUT, remaining))
            client.cookies.clear()  # never send back a cookie a redirect set
            shown = _display(url)
            target = _pin(url)  # every hop: resolved once, checked, and connected to
            try:
                with client.stream(
                    "GET",
                    target.url,
                    headers=target.headers,
                    extensions=target.extensions,
                    timeout=timeout,
                ) as response:
                    status = response.status_code
                    if status in REDIRECT_STATUSES:
                        location = response.headers.get("location")
                        if not location:
                            raise ToolError(f"{shown} answered {status} without a Location")
                        if redirects >= max_redirects:
                            raise ToolError(
                                f"{shown}: too many redirects (http_get follows at most "
                                f"{max_redirects})"
                            )
                        # Host, scheme and credentials are checked before anything is sent;
                        # the same host is allowed, but check the grant again all the same.
                        url = _same_host_redirect(url, location)
                        _check_allowed(url, allowed)
                        redirects += 1
                        continue
                    reason = f"{status} {response.reason_phrase}".strip()
                    if status == 429 or status >= 500:
                        retry_after = response.headers.get("retry-after")
                        hint = f" (Retry-After: {retry_after})" if retry_after else ""
                        raise TransientToolError(f"{shown} answered {reason}{hint}")
                    if status >= 400:
                        raise ToolError(f"{shown} answered {reason}")
                    content_type = response.headers.get("content-type", "")
                    mime = content_type.partition(";")[0].strip().lower()
                    body, truncated = _read_body(response, limit, deadline, shown)
                    result: dict[str, Any] = {
                        "url": shown,
                        "status": status,
                        "content_type": content_type,
                        "text": None,
                        "truncated": truncated,
                        "bytes": len(body),
                    }
                    if _is_text(mime, body):
                        result["text"] = _decode(body, response.charset_encoding, truncated)
                    else:
                        result["note"] = (
                            f"binary content ({mime or 'unknown type'}) is not returned; "
                            "http_get returns text only"
                        )
                    return result
            except httpx.TimeoutException:
                raise TransientToolError(f"fetching {shown} timed out")
            except httpx.InvalidURL:
                raise ToolError(f"cannot fetch {shown}: not a valid URL")
            except httpx.TransportError as exc:
                # Connection refused or reset, a broken TLS handshake, ... (DNS is in _pin)
                detail = str(exc) or "connection failed"
                raise TransientToolError(f"could not fetch {shown}: {type(exc).__name__}: {detail}")
