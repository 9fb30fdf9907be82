"""A fake OpenAI-compatible chat-completions HTTP server for tests and benchmarks.

The server speaks just enough of the OpenAI REST API for the official ``openai``
SDK (and any other HTTP client) to talk to it over real HTTP:

* ``POST /v1/chat/completions`` answers like a scripted, deterministic model;
* ``GET /v1/models`` lists the models that were requested or configured.

Its behaviour can be tuned server-wide or per model: artificial latency, random or
scripted failures (with an optional ``Retry-After`` header), malformed ("nonsense")
responses, missing fields, scripted tool-call turns and a final answer template.
The answer depends only on the request (and the configured behaviour), never on
earlier requests, except for ``fail_first`` and ``error_rate``.

In-process use (tests)::

    with FakeOpenAIServer(latency_ms=10) as server:
        server.configure("gpt-fake", tool_calls=[[{"name": "echo", "arguments": {}}]])
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        ...
        assert server.count("gpt-fake") == 2

Out-of-process use (a Celery worker or a benchmark talking to a separate server):
the control endpoints ``POST /_fake/config``, ``POST /_fake/reset`` and
``GET /_fake/requests`` do what :meth:`FakeOpenAIServer.configure`,
:meth:`FakeOpenAIServer.reset` and :attr:`FakeOpenAIServer.requests` do (each logged request
also carries ``"at"``, its arrival time as ``time.time()``, as
:meth:`FakeOpenAIServer.request_times` gives them).

Rate-limit tests check what reached the "provider"::

    assert max_in_window(server.request_times("gpt-fake"), 60.0) <= limit

Command line::

    python -m harness.fake_server --host 127.0.0.1 --port 8765 \\
        [--latency-ms N] [--error-rate X] [--error-status N]

prints the base URL on one line and serves until SIGINT/SIGTERM.

Only the standard library is used, so the module can be imported anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["DEFAULT_BEHAVIOUR", "NONSENSE_MODES", "FakeOpenAIServer", "main", "max_in_window"]

#: Every behaviour key with its default value.
DEFAULT_BEHAVIOUR: dict[str, Any] = {
    "latency_ms": 0,
    "error_rate": 0.0,
    "error_status": 500,
    "fail_first": 0,
    "retry_after": None,
    "nonsense": None,
    "omit_usage": False,
    "omit_tool_call_ids": False,
    "omit_finish_reason": False,
    "tool_calls": [],
    "final": "Fake answer to: {input}",
}

#: Accepted values of the ``nonsense`` behaviour key (besides ``None``).
NONSENSE_MODES = frozenset({"html", "not_json", "no_choices", "empty_choices", "bad_tool_args"})

_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    408: ("timeout_error", None),
    409: ("conflict_error", None),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def _validate_behaviour(behaviour: dict[str, Any]) -> dict[str, Any]:
    """Check behaviour keys and values; return a deep copy. Raises ``ValueError``."""
    unknown = sorted(set(behaviour) - set(DEFAULT_BEHAVIOUR))
    if unknown:
        raise ValueError(
            f"unknown behaviour key(s): {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(DEFAULT_BEHAVIOUR))}"
        )
    checked = copy.deepcopy(behaviour)
    for key, value in checked.items():
        if key == "latency_ms":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError("latency_ms must be a number >= 0")
        elif key == "error_rate":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("error_rate must be a number between 0 and 1")
            if not 0.0 <= value <= 1.0:
                raise ValueError("error_rate must be a number between 0 and 1")
        elif key == "error_status":
            if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
                raise ValueError("error_status must be an HTTP status code (int)")
        elif key == "fail_first":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("fail_first must be an int >= 0")
        elif key == "retry_after":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ValueError("retry_after must be None or a number of seconds >= 0")
        elif key == "nonsense":
            if value is not None and value not in NONSENSE_MODES:
                raise ValueError(
                    f"nonsense must be None or one of {', '.join(sorted(NONSENSE_MODES))}"
                )
        elif key in ("omit_usage", "omit_tool_call_ids", "omit_finish_reason"):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be a bool")
        elif key == "tool_calls":
            _validate_tool_calls(value)
        elif key == "final" and not isinstance(value, str):
            raise ValueError("final must be a string")
    return checked


def _validate_tool_calls(value: Any) -> None:
    message = 'tool_calls must be a list of turns, each a list of {"name": str, "arguments": dict}'
    if not isinstance(value, list):
        raise ValueError(message)
    for turn in value:
        if not isinstance(turn, list) or not turn:
            raise ValueError(message + " (turns must be non-empty lists)")
        for call in turn:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError(message)
            if not isinstance(call.get("arguments", {}), dict):
                raise ValueError(message)


def _text_of(content: Any) -> str:
    """Text of a message ``content``: a string, ``None`` or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    return str(content)


def _substitute(value: Any, replacements: dict[str, str]) -> Any:
    """Replace placeholders in every string inside ``value`` (literal, not str.format)."""
    if isinstance(value, str):
        # One pass over the template, so text inserted for one placeholder (e.g. a user
        # input containing "{tool_results}") is never substituted again.
        pattern = "|".join(re.escape(placeholder) for placeholder in replacements)
        return re.sub(pattern, lambda match: replacements[match.group(0)], value)
    if isinstance(value, list):
        return [_substitute(item, replacements) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, replacements) for key, item in value.items()}
    return value


def _estimate_tokens(texts: Iterable[str]) -> int:
    return sum(len(text) // 4 + 1 for text in texts)


def _error_body(status: int, message: str) -> dict[str, Any]:
    if status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = _ERROR_KINDS.get(status, ("invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Conversation:
    """What the scripted model needs to know about a chat-completions request."""

    def __init__(self, messages: list[Any]) -> None:
        dict_messages = [m for m in messages if isinstance(m, dict)]
        last_user = -1
        last_assistant = -1
        for index, message in enumerate(dict_messages):
            if message.get("role") == "user":
                last_user = index
            elif message.get("role") == "assistant":
                last_assistant = index
        self.input = _text_of(dict_messages[last_user].get("content")) if last_user >= 0 else ""
        self.turn = sum(
            1 for message in dict_messages[last_user + 1 :] if message.get("role") == "assistant"
        )
        self.tool_results = "; ".join(
            _text_of(message.get("content"))
            for message in dict_messages[last_assistant + 1 :]
            if message.get("role") == "tool"
        )
        self.prompt_tokens = _estimate_tokens(_text_of(m.get("content")) for m in dict_messages)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    fake: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, cancelled benchmark requests) are normal here.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 300
    # Buffer the response so headers and body leave in one write (see _send), and turn off
    # Nagle's algorithm: otherwise delayed ACKs add ~40 ms to every keep-alive response.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server: _Server

    # -- plumbing -------------------------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request access log."""

    def setup(self) -> None:
        super().setup()
        self.server.fake._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track_connection(self.connection, add=False)

    def handle_expect_100(self) -> bool:
        # wfile is buffered: the interim "100 Continue" must reach the client right away.
        accepted = super().handle_expect_100()
        self.wfile.flush()
        return accepted

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, _error_body(status, message), headers=headers)

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    # -- routing --------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        path = self._path()
        fake = self.server.fake
        if path == "/v1/models":
            created = int(fake.started_at)
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": name, "object": "model", "created": created, "owned_by": "fake"}
                        for name in fake.models()
                    ],
                },
            )
        elif path == "/_fake/requests":
            self._send_json(
                200,
                {
                    "requests": fake._logged(),
                    "counts": fake.counts(),
                },
            )
        elif path == "/_fake/config":
            self._send_json(200, fake.config())
        else:
            self._send_error(404, f"Unknown path: GET {path}")

    def do_POST(self) -> None:  # noqa: N802
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send_error(400, "Invalid Content-Length or chunked encoding")
            return
        path = self._path()
        if path == "/v1/chat/completions":
            self._chat_completions(raw)
        elif path == "/_fake/config":
            self._fake_config(raw)
        elif path == "/_fake/reset":
            self.server.fake.reset()
            self._send_json(200, {"ok": True})
        else:
            self._send_error(404, f"Unknown path: POST {path}")

    def _fallback(self) -> None:
        try:
            self._read_body()
        except ValueError:
            self.close_connection = True
        self._send_error(404, f"Unknown path: {self.command} {self._path()}")

    do_PUT = do_PATCH = do_DELETE = _fallback

    # -- endpoints ------------------------------------------------------------------------

    def _parse_json(self, raw: bytes) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._send_error(400, f"We could not parse the JSON body of your request: {exc}")
            return _INVALID

    def _fake_config(self, raw: bytes) -> None:
        body = self._parse_json(raw) if raw.strip() else {}
        if body is _INVALID:
            return
        if not isinstance(body, dict):
            self._send_error(400, "The config body must be a JSON object")
            return
        model = body.pop("model", None)
        if model is not None and not isinstance(model, str):
            self._send_error(400, "model must be a string or null")
            return
        try:
            self.server.fake.configure(model, **body)
        except ValueError as exc:
            self._send_error(400, str(exc))
            return
        self._send_json(200, {"ok": True, **self.server.fake.config()})

    def _chat_completions(self, raw: bytes) -> None:
        body = self._parse_json(raw)
        if body is _INVALID:
            return
        if not isinstance(body, dict):
            self._send_error(400, "The request body must be a JSON object")
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self._send_error(400, "you must provide a model parameter")
            return
        messages = body.get("messages")
        if not isinstance(messages, list):
            self._send_error(400, "'messages' is a required property and must be an array")
            return

        fake = self.server.fake
        behaviour, should_fail = fake._record(model, body)
        fake._enter(model)
        try:
            self._answer(model, messages, behaviour, should_fail)
        finally:
            fake._leave(model)

    def _answer(
        self, model: str, messages: list[Any], behaviour: dict[str, Any], should_fail: bool
    ) -> None:
        latency = behaviour["latency_ms"]
        if latency:
            time.sleep(latency / 1000.0)

        if should_fail:
            headers = {}
            if behaviour["retry_after"] is not None:
                headers["Retry-After"] = f"{behaviour['retry_after']:g}"
            status = behaviour["error_status"]
            self._send_error(status, f"Fake error {status} injected by the fake server", headers)
            return

        nonsense = behaviour["nonsense"]
        if nonsense == "html":
            self._send(200, b"<html>oops</html>", content_type="text/html; charset=utf-8")
            return
        if nonsense == "not_json":
            self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
            return

        self._send_json(200, _completion(model, _Conversation(messages), behaviour))


_INVALID = object()


def _completion(model: str, conversation: _Conversation, behaviour: dict[str, Any]) -> dict:
    """Build the chat.completion response for one request."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    script = behaviour["tool_calls"]
    nonsense = behaviour["nonsense"]
    replacements = {"{input}": conversation.input}

    if nonsense == "bad_tool_args" or conversation.turn < len(script):
        if nonsense == "bad_tool_args":
            turn_index = min(conversation.turn, max(len(script) - 1, 0))
            names = [call["name"] for call in script[turn_index]] if script else ["fake_tool"]
            calls = [{"name": names[0], "arguments": '{"broken": "json'}]
        else:
            calls = [
                {
                    "name": call["name"],
                    "arguments": json.dumps(_substitute(call.get("arguments", {}), replacements)),
                }
                for call in script[conversation.turn]
            ]
        tool_calls = []
        for index, call in enumerate(calls):
            entry: dict[str, Any] = {"type": "function", "function": call}
            if not behaviour["omit_tool_call_ids"]:
                entry = {"id": f"call_{conversation.turn}_{index}", **entry}
            tool_calls.append(entry)
        message["tool_calls"] = tool_calls
        finish_reason = "tool_calls"
        completion_texts = [call["name"] + call["arguments"] for call in calls]
    else:
        replacements["{tool_results}"] = conversation.tool_results
        message["content"] = _substitute(behaviour["final"], replacements)
        finish_reason = "stop"
        completion_texts = [message["content"]]

    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
    if behaviour["omit_finish_reason"]:
        del choice["finish_reason"]
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if nonsense == "no_choices":
        del response["choices"]
    elif nonsense == "empty_choices":
        response["choices"] = []
    if not behaviour["omit_usage"]:
        completion_tokens = _estimate_tokens(completion_texts)
        response["usage"] = {
            "prompt_tokens": conversation.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": conversation.prompt_tokens + completion_tokens,
        }
    return response


class FakeOpenAIServer:
    """A fake OpenAI chat-completions server running in a background daemon thread.

    ``default_behaviour`` sets the server-wide behaviour (see ``DEFAULT_BEHAVIOUR`` for
    the keys and their defaults); :meth:`configure` changes it later or overrides it for
    a single model. Use :meth:`start`/:meth:`stop` or the object as a context manager.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **default_behaviour: Any) -> None:
        self.host = host
        self._requested_port = port
        self._initial_defaults = _validate_behaviour(default_behaviour)
        self._lock = threading.Lock()
        self._defaults: dict[str, Any] = copy.deepcopy(self._initial_defaults)
        self._overrides: dict[str, dict[str, Any]] = {}
        self._counts: dict[str, int] = {}
        self._fail_first_served: dict[str, int] = {}
        self._requests: list[tuple[str, dict[str, Any]]] = []
        self._arrived: list[float] = []  # time.time() of each entry of _requests
        # Requests being answered now, and the most at once, per model (concurrency tests).
        self._in_flight: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._connections: set[socket.socket] = set()
        self._rng = random.Random()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        """Bind the socket and serve in a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("FakeOpenAIServer is already started")
        httpd = _Server((self.host, self._requested_port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self.started_at = time.time()
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"fake-openai-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and drop open keep-alive connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``). Only valid after :meth:`start`."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """Base URL for OpenAI clients, e.g. ``http://127.0.0.1:8765/v1``."""
        host = self.host
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_unspecified:
                host = "127.0.0.1"
        return f"http://{host}:{self.port}/v1"

    # -- behaviour ------------------------------------------------------------------------

    def configure(self, model: str | None = None, **behaviour: Any) -> None:
        """Set the server-wide default behaviour (``model=None``) or a per-model override.

        Keys given are merged into what was configured before; per-model overrides are
        merged over the server-wide defaults at request time. Setting ``fail_first``
        restarts its count, so the *next* N requests (for that model, or for every model
        when ``model`` is None) fail. Raises ``ValueError`` for unknown keys or bad values.
        """
        checked = _validate_behaviour(behaviour)
        with self._lock:
            if model is None:
                self._defaults.update(checked)
                if "fail_first" in checked:
                    self._fail_first_served.clear()
            else:
                self._overrides.setdefault(model, {}).update(checked)
                if "fail_first" in checked:
                    self._fail_first_served.pop(model, None)

    def behaviour(self, model: str | None = None) -> dict[str, Any]:
        """The effective behaviour for ``model`` (or the server-wide one) as a new dict."""
        with self._lock:
            return self._effective(model)

    def config(self) -> dict[str, Any]:
        """Server-wide defaults and per-model overrides (what ``GET /_fake/config`` returns)."""
        with self._lock:
            return {
                "defaults": {**copy.deepcopy(DEFAULT_BEHAVIOUR), **copy.deepcopy(self._defaults)},
                "overrides": copy.deepcopy(self._overrides),
            }

    def reset(self) -> None:
        """Restore the constructor's behaviour; clear overrides, counters and request log."""
        with self._lock:
            self._defaults = copy.deepcopy(self._initial_defaults)
            self._overrides.clear()
            self._counts.clear()
            self._fail_first_served.clear()
            self._requests.clear()
            self._arrived.clear()
            self._peak.clear()

    # -- introspection --------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        """A copy of the ``(model, parsed body)`` pairs received on /v1/chat/completions."""
        with self._lock:
            return copy.deepcopy(self._requests)

    def request_times(self, model: str | None = None) -> list[float]:
        """Sorted arrival times (``time.time()``) of the chat-completions requests for
        ``model``, or for every model: what a rate limit in front of the server let through."""
        with self._lock:
            return sorted(
                at
                for (name, _), at in zip(self._requests, self._arrived, strict=True)
                if model is None or name == model
            )

    def _logged(self) -> list[dict[str, Any]]:
        """The request log as ``GET /_fake/requests`` serialises it, with arrival times."""
        with self._lock:
            return [
                {"model": model, "body": copy.deepcopy(body), "at": at}
                for (model, body), at in zip(self._requests, self._arrived, strict=True)
            ]

    def peak_in_flight(self, model: str) -> int:
        """The most chat-completions requests for ``model`` answered at the same time."""
        with self._lock:
            return self._peak.get(model, 0)

    def _enter(self, model: str) -> None:
        with self._lock:
            now = self._in_flight.get(model, 0) + 1
            self._in_flight[model] = now
            self._peak[model] = max(now, self._peak.get(model, 0))

    def _leave(self, model: str) -> None:
        with self._lock:
            self._in_flight[model] = self._in_flight.get(model, 1) - 1

    def count(self, model: str) -> int:
        """How many chat-completions requests were received for ``model``."""
        with self._lock:
            return self._counts.get(model, 0)

    def counts(self) -> dict[str, int]:
        """Chat-completions request counts for every model seen."""
        with self._lock:
            return dict(self._counts)

    def models(self) -> list[str]:
        """Sorted names of the models requested or configured so far."""
        with self._lock:
            return sorted(set(self._counts) | set(self._overrides))

    # -- internals ------------------------------------------------------------------------

    def _effective(self, model: str | None) -> dict[str, Any]:
        merged = {**DEFAULT_BEHAVIOUR, **self._defaults}
        if model is not None:
            merged.update(self._overrides.get(model, {}))
        return copy.deepcopy(merged)

    def _record(self, model: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Log a request; return its effective behaviour and whether to inject an error."""
        with self._lock:
            self._requests.append((model, copy.deepcopy(body)))
            self._arrived.append(time.time())
            self._counts[model] = self._counts.get(model, 0) + 1
            behaviour = self._effective(model)
            served = self._fail_first_served.get(model, 0)
            if served < behaviour["fail_first"]:
                self._fail_first_served[model] = served + 1
                return behaviour, True
            rate = behaviour["error_rate"]
            return behaviour, bool(rate) and self._rng.random() < rate

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def max_in_window(times: Iterable[float], window: float) -> int:
    """The most of ``times`` that fall in any sliding window ``[t, t + window)``: what a
    limit of N per window promises never to exceed (two times exactly ``window`` apart are in
    different windows)."""
    if not window > 0:
        raise ValueError(f"window must be > 0, not {window!r}")
    ordered = sorted(times)
    most = first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.fake_server",
        description="Fake OpenAI-compatible chat-completions server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--error-status", type=int, default=500)
    args = parser.parse_args(argv)

    try:
        server = FakeOpenAIServer(
            host=args.host,
            port=args.port,
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            error_status=args.error_status,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop_requested: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        # Only record the signal: taking locks (e.g. Event.set) inside a signal handler
        # can deadlock against the interrupted main thread.
        stop_requested.append(signum)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    server.start()
    print(server.base_url, flush=True)
    try:
        while not stop_requested:
            time.sleep(0.1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
