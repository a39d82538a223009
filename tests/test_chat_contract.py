"""The chat request as the spec has it (issue 34, chat half): n, logprobs, penalties, logit
bias, response_format by constrained decoding, tools; in the engine, and through the unchanged
``openai`` SDK against the shared service, each body checked against the spec's schema."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from service.core import limits
from serving.engine.grammar import json_schema_grammar
from serving.engine.native import Engine
from serving.engine.sampling import SamplingParams
from tests.openapi_contract import assert_schema
from training.model import chat, registry

TINY = registry.TINY_MODEL_ID
HI = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "age", "role", "active", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "role": {"enum": ["admin", "user", "guest"]},
                   "active": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                            "maxItems": 3}}}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}]


def _texts(generation) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in generation:
        texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
    return texts


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- in the engine


@pytest.fixture(scope="module")
def engine():
    engine = Engine.for_base_model(TINY, dtype="float32", max_batch=32, max_pending=128)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    return chat.render_prompt(engine.tokenizer, HI)


def test_json_schema_answers_validate_100_of_100_at_temperature_1(engine, prompt):
    free = _texts(engine.submit(prompt, SamplingParams(max_tokens=40, temperature=1), n=20))
    assert not any(_parses(t) for t in free.values())  # the tiny model writes no JSON itself
    params = SamplingParams(max_tokens=120, temperature=1, grammar=json_schema_grammar(PERSON))
    answers = _texts(engine.submit(prompt, params, n=100))
    assert len(answers) == 100
    for text in answers.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(answers.values())) > 90  # sampled, not one forced answer


def test_n_choices_share_one_prefill_and_a_seed_reproduces_them(engine):
    prompt = chat.render_prompt(engine.tokenizer, [{"role": "user", "content": "Four, please."}])
    widths = []
    forward = engine.model.forward

    def counting(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    engine.model.forward = counting
    try:
        first = _texts(engine.submit(prompt, SamplingParams(max_tokens=8, seed=7), n=4))
    finally:
        engine.model.forward = forward
    assert widths[0][0] == 1  # the prompt once (what the prefix cache lacks of it), not 4 times
    assert all(w[0] == 4 for w in widths[1:])  # the four decoded together
    again = _texts(engine.submit(prompt, SamplingParams(max_tokens=8, seed=7), n=4))
    assert first == again and len(set(first.values())) == 4


def _tokens(engine: Engine, prompt: list[int], **params) -> list[bytes]:
    """The answer's tokens (as bytes), read from its log-prob entries."""
    chunks = engine.submit(prompt, SamplingParams(logprobs=0, **params))
    return [bytes(e["bytes"]) for c in chunks for e in c.logprobs or ()]


def test_logit_bias_and_penalties_act_on_the_logits(engine, prompt):
    plain = _tokens(engine, prompt, max_tokens=12, temperature=0)
    assert len(set(plain)) < len(plain)  # greedy repeats itself...
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        tokens = _tokens(engine, prompt, max_tokens=12, temperature=0, **penalty)
        assert len(set(tokens)) > len(set(plain)), penalty  # ...less so when penalised
    comma = engine.tokenizer.convert_tokens_to_ids(",")
    assert _tokens(engine, prompt, max_tokens=6, logit_bias=((comma, 100.0),)) == [b","] * 6
    first = engine.tokenizer.convert_tokens_to_ids(
        engine.tokenizer.convert_ids_to_tokens(engine.tokenizer.encode(
            plain[0].decode(), add_special_tokens=False))[0])
    banned = _tokens(engine, prompt, max_tokens=3, temperature=0, logit_bias=((first, -100.0),))
    assert banned[0] != plain[0]


def test_logprobs_are_the_sampled_distribution_and_greedy_takes_the_top(engine, prompt):
    chunks = list(engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0,
                                                       logprobs=5)))
    entries = [e for c in chunks for e in c.logprobs or ()]
    assert len(entries) == chunks[-1].completion_tokens
    for entry in entries:
        assert len(entry["top_logprobs"]) == 5
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
        assert sum(torch.tensor([t["logprob"] for t in entry["top_logprobs"]]).exp()) <= 1.0001
    text = bytes(b for e in entries for b in e["bytes"]).decode()
    assert text == "".join(c.text for c in chunks)
    with torch.inference_mode():  # the first entry is the model's own distribution
        logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    assert entries[0]["logprob"] == pytest.approx(float(logits.log_softmax(-1).max()), abs=1e-4)


def test_tool_calls_written_as_training_writes_them_are_parsed():
    from training.data.conversation import tool_calls_text as data_text

    calls = [{"id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    text = chat.tool_calls_text(calls)
    assert text == data_text(calls, "")  # what training puts in an assistant turn
    assert chat.parse_tool_calls(text, WEATHER) == [calls[0]["function"]]
    # The constrained form (arguments as an object) reads the same.
    assert chat.parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}',
                                 WEATHER) == [{"name": "get_weather",
                                               "arguments": '{"city": "Oslo"}'}]
    for text in ("Sunny.", '[{"name": "rm_rf", "arguments": "{}"}]', "[]", '{"a": 1}'):
        assert chat.parse_tool_calls(text, WEATHER) is None, text
    schema = chat.tool_calls_schema(WEATHER, "get_time", parallel=False)
    jsonschema.validate([{"name": "get_time", "arguments": {"zone": "UTC"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": "x"}}], schema)


# --------------------------------------------------------------------------- through the SDK


@pytest.fixture
def client(shared_service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{shared_service.url}/v1", api_key="local", max_retries=0)


def _create(client: openai.OpenAI, **kwargs):
    """The SDK's parsed reply and the raw body, which must be the spec's."""
    raw = client.chat.completions.with_raw_response.create(model=TINY, messages=HI, **kwargs)
    body = raw.http_response.json()
    assert_schema(body, "CreateChatCompletionResponse")
    assert "system_fingerprint" not in body
    assert all(c["message"]["refusal"] is None for c in body["choices"])
    return raw.parse(), body


def test_sdk_n_logprobs_json_schema_and_tools(client):
    reply, _ = _create(client, n=3, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    if all(c.finish_reason == "length" for c in reply.choices):
        assert reply.usage.completion_tokens == 18  # the usage of all three

    reply, _ = _create(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 5 and t.top_logprobs[0].token == t.token for t in content)

    reply, _ = _create(client, max_tokens=120, temperature=1, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                               "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)

    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        reply, _ = _create(client, max_tokens=60, temperature=1, tools=WEATHER,
                           tool_choice=choice, parallel_tool_calls=False)
        answer = reply.choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        (call,) = answer.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        if isinstance(choice, dict):
            assert call.function.name == "get_time"
            assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
        assert call.function.name in ("get_weather", "get_time")
    # The conversation goes on with the call and its result, tools still given.
    history = HI + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    raw = client.chat.completions.with_raw_response.create(
        model=TINY, messages=history, tools=WEATHER, tool_choice="none", max_tokens=4)
    assert_schema(raw.http_response.json(), "CreateChatCompletionResponse")


def test_sdk_stream_of_n_choices_with_logprobs_tools_and_usage(shared_service):
    body = {"model": TINY, "messages": HI, "stream": True, "n": 2, "max_tokens": 5,
            "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    chunks = _stream(shared_service.url, body)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"]
    finished = {c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
    entries = [e for c in chunks[:-1] if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"] == 10
    tools = _stream(shared_service.url, {"model": TINY, "messages": HI, "stream": True,
                                         "max_tokens": 60, "tools": WEATHER,
                                         "tool_choice": "required",
                                         "parallel_tool_calls": False})
    calls = [d["tool_calls"] for c in tools if (d := c["choices"][0]["delta"]).get("tool_calls")]
    assert calls and calls[0][0]["function"]["name"] in ("get_weather", "get_time")
    assert tools[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _stream(url: str, body: dict) -> list[dict]:
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer local"})
    assert response.status_code == 200, response.text
    lines = [ln[6:] for ln in response.text.split("\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    for chunk in chunks:
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def test_spec_defaults_and_fields_that_do_not_apply_are_accepted(client):
    _create(client, max_tokens=2, logprobs=False, frequency_penalty=0, presence_penalty=0,
            logit_bias=None, store=False, service_tier="auto", metadata={"team": "a"},
            prompt_cache_key="k", safety_identifier="s", user="u", modalities=["text"],
            parallel_tool_calls=True, top_logprobs=None, n=1, stream=False, audio=None,
            reasoning_effort="low", verbosity="medium", seed=1, temperature=1, top_p=1,
            response_format={"type": "text"}, tool_choice="none")


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": limits.MAX_CHOICES, "max_tokens": limits.MAX_CHOICE_TOKENS // limits.MAX_CHOICES + 1},
     "n"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema"),
    ({"tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"extra_body": {"not_in_the_spec": 1}}, "not_in_the_spec"),
])
def test_bad_chat_input_is_400_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=HI, **{"max_tokens": 4, **kwargs})
    assert info.value.body["param"] == param, info.value.body


# --------------------------------------------------------------------------- a tuned model

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _first_tool_call_example() -> dict:
    """The first conversation of the shipped glaive tool-calling data with a tool call, up to
    and including that call, as an OpenAI chat line with its tools."""
    from training.data.formats import iter_normalised

    with open(REAL / "glaive_toolcall_en_demo.tail.json", "rb") as f:
        example = next(e for _, e in iter_normalised(f)
                       if "tools" in e and any("tool_calls" in m for m in e["messages"]))
    messages = example["messages"]
    end = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
    return {"messages": [{"role": m["role"], "content": m["content"]} if not m.get("tool_calls")
                         else {"role": "assistant", "tool_calls": [
                             {"id": f"call_{i}", **c} for i, c in enumerate(m["tool_calls"])]}
                         for m in messages[:end + 1]], "tools": example["tools"]}


def test_a_model_tuned_on_tool_calls_answers_with_parsed_tool_calls(client):
    # One real tool-calling conversation, 32 times: 64 steps teach the tiny model that call
    # (its loss only falls from 10.8 to 9.5, but greedy decoding follows the argmax).
    line = _first_tool_call_example()
    data = "\n".join(json.dumps(line) for _ in range(32)).encode()
    file_id = client.files.create(file=("tools.jsonl", io.BytesIO(data)),
                                  purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=file_id, suffix="tools", seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 8, "batch_size": 4, "learning_rate_multiplier": 5}}})
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(1)
    assert job.status == "succeeded", job.error
    expected = line["messages"][-1]["tool_calls"][0]["function"]
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=line["messages"][:-1], tools=line["tools"],
        temperature=0, max_tokens=120)
    answer = reply.choices[0]
    assert answer.finish_reason == "tool_calls", answer.message.content
    (call,) = answer.message.tool_calls
    assert call.function.name == expected["name"]
    assert json.loads(call.function.arguments) == json.loads(expected["arguments"])
