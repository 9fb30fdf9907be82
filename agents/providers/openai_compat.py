"""Any OpenAI-compatible chat-completions server, over plain HTTP (httpx).

Servers differ in small ways (vLLM, Ollama, the llama.cpp server, OpenAI itself): usage may be
missing, tool-call ids may be missing, finish reasons vary, arguments may arrive as an object
instead of a JSON string. We parse the body ourselves so a server that answers nonsense gets a
clear message instead of an AttributeError deep in a worker.

The request is one POST of JSON with a bearer key; the official ``openai`` SDK used to make it,
but its request building cost 0.7 ms of CPU per call on top of the 0.4 ms the HTTP exchange
itself costs (bench: a worker process is CPU-bound on this path), and we used nothing else of
it: no retries (the engine retries), no parsing (done here).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.conf import settings

from .base import (
    InvalidProviderResponse,
    ModelRequest,
    ModelResponse,
    PermanentProviderError,
    RateLimitedProviderError,
    ToolCallRequest,
    TransientProviderError,
    estimate_tokens,
)

# httpx picks a pooled connection by scanning its whole pool, twice per request: with hundreds
# of calls in flight in one gevent worker that scan showed up in profiles. A few clients per
# provider, taken in turn, keep each pool small.
CLIENTS_PER_PROVIDER = 8
# Sockets per client (so per provider and process: 8 x 256); a call over the limit waits.
MAX_CONNECTIONS_PER_CLIENT = 256
USER_AGENT = "agentsite (OpenAI-compatible chat completions over httpx)"
_clients: dict[tuple[str, str, float], Iterator[httpx.Client]] = {}
_clients_lock = threading.Lock()
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def _client(base_url: str, api_key: str, timeout: float) -> httpx.Client:
    """One of the provider's shared clients (connection pools) in this process; httpx clients
    are thread-safe, which matters under the threads pool."""
    key = (base_url, hashlib.sha256(api_key.encode()).hexdigest(), timeout)
    with _clients_lock:
        clients = _clients.get(key)
        if clients is None:
            headers = {
                "Authorization": f"Bearer {api_key or 'not-needed'}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            }
            # A query in the base URL (Azure's api-version=...) goes with every request.
            parts = urlsplit(base_url)
            root = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/", query=""))
            clients = itertools.cycle(
                [
                    httpx.Client(
                        base_url=root,
                        params=parts.query or None,
                        headers=headers,
                        timeout=timeout,
                        # As the SDK did: a server moved behind a redirect still answers.
                        follow_redirects=True,
                        limits=httpx.Limits(
                            max_connections=MAX_CONNECTIONS_PER_CLIENT,
                            max_keepalive_connections=64,
                        ),
                    )
                    for _ in range(CLIENTS_PER_PROVIDER)
                ]
            )
            _clients[key] = clients
        return next(clients)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_TOKEN_LIKE = re.compile(r"\b(sk|pk|rk|key|tok)[-_][A-Za-z0-9_\-]{8,}")


def _public_url(url: str) -> str:
    """The URL without credentials or a query string, fit for messages and the audit trail."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _error_message(text: str) -> str:
    """The server's own words about an error: OpenAI's ``{"error": {"message": ...}}`` if it
    sent that, else the start of the body."""
    try:
        data = json.loads(text)
    except ValueError:
        return text
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return text


class OpenAICompatibleProvider:
    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str,
        timeout: float,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self._api_key = api_key
        self.timeout = timeout
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute

    def __repr__(self) -> str:  # never show the key
        return f"<OpenAICompatibleProvider {self.name} {self.base_url}>"

    def _scrub(self, text: str) -> str:
        """Remove the API key (and anything shaped like one) from a server's words."""
        if len(self._api_key) >= 6:  # a shorter "key" (local servers take any) is no secret,
            text = text.replace(self._api_key, "***")  # and would mangle every word
        return _TOKEN_LIKE.sub("***", text)

    def complete(self, request: ModelRequest) -> ModelResponse:
        client = _client(self.base_url, self._api_key, self.timeout)
        payload: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
        }
        if request.tools:
            payload["tools"] = request.tools
        where = f"provider {self.name!r} ({_public_url(self.base_url)})"
        limit = settings.AGENTSITE_MAX_MODEL_RESPONSE_BYTES
        try:
            request_ = client.build_request(
                "POST",
                "chat/completions",
                content=json.dumps(payload),
                headers={"Content-Type": "application/json"},
            )
            response = client.send(request_, stream=True)
            try:
                # Read at most the limit (plus one byte to know it was passed): a runaway or
                # hostile server cannot fill a worker's memory.
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        break
            finally:
                response.close()
        except httpx.TimeoutException:
            raise TransientProviderError(f"{where} timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise TransientProviderError(
                f"{where} could not be reached: {self._scrub(str(exc) or type(exc).__name__)}"
            ) from None
        status = response.status_code
        if len(body) > limit and status < 400:  # an error's words are cut, not refused
            raise InvalidProviderResponse(
                f"{where} answered more than {limit} bytes (AGENTSITE_MAX_MODEL_RESPONSE_BYTES)"
            )
        text = bytes(body).decode(response.encoding or "utf-8", errors="replace")
        if status >= 400:
            if status in (401, 403):
                # Servers often echo the key they were given; never repeat their words here.
                raise PermanentProviderError(
                    f"{where} refused the API key (HTTP {status}); check the provider's key"
                )
            detail = _short(self._scrub(_error_message(text)))
            message = f"{where} answered HTTP {status}: {detail}"
            if status == 429:
                raise RateLimitedProviderError(message, retry_after=_retry_after(response.headers))
            if status in _TRANSIENT_STATUSES or status >= 500:
                raise TransientProviderError(message, retry_after=_retry_after(response.headers))
            raise PermanentProviderError(message)
        return parse_chat_completion(text, request=request, where=where)


def parse_chat_completion(body: str, *, request: ModelRequest, where: str) -> ModelResponse:
    """Turn a chat-completions body into a ModelResponse, or say exactly what is wrong with it."""
    try:
        data = json.loads(body)
    except ValueError:
        raise InvalidProviderResponse(
            f"{where} answered with something that is not JSON: {_short(body, 120)!r}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidProviderResponse(f"{where} answered JSON that is not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise InvalidProviderResponse(f"{where} answered without any choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise InvalidProviderResponse(f"{where} answered a choice without a message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        if isinstance(content, list):  # some servers send content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        else:
            raise InvalidProviderResponse(f"{where} answered content that is not text")

    calls: list[ToolCallRequest] = []
    raw_calls = message.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise InvalidProviderResponse(f"{where} answered tool_calls that is not a list")
    for i, raw_call in enumerate(raw_calls):
        function = raw_call.get("function") if isinstance(raw_call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidProviderResponse(f"{where} answered tool call {i} without a function name")
        call_id = raw_call.get("id") or f"call_{i}"
        arguments: Any = function.get("arguments")
        error = ""
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                error = "arguments are not valid JSON"
        calls.append(
            ToolCallRequest(
                id=str(call_id), name=function["name"], arguments=arguments, arguments_error=error
            )
        )
    if content is None and not calls:
        raise InvalidProviderResponse(f"{where} answered neither text nor tool calls")
    limit = settings.AGENTSITE_MAX_MODEL_OUTPUT_CHARS
    size = len(content or "") + sum(len(json.dumps(c.arguments)) for c in calls)
    if size > limit:
        raise InvalidProviderResponse(
            f"{where} answered {size} characters; the limit is {limit} "
            "(AGENTSITE_MAX_MODEL_OUTPUT_CHARS)"
        )

    usage = data.get("usage")
    reported = False
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        reported = True
        input_tokens = int(usage["prompt_tokens"])
        completion = usage.get("completion_tokens")
        output_tokens = completion if isinstance(completion, int) else 0
    else:
        input_tokens = sum(estimate_tokens(json.dumps(m.get("content"))) for m in request.messages)
        output_tokens = estimate_tokens(content or "") + sum(
            estimate_tokens(json.dumps(c.arguments)) for c in calls
        )
    finish_reason = choice.get("finish_reason") or ("tool_calls" if calls else "stop")
    return ModelResponse(
        text=content,
        tool_calls=calls,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish_reason=str(finish_reason),
        usage_reported=reported,
        raw_model=str(data.get("model") or request.model),
    )
