"""The OpenAI-compatible provider against the in-process fake server, and route resolution."""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from agents.models import ModelProvider as ProviderRow
from agents.providers import (
    InvalidProviderResponse,
    ModelRequest,
    PermanentProviderError,
    ProviderError,
    ToolCallRequest,
    TransientProviderError,
    resolve_route,
)
from agents.providers.openai_compat import OpenAICompatibleProvider, parse_chat_completion
from agents.providers.scripted import ScriptedProvider
from agents.services import set_provider_api_key

API_KEY = "sk-secret-123"

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


def unique_model() -> str:
    return f"model-{uuid.uuid4().hex[:12]}"


def provider_for(server, *, timeout: float = 2, base_url: str | None = None):
    return OpenAICompatibleProvider(
        name="fake", base_url=base_url or server.base_url, api_key=API_KEY, timeout=timeout
    )


def request(model: str, text: str = "hello there", **fields) -> ModelRequest:
    return ModelRequest(
        model=model, messages=[{"role": "user", "content": text}], tools=[], **fields
    )


def bodies(server, model: str) -> list[dict]:
    return [body for name, body in server.requests if name == model]


def assert_key_hidden(error: BaseException, provider: OpenAICompatibleProvider) -> None:
    assert API_KEY not in str(error)
    assert API_KEY not in repr(error)
    assert API_KEY not in repr(provider)


# --- answers ---------------------------------------------------------------------------------


def test_a_text_answer_with_reported_usage(fake_openai):
    model = unique_model()
    fake_openai.configure(model, final="Answer: {input}")
    provider = provider_for(fake_openai)

    response = provider.complete(request(model, "what is up"))

    assert response.text == "Answer: what is up"
    assert response.tool_calls == []
    assert response.finish_reason == "stop"
    assert response.usage_reported is True
    assert response.input_tokens == len("what is up") // 4 + 1
    assert response.output_tokens == len("Answer: what is up") // 4 + 1
    assert response.raw_model == model
    assert fake_openai.count(model) == 1
    assert response.as_message() == {"role": "assistant", "content": "Answer: what is up"}


def test_a_tool_call_answer_and_what_the_server_received(fake_openai):
    model = unique_model()
    fake_openai.configure(
        model,
        tool_calls=[
            [
                {"name": "calculator", "arguments": {"expression": "{input}"}},
                {"name": "knowledge_search", "arguments": {"query": "refunds", "limit": 2}},
            ]
        ],
    )
    provider = provider_for(fake_openai)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "6*7"},
    ]

    response = provider.complete(
        ModelRequest(model=model, messages=messages, tools=[CALC_TOOL], temperature=0.25)
    )

    assert response.text is None
    assert response.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments, c.arguments_error) for c in response.tool_calls] == [
        ("call_0_0", "calculator", {"expression": "6*7"}, ""),
        ("call_0_1", "knowledge_search", {"query": "refunds", "limit": 2}, ""),
    ]
    assert response.usage_reported is True and response.output_tokens > 0
    (body,) = bodies(fake_openai, model)
    assert body["model"] == model
    assert body["messages"] == messages
    assert body["tools"] == [CALC_TOOL]
    assert body["temperature"] == 0.25


def test_a_request_without_tools_sends_no_tools_key(fake_openai):
    model = unique_model()
    provider_for(fake_openai).complete(request(model))
    (body,) = bodies(fake_openai, model)
    assert "tools" not in body


def test_missing_usage_is_estimated_and_flagged(fake_openai):
    model = unique_model()
    fake_openai.configure(model, omit_usage=True, final="a fairly long answer text")

    response = provider_for(fake_openai).complete(request(model, "some question for you"))

    assert response.usage_reported is False
    assert response.input_tokens > 0 and response.output_tokens > 0
    assert response.output_tokens == len("a fairly long answer text") // 4 + 1


def test_missing_tool_call_ids_are_filled_in(fake_openai):
    model = unique_model()
    fake_openai.configure(
        model,
        omit_tool_call_ids=True,
        tool_calls=[
            [
                {"name": "calculator", "arguments": {"expression": "1+1"}},
                {"name": "calculator", "arguments": {"expression": "2+2"}},
            ]
        ],
    )
    response = provider_for(fake_openai).complete(request(model))

    ids = [call.id for call in response.tool_calls]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 2
    assert ids == ["call_0", "call_1"]


def test_a_missing_finish_reason_gets_a_sensible_default(fake_openai):
    text_model, tool_model = unique_model(), unique_model()
    fake_openai.configure(text_model, omit_finish_reason=True)
    fake_openai.configure(
        tool_model,
        omit_finish_reason=True,
        tool_calls=[[{"name": "calculator", "arguments": {"expression": "1"}}]],
    )
    provider = provider_for(fake_openai)

    assert provider.complete(request(text_model)).finish_reason == "stop"
    assert provider.complete(request(tool_model)).finish_reason == "tool_calls"


def test_bad_tool_arguments_become_a_call_with_an_error_not_an_exception(fake_openai):
    model = unique_model()
    fake_openai.configure(
        model,
        nonsense="bad_tool_args",
        tool_calls=[[{"name": "calculator", "arguments": {"expression": "1"}}]],
    )
    response = provider_for(fake_openai).complete(request(model))

    (call,) = response.tool_calls
    assert isinstance(call, ToolCallRequest)
    assert call.name == "calculator"
    assert call.arguments_error == "arguments are not valid JSON"
    assert call.arguments == '{"broken": "json'  # the raw text is kept
    assert response.to_json()["tool_calls"][0]["arguments_error"] == call.arguments_error
    # Replayed to the model as it was sent, not re-encoded.
    assert response.as_message()["tool_calls"][0]["function"]["arguments"] == '{"broken": "json'


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("html", "not JSON"),
        ("not_json", "not JSON"),
        ("no_choices", "without any choices"),
        ("empty_choices", "without any choices"),
    ],
)
def test_nonsense_answers_are_invalid_responses_that_say_what_is_wrong(fake_openai, mode, expected):
    model = unique_model()
    fake_openai.configure(model, nonsense=mode)
    provider = provider_for(fake_openai)

    with pytest.raises(InvalidProviderResponse) as info:
        provider.complete(request(model))

    message = str(info.value)
    assert expected in message
    assert "provider 'fake'" in message and fake_openai.base_url in message
    assert info.value.transient is False
    assert info.value.code == "provider_invalid_response"
    assert_key_hidden(info.value, provider)


def test_an_html_answer_quotes_the_start_of_the_body(fake_openai):
    model = unique_model()
    fake_openai.configure(model, nonsense="html")
    with pytest.raises(InvalidProviderResponse, match="oops"):
        provider_for(fake_openai).complete(request(model))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_transient(fake_openai, status):
    model = unique_model()
    fake_openai.configure(model, fail_first=1, error_status=status)
    provider = provider_for(fake_openai)

    with pytest.raises(TransientProviderError) as info:
        provider.complete(request(model))

    assert info.value.transient is True
    assert f"HTTP {status}" in str(info.value) and "provider 'fake'" in str(info.value)
    assert info.value.retry_after is None
    assert_key_hidden(info.value, provider)
    assert fake_openai.count(model) == 1  # the SDK does not retry on its own
    # The failure was only the first request: the next one answers.
    assert provider.complete(request(model)).text


def test_a_rate_limit_is_transient_and_carries_retry_after(fake_openai):
    model = unique_model()
    fake_openai.configure(model, fail_first=1, error_status=429, retry_after=7)
    provider = provider_for(fake_openai)

    with pytest.raises(TransientProviderError) as info:
        provider.complete(request(model))

    assert info.value.retry_after == 7
    assert "HTTP 429" in str(info.value)
    assert fake_openai.count(model) == 1
    assert_key_hidden(info.value, provider)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_permanent(fake_openai, status):
    model = unique_model()
    fake_openai.configure(model, error_rate=1.0, error_status=status)
    provider = provider_for(fake_openai)

    with pytest.raises(PermanentProviderError) as info:
        provider.complete(request(model))

    assert not isinstance(info.value, TransientProviderError)
    assert info.value.transient is False
    assert f"HTTP {status}" in str(info.value)
    if status == 401:  # servers echo keys in auth errors: their words are not repeated
        assert "refused the API key" in str(info.value) and "Fake error" not in str(info.value)
    else:
        assert "Fake error" in str(info.value)  # the server's own message is passed on
    assert_key_hidden(info.value, provider)


def test_a_key_the_server_echoes_back_is_scrubbed_from_errors():
    from agents.providers.openai_compat import OpenAICompatibleProvider

    provider = OpenAICompatibleProvider(
        name="p",
        base_url="http://user:pw@127.0.0.1:1/v1?token=x",
        api_key="sk-live-SECRET99",
        timeout=1,
    )
    assert provider._scrub("Incorrect API key provided: sk-live-SECRET99.") == (
        "Incorrect API key provided: ***."
    )
    assert provider._scrub("bad key sk-other-1234567890abc") == "bad key ***"
    with pytest.raises(TransientProviderError) as info:  # nothing listens on port 1
        provider.complete(request("m"))
    assert "user" not in str(info.value) and "pw@" not in str(info.value)
    assert "token=x" not in str(info.value) and "127.0.0.1:1/v1" in str(info.value)


def test_a_slow_server_times_out_as_a_transient_error(fake_openai):
    model = unique_model()
    fake_openai.configure(model, latency_ms=1500)
    provider = provider_for(fake_openai, timeout=0.3)

    with pytest.raises(TransientProviderError) as info:
        provider.complete(request(model))

    assert "timed out" in str(info.value)
    assert "0.3s" in str(info.value)
    assert_key_hidden(info.value, provider)


def test_a_refused_connection_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    provider = OpenAICompatibleProvider(name="gone", base_url=base_url, api_key=API_KEY, timeout=2)

    with pytest.raises(TransientProviderError) as info:
        provider.complete(request(unique_model()))

    assert "could not be reached" in str(info.value)
    assert "provider 'gone'" in str(info.value) and base_url in str(info.value)
    assert_key_hidden(info.value, provider)


def test_the_api_key_is_not_in_the_repr():
    provider = OpenAICompatibleProvider(
        name="fake", base_url="http://example.invalid/v1", api_key=API_KEY, timeout=1
    )
    assert API_KEY not in repr(provider) and API_KEY not in str(provider)
    assert "fake" in repr(provider)


def test_the_api_key_is_sent_as_a_bearer_token(fake_openai):
    # The fake server does not record headers, so check the client the provider builds.
    from agents.providers.openai_compat import _client

    client = _client(fake_openai.base_url, API_KEY, 2)
    assert client.headers["Authorization"] == f"Bearer {API_KEY}"
    assert str(client.base_url) == fake_openai.base_url.rstrip("/") + "/"


def test_a_redirected_endpoint_is_followed(fake_openai):
    """A base URL that answers with a redirect (a server moved, http -> https) still works, as
    it did through the openai SDK; the POST is repeated at the new place (307/308)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    target = fake_openai.base_url.rstrip("/")

    class Moved(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.send_response(308)
            self.send_header("Location", target + self.path.removeprefix("/old"))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        model = unique_model()
        provider = OpenAICompatibleProvider(
            name="moved",
            base_url=f"http://127.0.0.1:{server.server_address[1]}/old",
            api_key=API_KEY,
            timeout=5,
        )
        response = provider.complete(request(model))
        assert response.text and fake_openai.count(model) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_placeholder_key_does_not_mangle_the_servers_words():
    from agents.providers.openai_compat import OpenAICompatibleProvider

    provider = OpenAICompatibleProvider(name="p", base_url="http://x", api_key="k", timeout=1)
    assert provider._scrub("Fake error: bad request") == "Fake error: bad request"


def test_a_query_in_the_base_url_goes_with_every_request():
    from agents.providers.openai_compat import _client

    client = _client("https://example.test/openai/v1?api-version=2024-06-01", "k", 2)
    url = client.build_request("POST", "chat/completions").url
    assert str(url) == "https://example.test/openai/v1/chat/completions?api-version=2024-06-01"


# --- parse_chat_completion on hand-written bodies --------------------------------------------

WHERE = "provider 'hand' (http://x)"


def parse(body) -> object:
    text = body if isinstance(body, str) else json.dumps(body)
    return parse_chat_completion(text, request=request("m"), where=WHERE)


def test_content_given_as_parts_is_joined():
    response = parse(
        {
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "Hello, "},
                            {"type": "text", "text": "world"},
                            "ignored",
                        ],
                    },
                    "finish_reason": "stop",
                }
            ]
        }
    )
    assert response.text == "Hello, world"
    assert response.tool_calls == [] and response.finish_reason == "stop"
    assert response.usage_reported is False and response.raw_model == "m"


def test_arguments_given_as_an_object_are_used_as_they_are():
    response = parse(
        {
            "choices": [
                {
                    "message": {
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "abc",
                                "function": {
                                    "name": "calculator",
                                    "arguments": {"expression": "1"},
                                },
                            },
                            {"id": "def", "function": {"name": "noargs", "arguments": ""}},
                        ],
                    }
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5},
            "model": "served-model",
        }
    )
    assert [(c.id, c.name, c.arguments, c.arguments_error) for c in response.tool_calls] == [
        ("abc", "calculator", {"expression": "1"}, ""),
        ("def", "noargs", {}, ""),
    ]
    assert response.finish_reason == "tool_calls"
    assert (response.input_tokens, response.output_tokens) == (11, 5)
    assert response.usage_reported is True and response.raw_model == "served-model"
    # An object is re-encoded as a JSON string when replayed to the model.
    replay = response.as_message()["tool_calls"][0]["function"]["arguments"]
    assert json.loads(replay) == {"expression": "1"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"choices": [{"message": {"content": None, "tool_calls": "calc"}}]}, "not a list"),
        ({"choices": [{"finish_reason": "stop"}]}, "choice without a message"),
        ({"choices": ["just text"]}, "choice without a message"),
        ({"choices": [{"message": "hi"}]}, "choice without a message"),
        ({"choices": [{"message": {"content": 42}}]}, "content that is not text"),
        ({"choices": [{"message": {"content": None}}]}, "neither text nor tool calls"),
        ({"choices": [{"message": {"tool_calls": [{"id": "x"}]}}]}, "without a function name"),
        ({"choices": {"0": {}}}, "without any choices"),
        ([1, 2], "not an object"),
        ("", "not JSON"),
    ],
)
def test_hand_written_nonsense_is_explained(body, expected):
    with pytest.raises(InvalidProviderResponse) as info:
        parse(body)
    assert expected in str(info.value)
    assert str(info.value).startswith(WHERE)


# --- resolve_route ---------------------------------------------------------------------------


def test_a_scripted_route_resolves_to_the_scripted_provider():
    provider, model = resolve_route("scripted:x")
    assert isinstance(provider, ScriptedProvider) and model == "x"


@pytest.mark.django_db
def test_an_env_provider_is_resolved_from_settings(settings, fake_openai):
    settings.AGENTSITE_PROVIDERS = {
        "fake": {"base_url": fake_openai.base_url, "api_key": API_KEY, "timeout": "4"}
    }
    model = unique_model()

    provider, resolved = resolve_route(f"fake:{model}")

    assert isinstance(provider, OpenAICompatibleProvider)
    assert resolved == model
    assert provider.name == "fake" and provider.base_url == fake_openai.base_url
    assert provider.timeout == 4.0
    assert provider.complete(request(resolved)).text == "Fake answer to: hello there"
    assert fake_openai.count(model) == 1


@pytest.mark.django_db
def test_the_model_part_may_contain_colons(settings, fake_openai):
    settings.AGENTSITE_PROVIDERS = {"fake": {"base_url": fake_openai.base_url}}
    _, model = resolve_route("fake:org/model:latest")
    assert model == "org/model:latest"


@pytest.mark.django_db
def test_a_provider_row_wins_over_the_env_entry_of_the_same_name(settings, fake_openai):
    settings.AGENTSITE_PROVIDERS = {"fake": {"base_url": "http://127.0.0.1:9/v1", "api_key": "x"}}
    row = ProviderRow.objects.create(name="fake", base_url=fake_openai.base_url, timeout_seconds=3)
    set_provider_api_key(provider=row, api_key="sk-row-key")
    row.refresh_from_db()
    assert row.api_key_encrypted and "sk-row-key" not in row.api_key_encrypted

    provider, model = resolve_route("fake:m1")

    assert isinstance(provider, OpenAICompatibleProvider)
    assert model == "m1"
    assert provider.base_url == fake_openai.base_url and provider.timeout == 3
    assert provider._api_key == "sk-row-key"
    assert "sk-row-key" not in repr(provider)


@pytest.mark.django_db
def test_a_disabled_row_falls_back_to_the_env_entry(settings, fake_openai):
    settings.AGENTSITE_PROVIDERS = {"fake": {"base_url": fake_openai.base_url, "api_key": "k"}}
    ProviderRow.objects.create(name="fake", base_url="http://127.0.0.1:9/v1", enabled=False)

    provider, _ = resolve_route("fake:m1")

    assert provider.base_url == fake_openai.base_url
    assert provider._api_key == "k"


@pytest.mark.django_db
def test_an_unknown_provider_names_the_variable_to_set(settings):
    settings.AGENTSITE_PROVIDERS = {}
    with pytest.raises(PermanentProviderError) as info:
        resolve_route("nope:m")
    assert "AGENTSITE_PROVIDER_NOPE_BASE_URL" in str(info.value)
    assert "'nope'" in str(info.value)
    assert not isinstance(info.value, TransientProviderError)


@pytest.mark.parametrize("route", ["bad-route", ":model", "provider:", ""])
def test_a_malformed_route_is_a_permanent_error(route):
    with pytest.raises(PermanentProviderError, match="expected provider:model"):
        resolve_route(route)


@pytest.mark.django_db
def test_a_non_numeric_env_timeout_is_a_permanent_error(settings):
    settings.AGENTSITE_PROVIDERS = {"fake": {"base_url": "http://x/v1", "timeout": "soon"}}
    with pytest.raises(PermanentProviderError, match="TIMEOUT, RPM and TPM are numbers"):
        resolve_route("fake:m")


@pytest.mark.django_db
def test_an_undecryptable_stored_key_asks_to_re_enter_it(settings):
    settings.AGENTSITE_PROVIDERS = {}
    row = ProviderRow.objects.create(name="broken", base_url="http://127.0.0.1:9/v1")
    set_provider_api_key(provider=row, api_key="sk-good")
    ProviderRow.objects.filter(pk=row.pk).update(api_key_encrypted="gAAAAAB-not-a-fernet-token")

    with pytest.raises(PermanentProviderError) as info:
        resolve_route("broken:m")

    assert "re-enter it" in str(info.value)
    assert "'broken'" in str(info.value)
    assert "sk-good" not in str(info.value)
    assert isinstance(info.value, ProviderError) and not info.value.transient
