"""The scripted provider: deterministic turns chosen from the conversation, no network."""

from __future__ import annotations

import json

import pytest

from agents.providers import (
    ModelRequest,
    PermanentProviderError,
    TransientProviderError,
)
from agents.providers.scripted import ScriptedProvider

provider = ScriptedProvider()


def user(text):
    return {"role": "user", "content": text}


def assistant(text=None, calls=()):
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {"id": c, "type": "function", "function": {"name": "t", "arguments": "{}"}}
            for c in calls
        ]
    return message


def tool(content, call_id="call_0_0"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def ask(messages, script, attempt=1):
    return provider.complete(
        ModelRequest(model="demo", messages=messages, tools=[], script=script, attempt=attempt)
    )


THREE_TURNS = [{"text": "turn one"}, {"text": "turn two"}, {"text": "turn three"}]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([user("hi")], "turn one"),
        ([user("hi"), assistant(calls=["a"]), tool("r")], "turn two"),
        ([user("hi"), assistant(calls=["a"]), tool("r"), assistant(calls=["b"])], "turn three"),
        # Only assistant messages since the *last* user message count: a new user turn restarts.
        ([user("hi"), assistant("turn one"), user("again")], "turn one"),
        ([user("hi"), assistant("x"), assistant("y"), user("again"), assistant("z")], "turn two"),
        # System and tool messages do not count as turns.
        ([{"role": "system", "content": "be nice"}, user("hi"), tool("stray")], "turn one"),
    ],
)
def test_the_turn_is_the_number_of_assistant_messages_since_the_last_user_message(
    messages, expected
):
    assert ask(messages, THREE_TURNS).text == expected


def test_past_the_end_the_last_turn_repeats():
    messages = [user("hi")] + [assistant("x")] * 7
    assert ask(messages, THREE_TURNS).text == "turn three"

    loop = [{"tool_calls": [{"name": "calculator", "arguments": {"expression": "1"}}]}]
    response = ask([user("hi"), assistant(calls=["a"]), tool("1")], loop)
    assert [c.name for c in response.tool_calls] == ["calculator"]
    assert response.tool_calls[0].id == "call_1_0"


def test_an_empty_script_echoes_the_input():
    response = ask([user("hello world")], [])
    assert response.text == "You said: hello world"
    assert response.finish_reason == "stop" and response.tool_calls == []


def test_an_empty_script_without_a_user_message_echoes_nothing():
    assert ask([{"role": "system", "content": "s"}], []).text == "You said: "


def test_text_templates_are_filled():
    script = [{"text": "Q={input} | last={last_tool_result} | all={tool_results}"}]
    messages = [
        user("earlier question"),
        assistant("old answer"),
        user("what is 6*7?"),
        assistant(calls=["a", "b"]),
        tool("first result", "a"),
        tool("second result", "b"),
    ]
    # Turn 1 (one assistant message since the last user message); past the end: the only turn.
    response = ask(messages, script)
    assert response.text == (
        "Q=what is 6*7? | last=second result | all=first result; second result"
    )


def test_tool_results_come_only_from_after_the_last_assistant_message():
    script = [{"text": "{tool_results}"}]
    messages = [
        user("go"),
        assistant(calls=["a"]),
        tool("old", "a"),
        assistant(calls=["b"]),
        tool("new", "b"),
    ]
    assert ask(messages, script).text == "new"
    assert ask([user("go")], [{"text": "[{last_tool_result}][{tool_results}]"}]).text == "[][]"


def test_content_parts_are_read_as_text():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]
    assert ask(messages, [{"text": "{input}"}]).text == "a b"


def test_templates_are_filled_in_nested_tool_arguments():
    script = [
        {
            "tool_calls": [
                {
                    "name": "lookup",
                    "arguments": {
                        "query": "{input}",
                        "nested": {"items": ["{input}!", 3, {"deep": "<{last_tool_result}>"}]},
                        "count": 2,
                        "flag": True,
                    },
                },
                {"name": "other"},
            ]
        },
        {"text": "done"},
    ]
    response = ask([user("refunds")], script)

    assert response.text is None and response.finish_reason == "tool_calls"
    first, second = response.tool_calls
    assert (first.id, first.name) == ("call_0_0", "lookup")
    assert first.arguments == {
        "query": "refunds",
        "nested": {"items": ["refunds!", 3, {"deep": "<>"}]},
        "count": 2,
        "flag": True,
    }
    assert (second.id, second.name, second.arguments) == ("call_0_1", "other", {})
    assert first.arguments_error == "" and response.output_tokens > 0
    # The script itself is not modified by filling in templates.
    assert script[0]["tool_calls"][0]["arguments"]["query"] == "{input}"


def test_a_later_turn_sees_the_tool_result_in_its_arguments():
    script = [
        {"tool_calls": [{"name": "a", "arguments": {"q": "{input}"}}]},
        {"tool_calls": [{"name": "b", "arguments": {"previous": ["{last_tool_result}"]}}]},
    ]
    messages = [user("x"), assistant(calls=["call_0_0"]), tool('{"result": 42}')]
    (call,) = ask(messages, script).tool_calls
    assert call.arguments == {"previous": ['{"result": 42}']}
    assert call.id == "call_1_0"


@pytest.mark.parametrize(
    ("kind", "error"),
    [("transient", TransientProviderError), ("permanent", PermanentProviderError)],
)
def test_a_turn_fails_its_first_attempts_then_answers(kind, error):
    script = [{"fail": kind, "fail_attempts": 2, "text": "finally"}]
    for attempt in (1, 2):
        with pytest.raises(error, match=f"scripted {kind} failure"):
            ask([user("hi")], script, attempt=attempt)
    assert ask([user("hi")], script, attempt=3).text == "finally"


def test_fail_attempts_defaults_to_one_and_a_message_can_be_given():
    script = [{"fail": "permanent", "message": "model 'x' does not exist", "text": "ok"}]
    with pytest.raises(PermanentProviderError) as info:
        ask([user("hi")], script, attempt=1)
    assert str(info.value) == "model 'x' does not exist"
    assert not isinstance(info.value, TransientProviderError)
    assert ask([user("hi")], script, attempt=2).text == "ok"


def test_a_transient_failure_is_marked_transient():
    with pytest.raises(TransientProviderError) as info:
        ask([user("hi")], [{"fail": "transient"}])
    assert info.value.transient is True


def test_only_the_failing_turn_fails():
    script = [{"text": "first"}, {"fail": "transient", "fail_attempts": 5, "text": "second"}]
    assert ask([user("hi")], script, attempt=3).text == "first"
    with pytest.raises(TransientProviderError):
        ask([user("hi"), assistant("first")], script, attempt=3)


def test_a_turn_that_is_not_an_object_is_a_permanent_error():
    with pytest.raises(PermanentProviderError, match="script turn 2 is not an object"):
        ask([user("hi"), assistant("x")], [{"text": "ok"}, "oops"])


def test_the_same_request_gets_the_same_answer():
    script = [
        {"tool_calls": [{"name": "calc", "arguments": {"expression": "{input}"}}]},
        {"text": "Result: {last_tool_result}"},
    ]
    for messages in ([user("6*7")], [user("6*7"), assistant(calls=["call_0_0"]), tool("42")]):
        first, second = ask(messages, script), ask(messages, script)
        assert first.to_json() == second.to_json()
        assert (first.input_tokens, first.output_tokens) == (
            second.input_tokens,
            second.output_tokens,
        )
    assert ask(messages, script).text == "Result: 42"


def test_the_answer_carries_token_estimates_and_the_route():
    response = ask([user("x" * 40)], [{"text": "y" * 20}])
    assert response.input_tokens == 11 and response.output_tokens == 6
    assert response.raw_model == "scripted:demo"
    assert json.loads(json.dumps(response.to_json()))["model"] == "scripted:demo"


def test_a_placeholder_in_the_user_input_is_not_substituted_again():
    messages = [user("say {tool_results} and {last_tool_result}")]
    assert ask(messages, []).text == "You said: say {tool_results} and {last_tool_result}"
