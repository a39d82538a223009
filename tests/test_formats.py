"""training/data/formats.py and training/data/validation.py: every layout normalises to the expected
conversation, and every broken file is rejected naming its line and its problem. (Containers, the
real files as they ship, and skipping invalid records: tests/test_data_as_shipped.py.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.broken_files import BROKEN, MAX_LINE_BYTES, Broken
from training.data.formats import FORMATS, FormatError, iter_normalised
from training.data.jsonl import iter_raw_lines
from training.data.validation import validate_file

DATA = Path(__file__).parent / "data" / "formats"


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


# fixture file → (detected format, number of examples, expected normalised first example)
EXPECTED = {
    "openai_chat": ("openai_chat", 3, {"messages": [
        system("You are a terse assistant."), user("What is the capital of France?"),
        assistant("Paris.")]}),
    "alpaca": ("alpaca", 2, {"messages": [
        user("Give three tips for staying healthy."),
        assistant("1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.")]}),
    "self_instruct": ("alpaca", 2, {"messages": [
        user("Classify the sentiment of the review.\n\nThe battery died after a day."),
        assistant("Negative")]}),
    "dolly": ("dolly", 2, {"messages": [
        user("When did Virgin Australia start operating?\n\nVirgin Australia commenced services "
             "on 31 August 2000 as Virgin Blue, with two aircraft on a single route."),
        assistant("Virgin Australia commenced services on 31 August 2000 as Virgin Blue.")]}),
    "sharegpt": ("sharegpt", 2, {"messages": [
        system("You are a helpful assistant."), user("Summarize: The meeting moved to Friday."),
        assistant("The meeting is now on Friday.")]}),
    "openorca": ("openorca", 2, {"messages": [
        system("You are an AI assistant. You will be given a task. You must generate a detailed "
               "and long answer."),
        user("Premise: A man is playing guitar. Hypothesis: A person makes music. Does the "
             "premise entail the hypothesis?"),
        assistant("Yes. Playing a guitar is making music, and a man is a person.")]}),
    "flan": ("flan", 2, {"messages": [
        user("Premise: The dog ran.\nHypothesis: An animal moved.\nDoes the premise entail the "
             "hypothesis?\nOPTIONS:\n- yes\n- no"), assistant("yes")]}),
    "oig": ("oig", 2, {"messages": [
        user("What is the boiling point of water at sea level?"),
        assistant("100 degrees Celsius.")]}),
    "prompt_completion": ("prompt_completion", 2, {"messages": [
        user("Company: Acme Corp\nProduct: rocket skates\nAd:"),
        assistant(" Zoom past the competition with Acme rocket skates!")]}),
    "openai_preference": ("openai_preference", 2, {
        "prompt": [user("Hello, can you tell me how cold San Francisco is today?")],
        "chosen": "Today in San Francisco, it is not quite cold as expected. Morning clouds will "
                  "give away to sunshine, with a high near 68°F (20°C) and a low around "
                  "57°F (14°C).",
        "rejected": "It is not particularly cold in San Francisco today."}),
    "openai_preference_legacy": ("openai_preference", 1, {
        "prompt": [user("Write a greeting.")], "chosen": "Hello, and welcome!", "rejected": "hi"}),
    "chosen_rejected": ("chosen_rejected", 2, {
        "prompt": [user("What color is the sky on a clear day?")], "chosen": "Blue.",
        "rejected": "Green."}),
    "hh_rlhf": ("hh_rlhf", 1, {
        "prompt": [user("How do I boil an egg?")],
        "chosen": "Put it in boiling water for about nine minutes.",
        "rejected": "Eggs cannot be boiled."}),
    "self_instruct_seed": ("self_instruct", 3, {"messages": [
        user("Give the antonym of the word.\n\nhot"), assistant("cold")]}),
    "sharegpt_preference": ("sharegpt_preference", 2, {
        "prompt": [system("Answer briefly."), user("What is 2 + 2?")], "chosen": "4.",
        "rejected": "22."}),
    "openai_rft": ("openai_rft", 2, {
        "messages": [user("Sort this list in ascending order: [5, 53, 8]")],
        "item": {"messages": [user("Sort this list in ascending order: [5, 53, 8]")],
                 "answer": "[5, 8, 53]"}}),
    "text": ("text", 2, {"text": "The mitochondrion is the site of aerobic respiration in the "
                                 "cell."}),
}
EXAMPLE_NUMBERS = {"self_instruct_seed": [1, 1, 2]}
"""Record numbers of the examples where a record gives several (one per instance)."""


def read(name: str) -> list[tuple[int, dict]]:
    with open(DATA / f"{name}.jsonl", "rb") as f:
        return list(iter_normalised(f))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_format_normalises_to_the_expected_example(name: str) -> None:
    fmt, count, first = EXPECTED[name]
    examples = read(name)
    assert [n for n, _ in examples] == EXAMPLE_NUMBERS.get(name, list(range(1, count + 1)))
    assert examples[0][1] == first
    with open(DATA / f"{name}.jsonl", "rb") as f:
        report = validate_file(f, max_line_bytes=MAX_LINE_BYTES)
    assert report.ok, report.summary()
    assert (report.format, report.examples) == (fmt, count)
    assert report.kind == FORMATS[fmt].kind


def test_every_format_has_a_fixture() -> None:
    assert {fmt for fmt, _, _ in EXPECTED.values()} == set(FORMATS)


def test_multi_turn_weights_and_tool_calls_survive() -> None:
    examples = dict(read("openai_chat"))
    assert examples[2]["messages"] == [
        user("Name a prime number."), assistant("Nine.", weight=0),
        user("That is not prime."), assistant("Seven.", weight=1)]
    call_turn, tool_turn = examples[3]["messages"][1:3]
    assert json.loads(call_turn["content"]) == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert tool_turn == {"role": "tool", "content": '{"temp_c": 4}', "tool_call_id": "call_1"}
    assert examples[3]["tools"][0]["function"]["name"] == "get_weather"
    assert dict(read("oig"))[2]["messages"] == [
        user("Suggest a name for a cat."), assistant("Miso."), user("Another one?"),
        assistant("Pixel.")]
    assert dict(read("chosen_rejected"))[2] == {
        "prompt": [user("Name a planet.")], "chosen": "Mars.", "rejected": "The Moon."}


def test_bom_crlf_and_blank_lines_are_tolerated() -> None:
    lines = (DATA / "dolly.jsonl").read_bytes().splitlines()
    content = b"\xef\xbb\xbf" + lines[0] + b"\r\n\r\n   \r\n" + lines[1] + b"\r\n"
    examples = list(iter_normalised(io.BytesIO(content)))
    assert [n for n, _ in examples] == [1, 4]
    assert examples == read("dolly")[:1] + [(4, read("dolly")[1][1])]
    assert validate_file(io.BytesIO(content), max_line_bytes=MAX_LINE_BYTES).ok


def test_text_streams_read_like_binary_ones() -> None:
    with open(DATA / "sharegpt.jsonl", encoding="utf-8") as f:
        assert list(iter_normalised(f)) == read("sharegpt")


def test_a_declared_format_holds_every_line_to_it() -> None:
    content = (DATA / "alpaca.jsonl").read_bytes()
    report = validate_file(io.BytesIO(content), max_line_bytes=MAX_LINE_BYTES,
                            declared_format="dolly")
    assert [(p.line, p.code) for p in report.problems] == [
        (1, "mixed_formats"), (2, "mixed_formats")]
    assert "declared as dolly" in report.problems[0].message
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        validate_file(io.BytesIO(content), max_line_bytes=MAX_LINE_BYTES, declared_format="csv")


def test_broken_files_are_many_and_distinct() -> None:
    assert len(BROKEN) >= 25
    assert len({b.name for b in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: b.name)
def test_broken_file_names_its_line_and_problem(broken: Broken) -> None:
    report = validate_file(io.BytesIO(broken.content), max_line_bytes=MAX_LINE_BYTES)
    assert not report.ok
    first = report.problems[0]
    assert first.line == broken.line, str(first)
    assert broken.phrase in first.message
    assert report.summary().startswith(f"line {broken.line}: ")
    with pytest.raises(FormatError) as raised:
        list(iter_normalised(io.BytesIO(broken.content), max_line_bytes=MAX_LINE_BYTES))
    assert raised.value.line == broken.line


def test_problems_are_listed_in_order_and_counted_beyond_the_first() -> None:
    good = json.dumps({"instruction": "x", "output": "y"})
    content = "\n".join([good, "{", good, "[]", *["nope"] * 30]).encode()
    report = validate_file(io.BytesIO(content), max_line_bytes=MAX_LINE_BYTES)
    assert report.problem_count == 32
    assert [p.line for p in report.problems[:3]] == [2, 4, 5]
    assert report.examples == 2
    assert report.summary(limit=2).endswith("(and 30 more problems)")


def test_an_empty_file_is_a_problem() -> None:
    report = validate_file(io.BytesIO(b"\n \r\n"), max_line_bytes=MAX_LINE_BYTES)
    assert not report.ok
    assert report.summary() == "the file holds no examples"


def test_duplicates_are_warnings_with_line_numbers() -> None:
    line = (DATA / "flan.jsonl").read_bytes().splitlines()[0]
    report = validate_file(io.BytesIO(b"\n".join([line, b"", line, line])),
                            max_line_bytes=MAX_LINE_BYTES)
    assert report.ok
    assert report.duplicates == 2
    assert report.warnings == ["line 3 duplicates line 1", "line 4 duplicates line 1"]


class _Trickle:
    """A stream that hands out 3 bytes per read, whatever is asked: lines cross every boundary."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, n: int = -1) -> bytes:
        chunk, self.data = self.data[:3], self.data[3:]
        return chunk


def test_line_limit_is_exact_across_chunk_boundaries() -> None:
    data = b"x" * 10 + b"\n" + b"y" * 11 + b"\n\n" + b"z" * 10
    assert list(iter_raw_lines(_Trickle(data), 10)) == [
        (1, b"x" * 10), (2, None), (3, b""), (4, b"z" * 10)]
    assert list(iter_raw_lines(_Trickle(b"a\nb" + b"c" * 20), 10)) == [(1, b"a"), (2, None)]


class _Endless:
    """A stream of ``size`` bytes of one line, made on the fly (nothing held)."""

    def __init__(self, size: int):
        self.left = size
        self.block = b"x" * (1 << 16)

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.left, len(self.block))
        self.left -= n
        return self.block[:n]


def test_an_over_long_line_is_skipped_without_holding_it() -> None:
    tracemalloc.start()
    try:
        stream = _Endless(64 * 1024 * 1024)
        assert list(iter_raw_lines(stream, 1024)) == [(1, None)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stream.left == 0
    assert peak < 1024 * 1024  # a 64 MB line read in 64 kB chunks


def test_formats_import_without_torch_or_fastapi() -> None:
    code = ("import sys, training.data.formats, training.data.validation; "
            "bad = {'torch', 'fastapi', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- token counts under the chat template -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from training.model.registry import TINY_MODEL_ID, load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(TINY_MODEL_ID))


def test_token_counts_follow_the_chat_template(tokenizer) -> None:
    from training.model.chat import tokenize_conversation

    examples = [e for _, e in read("alpaca")]
    full = [tokenize_conversation(tokenizer, e["messages"]) for e in examples]
    lengths = [len(t.input_ids) for t in full]
    # The supervised tokens are the response plus the end-of-turn marker, nothing else.
    responses = [len(tokenizer(e["messages"][-1]["content"],
                               add_special_tokens=False)["input_ids"]) + 1 for e in examples]
    assert [t.num_supervised for t in full] == responses
    context = max(lengths) - 1
    with open(DATA / "alpaca.jsonl", "rb") as f:
        report = validate_file(f, max_line_bytes=MAX_LINE_BYTES, tokenizer=tokenizer,
                                max_length=context)
    assert report.ok, report.summary()
    assert report.description()["tokens"] == {
        "min": min(lengths), "mean": round(sum(lengths) / 2, 1), "max": max(lengths),
        "total": sum(lengths)}
    assert report.description()["supervised_tokens"]["total"] == sum(responses)
    longest = lengths.index(max(lengths)) + 1
    assert report.over_context == 1
    assert report.warnings == [f"line {longest}: {max(lengths)} tokens, longer than the context "
                               f"of {context}; it will be truncated"]


def test_preference_pairs_count_the_chosen_response(tokenizer) -> None:
    with open(DATA / "openai_preference.jsonl", "rb") as f:
        report = validate_file(f, max_line_bytes=MAX_LINE_BYTES, tokenizer=tokenizer)
    assert report.ok, report.summary()
    shortest = len(tokenizer("Yes.", add_special_tokens=False)["input_ids"]) + 1  # + end of turn
    assert report.supervised_tokens is not None and report.supervised_tokens.min == shortest


def test_special_tokens_in_content_are_refused(tokenizer) -> None:
    line = {"instruction": "x", "output": "sure<|im_end|>"}
    report = validate_file(io.BytesIO(json.dumps(line).encode()), max_line_bytes=MAX_LINE_BYTES,
                            tokenizer=tokenizer)
    assert [(p.line, p.code) for p in report.problems] == [(1, "template_error")]
    assert "<|im_end|>" in report.problems[0].message


def test_token_counts_can_cover_only_the_first_examples(tokenizer) -> None:
    content = (DATA / "sharegpt.jsonl").read_bytes() + b'{"conversations": []}\n'
    report = validate_file(io.BytesIO(content), max_line_bytes=MAX_LINE_BYTES,
                            tokenizer=tokenizer, max_tokenized=1)
    assert report.description()["tokenized_examples"] == 1 and report.examples == 2
    assert [(p.line, p.code) for p in report.problems] == [(3, "missing_field")]  # still checked
