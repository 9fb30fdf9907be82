"""Tests for the fake OpenAI-compatible server used by the test suite and benchmarks.

The server runs in-process on a free port; requests go over real HTTP, through the
official ``openai`` SDK or through urllib when the raw status/headers/body matter.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from harness.fake_server import FakeOpenAIServer, max_in_window

# No proxies: the server is always on 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def _running_server():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def server(_running_server: FakeOpenAIServer) -> FakeOpenAIServer:
    _running_server.reset()
    return _running_server


@pytest.fixture
def client(server: FakeOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0, timeout=10)


def _root(server: FakeOpenAIServer) -> str:
    return server.base_url.removesuffix("/v1")


def raw_request(
    server: FakeOpenAIServer,
    method: str,
    path: str,
    body: Any = None,
    data: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Send a request with urllib; return (status, headers, raw body) even for errors."""
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310
        _root(server) + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", "Authorization": "Bearer test"},
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def chat_raw(server: FakeOpenAIServer, model: str, content: str = "hello"):
    return raw_request(
        server,
        "POST",
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": content}]},
    )


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# -- plain answers ---------------------------------------------------------------------------


def test_plain_answer_substitutes_input_and_reports_usage(server, client):
    question = "What is {2+2}? {tool_results} {0}"
    response = client.chat.completions.create(
        model="m-plain",
        messages=[{"role": "system", "content": "Be brief."}, user(question)],
    )

    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == "m-plain"
    assert isinstance(response.created, int) and response.created > 0
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    # Braces in the input are inserted verbatim, never interpreted as placeholders.
    assert choice.message.content == "Fake answer to: " + question
    assert choice.message.tool_calls is None

    usage = response.usage
    assert usage is not None
    assert usage.prompt_tokens >= 2
    assert usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    assert server.count("m-plain") == 1
    assert server.count("m-other") == 0
    [(model, body)] = server.requests
    assert model == "m-plain"
    assert body["messages"][-1] == {"role": "user", "content": question}


def test_usage_grows_with_the_prompt(server, client):
    short = client.chat.completions.create(model="m", messages=[user("hi")])
    long = client.chat.completions.create(model="m", messages=[user("hi " * 200)])
    assert long.usage.prompt_tokens > short.usage.prompt_tokens
    assert long.usage.completion_tokens > short.usage.completion_tokens


def test_list_content_parts_are_joined(server, client):
    server.configure(final="<{input}>")
    response = client.chat.completions.create(
        model="m-parts",
        messages=[
            user(
                [
                    {"type": "text", "text": "hello"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "world"},
                ]
            )
        ],
    )
    content = response.choices[0].message.content
    assert content.startswith("<hello") and content.endswith("world>")
    assert "image" not in content


def test_models_endpoint_lists_seen_and_configured_models(server, client):
    server.configure("m-configured", final="x")
    client.chat.completions.create(model="m-seen", messages=[user("hi")])
    ids = [model.id for model in client.models.list()]
    assert ids == ["m-configured", "m-seen"]


# -- scripted tool calls ---------------------------------------------------------------------


def test_tool_call_turn_then_final_answer_with_tool_results(server, client):
    server.configure(
        tool_calls=[
            [
                {"name": "lookup", "arguments": {"q": "{input}", "n": 3}},
                {"name": "clock", "arguments": {}},
            ]
        ],
        final="Done: {tool_results} (for {input})",
    )
    messages: list[dict[str, Any]] = [user("weather in {city}")]

    first = client.chat.completions.create(model="m-tools", messages=messages)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [call.id for call in calls] == ["call_0_0", "call_0_1"]
    assert [call.type for call in calls] == ["function", "function"]
    assert [call.function.name for call in calls] == ["lookup", "clock"]
    assert json.loads(calls[0].function.arguments) == {"q": "weather in {city}", "n": 3}
    assert json.loads(calls[1].function.arguments) == {}

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": "call_0_0", "content": "sunny"})
    messages.append({"role": "tool", "tool_call_id": "call_0_1", "content": "noon"})
    second = client.chat.completions.create(model="m-tools", messages=messages)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content == "Done: sunny; noon (for weather in {city})"
    assert server.count("m-tools") == 2


def test_turns_are_counted_from_the_last_user_message(server, client):
    server.configure(
        tool_calls=[
            [{"name": "first", "arguments": {}}],
            [{"name": "second", "arguments": {"x": "{input}"}}],
        ]
    )
    history = [
        user("old question"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0_0",
                    "type": "function",
                    "function": {"name": "first", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0_0", "content": "r1"},
        {"role": "assistant", "content": "old answer"},
    ]
    # A new user message starts over at turn 0.
    response = client.chat.completions.create(model="m", messages=[*history, user("new")])
    assert response.choices[0].message.tool_calls[0].function.name == "first"

    # Two assistant messages after the last user message: past the script, final answer.
    response = client.chat.completions.create(model="m", messages=history)
    assert response.choices[0].message.content == "Fake answer to: old question"

    # One assistant message after the last user message: second scripted turn.
    response = client.chat.completions.create(model="m", messages=history[:3])
    [call] = response.choices[0].message.tool_calls
    assert call.id == "call_1_0"
    assert call.function.name == "second"
    assert json.loads(call.function.arguments) == {"x": "old question"}


# -- per-model configuration -----------------------------------------------------------------


def test_per_model_override_does_not_affect_other_models(server, client):
    server.configure("m-a", final="A says {input}")
    server.configure(final="Default says {input}")

    a = client.chat.completions.create(model="m-a", messages=[user("hi")])
    b = client.chat.completions.create(model="m-b", messages=[user("hi")])
    assert a.choices[0].message.content == "A says hi"
    assert b.choices[0].message.content == "Default says hi"

    # Overrides are merged over the defaults, not replacing them.
    server.configure("m-a", omit_usage=True)
    a = client.chat.completions.create(model="m-a", messages=[user("yo")])
    b = client.chat.completions.create(model="m-b", messages=[user("yo")])
    assert a.choices[0].message.content == "A says yo"
    assert a.usage is None
    assert b.usage is not None

    server.reset()
    a = client.chat.completions.create(model="m-a", messages=[user("hi")])
    assert a.choices[0].message.content == "Fake answer to: hi"
    assert server.count("m-a") == 1


def test_constructor_behaviour_is_the_default_and_survives_reset():
    with FakeOpenAIServer(final="ctor {input}") as own:
        own.configure(final="changed")
        own.reset()
        client = openai.OpenAI(base_url=own.base_url, api_key="test", max_retries=0)
        response = client.chat.completions.create(model="m", messages=[user("x")])
        assert response.choices[0].message.content == "ctor x"


def test_unknown_or_invalid_behaviour_is_rejected(server):
    with pytest.raises(ValueError, match="unknown behaviour"):
        server.configure(latency=5)
    with pytest.raises(ValueError, match="nonsense"):
        server.configure(nonsense="garbage")
    with pytest.raises(ValueError, match="tool_calls"):
        server.configure(tool_calls=[{"name": "not wrapped in a turn"}])
    with pytest.raises(ValueError):
        FakeOpenAIServer(error_rate=2)


# -- injected errors -------------------------------------------------------------------------


def test_fail_first_gives_two_500s_then_success(server, client):
    server.configure("m-flaky", fail_first=2)

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as excinfo:
            client.chat.completions.create(model="m-flaky", messages=[user("hi")])
        assert excinfo.value.status_code == 500
        assert excinfo.value.body["type"] == "server_error"
        assert "message" in excinfo.value.body

    response = client.chat.completions.create(model="m-flaky", messages=[user("hi")])
    assert response.choices[0].message.content == "Fake answer to: hi"
    assert server.count("m-flaky") == 3

    # fail_first for one model leaves the others alone.
    other = client.chat.completions.create(model="m-steady", messages=[user("hi")])
    assert other.choices[0].finish_reason == "stop"


def test_rate_limit_with_retry_after_header(server, client):
    server.configure("m-limited", error_rate=1.0, error_status=429, retry_after=7)

    status, headers, raw = chat_raw(server, "m-limited")
    assert status == 429
    assert headers["Retry-After"] == "7"
    error = json.loads(raw)["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"]

    with pytest.raises(openai.RateLimitError) as excinfo:
        client.chat.completions.create(model="m-limited", messages=[user("hi")])
    assert excinfo.value.response.headers["retry-after"] == "7"

    status, headers, _ = chat_raw(server, "m-unlimited")
    assert status == 200
    assert "Retry-After" not in headers


def test_error_without_retry_after_has_no_header(server):
    server.configure(fail_first=1, error_status=503)
    status, headers, raw = chat_raw(server, "m")
    assert status == 503
    assert "Retry-After" not in headers
    assert set(json.loads(raw)["error"]) >= {"message", "type", "code"}
    assert chat_raw(server, "m")[0] == 200


def test_error_rate_is_random(server):
    server.configure(error_rate=0.5)
    statuses = [chat_raw(server, "m-coin")[0] for _ in range(60)]
    assert set(statuses) == {200, 500}


# -- nonsense responses ----------------------------------------------------------------------


def test_nonsense_html(server):
    server.configure(nonsense="html")
    status, headers, raw = chat_raw(server, "m")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert raw == b"<html>oops</html>"


def test_nonsense_not_json(server):
    server.configure(nonsense="not_json")
    status, headers, raw = chat_raw(server, "m")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert raw
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def test_nonsense_no_choices(server):
    server.configure(nonsense="no_choices")
    status, _, raw = chat_raw(server, "m")
    body = json.loads(raw)
    assert status == 200
    assert "choices" not in body
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"


def test_nonsense_empty_choices(server):
    server.configure(nonsense="empty_choices")
    status, _, raw = chat_raw(server, "m")
    assert status == 200
    assert json.loads(raw)["choices"] == []


def test_nonsense_bad_tool_args(server):
    server.configure(nonsense="bad_tool_args")
    status, _, raw = chat_raw(server, "m")
    assert status == 200
    choice = json.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert isinstance(call["function"]["name"], str) and call["function"]["name"]
    arguments = call["function"]["arguments"]
    assert isinstance(arguments, str)
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments)


def test_nonsense_applies_only_to_the_configured_model(server):
    server.configure("m-broken", nonsense="html")
    assert chat_raw(server, "m-broken")[2] == b"<html>oops</html>"
    status, _, raw = chat_raw(server, "m-fine", "hey")
    assert status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"] == "Fake answer to: hey"


# -- omitted fields --------------------------------------------------------------------------


def test_omit_usage(server, client):
    server.configure(omit_usage=True)
    status, _, raw = chat_raw(server, "m")
    body = json.loads(raw)
    assert status == 200
    assert "usage" not in body
    assert body["choices"][0]["message"]["content"] == "Fake answer to: hello"
    assert client.chat.completions.create(model="m", messages=[user("x")]).usage is None


def test_omit_tool_call_ids_and_finish_reason(server):
    server.configure(
        tool_calls=[[{"name": "a", "arguments": {"k": "v"}}, {"name": "b", "arguments": {}}]],
        omit_tool_call_ids=True,
        omit_finish_reason=True,
    )
    _, _, raw = chat_raw(server, "m")
    choice = json.loads(raw)["choices"][0]
    assert "finish_reason" not in choice
    calls = choice["message"]["tool_calls"]
    assert len(calls) == 2
    for call in calls:
        assert "id" not in call
        assert call["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"k": "v"}


def test_tool_call_ids_and_finish_reason_present_by_default(server):
    server.configure(tool_calls=[[{"name": "a", "arguments": {}}]])
    _, _, raw = chat_raw(server, "m")
    choice = json.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["id"] == "call_0_0"
    assert choice["message"]["content"] is None


# -- control endpoints and HTTP details ------------------------------------------------------


def test_control_endpoints(server, client):
    status, _, raw = raw_request(
        server, "POST", "/_fake/config", {"model": "m-remote", "final": "remote {input}"}
    )
    assert status == 200
    assert json.loads(raw)["overrides"]["m-remote"]["final"] == "remote {input}"
    status, _, _ = raw_request(server, "POST", "/_fake/config", {"latency_ms": 0, "fail_first": 1})
    assert status == 200
    assert server.behaviour()["fail_first"] == 1
    server.configure(fail_first=0)

    response = client.chat.completions.create(model="m-remote", messages=[user("hi")])
    assert response.choices[0].message.content == "remote hi"
    assert server.behaviour("m-remote")["final"] == "remote {input}"
    assert server.behaviour("m-other")["final"] == "Fake answer to: {input}"

    status, _, raw = raw_request(server, "GET", "/_fake/requests")
    logged = json.loads(raw)
    assert status == 200
    assert [entry["model"] for entry in logged["requests"]] == ["m-remote"]
    assert logged["requests"][0]["body"]["messages"] == [user("hi")]
    assert logged["counts"] == {"m-remote": 1}

    status, _, raw = raw_request(server, "POST", "/_fake/config", {"no_such_key": 1})
    assert status == 400
    assert "no_such_key" in json.loads(raw)["error"]["message"]

    status, _, _ = raw_request(server, "POST", "/_fake/reset", data=b"")
    assert status == 200
    assert server.count("m-remote") == 0
    assert server.requests == []
    response = client.chat.completions.create(model="m-remote", messages=[user("hi")])
    assert response.choices[0].message.content == "Fake answer to: hi"


def test_request_times_record_arrivals(server):
    before = time.time()
    for model in ("m-a", "m-b", "m-a"):
        assert chat_raw(server, model)[0] == 200
    after = time.time()

    times_a = server.request_times("m-a")
    assert len(times_a) == 2
    assert times_a == sorted(times_a)
    assert all(before <= at <= after for at in times_a)
    assert len(server.request_times("m-b")) == 1
    assert server.request_times() == sorted([*times_a, *server.request_times("m-b")])
    assert server.request_times("m-none") == []

    # The control endpoint carries the same times, and what it carried before.
    logged = json.loads(raw_request(server, "GET", "/_fake/requests")[2])["requests"]
    assert [(entry["model"], entry["at"]) for entry in logged if entry["model"] == "m-a"] == [
        ("m-a", at) for at in times_a
    ]
    assert all(set(entry) == {"model", "body", "at"} for entry in logged)

    server.reset()
    assert server.request_times() == []


def test_max_in_window_counts_the_busiest_sliding_window():
    assert max_in_window([], 1.0) == 0
    assert max_in_window([5.0], 1.0) == 1
    # Unaligned: [0.2, 1.2) holds four though no aligned second holds more than three.
    assert max_in_window([1.3, 0.0, 1.1, 0.2, 1.0, 0.4], 1.0) == 4
    # Exactly one window apart: different windows.
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_in_window([0.0, 0.999, 1.998], 1.0) == 2
    assert max_in_window([0.0, 0.0, 0.0], 0.5) == 3
    with pytest.raises(ValueError, match="window"):
        max_in_window([0.0], 0)


def test_malformed_json_is_a_400_in_openai_format(server):
    status, headers, raw = raw_request(
        server, "POST", "/v1/chat/completions", data=b'{"model": "m", "messages": ['
    )
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert server.requests == []


def test_unknown_path_is_a_json_404(server):
    for method, data in (("GET", None), ("POST", b"{}")):
        status, _, raw = raw_request(server, method, "/v1/nope", data=data)
        assert status == 404
        assert "/v1/nope" in json.loads(raw)["error"]["message"]


def test_requests_property_is_a_copy(server, client):
    client.chat.completions.create(model="m", messages=[user("hi")])
    server.requests[0][1]["messages"].clear()
    assert server.requests[0][1]["messages"] == [user("hi")]


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for text in ("one", "two", "three"):
            payload = json.dumps({"model": "m", "messages": [user(text)]})
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=payload,
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            assert response.version == 11
            assert response.getheader("Content-Length") is not None
            body = json.loads(response.read())
            assert body["choices"][0]["message"]["content"] == f"Fake answer to: {text}"
            assert not response.will_close
    finally:
        conn.close()
    assert server.count("m") == 3


def test_concurrent_requests(server):
    server.configure(latency_ms=50)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        status = chat_raw(server, "m-busy")[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=worker) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [200] * 40
    assert server.count("m-busy") == 40


def test_latency_delays_the_answer(server, client):
    server.configure("m-slow", latency_ms=300)
    started = time.monotonic()
    response = client.chat.completions.create(model="m-slow", messages=[user("hi")])
    assert time.monotonic() - started >= 0.3
    assert response.choices[0].message.content == "Fake answer to: hi"


def test_stop_closes_the_server():
    server = FakeOpenAIServer().start()
    url = server.base_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert chat_raw(server, "m")[0] == 200
    server.stop()
    request = urllib.request.Request(url + "/models")  # noqa: S310
    with pytest.raises(urllib.error.URLError):
        _OPENER.open(request, timeout=5)
