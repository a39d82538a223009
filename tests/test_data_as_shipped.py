"""Public datasets upload as their projects ship them: the real samples in ../shared/data/real
(SOURCES.md there says where each comes from), read as they are; containers (JSON arrays, gzip,
zstd) recognised by content; a zip bomb refused naming the limit; KTO refused; invalid records
refused or, on request, skipped and counted; ``tuneserve files validate`` giving the server's
verdict. Token counts are checked against a recount written here with the tokenizer alone.

The API runs over FastAPI's TestClient and a temporary local store, with the tiny model's
tokenizer (SmolLM2's tokenizer and chat template); the DPO job at the end runs on the shared
service (slow).
"""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zstandard
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.routes.files import FileTokenizer
from service.cli.main import main as cli_main
from service.core.settings import Settings
from training.data.formats import FormatError, iter_normalised
from training.data.validation import validate_file

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real"
END = "<|im_end|>"
"""SmolLM2's end of turn: every supervised response is its content followed by this token."""
LINE_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    from training.model.registry import TINY_MODEL_ID, resolve_model

    return str(resolve_model(TINY_MODEL_ID))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from training.model.registry import load_tokenizer

    return load_tokenizer(tiny_dir)


def settings_for(tmp_path: Path, tiny_dir: str, **overrides) -> dict:
    return {"storage": str(tmp_path / "store"), "builtin_models": False, "tiny_model": False,
            "models": {"tiny": tiny_dir}, "max_line_bytes": LINE_LIMIT, **overrides}


@pytest.fixture
def app(tmp_path, tiny_dir):
    return create_app(Settings(**settings_for(tmp_path, tiny_dir)))


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def upload(client: TestClient, content: bytes, name: str, **fields: str) -> httpx.Response:
    return client.post("/v1/files", files={"file": (name, content)},
                       data={"purpose": "fine-tune", **fields})


def stored_keys(app) -> set[str]:
    return {info.key for info in app.state.storage.iter("")}


# --- an independent recount: the raw JSON (stdlib) and the tokenizer, nothing of ours -------------


def raw_records(path: Path) -> list[dict]:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data.lstrip()[:1] == b"[":
        return json.loads(data)
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _tool_call_text(value: str) -> str:
    """What a ShareGPT ``function_call`` turn trains the model to write (SmolLM2's template has
    no tool calls of its own): the calls as OpenAI's JSON, arguments as a JSON string."""
    call = json.loads(value)
    return json.dumps([{"name": call["name"], "arguments": json.dumps(call["arguments"])}])


def hh_final_reply(transcript: str) -> str:
    return transcript.rsplit("\n\nAssistant:", 1)[1].strip()


def recount(tokenizer, layout: str, records: list[dict]) -> tuple[int, int]:
    """(examples, supervised tokens): each response plus its end-of-turn token."""
    def supervised(text: str) -> int:
        return n_tokens(tokenizer, text + END)

    if layout == "alpaca":
        return len(records), sum(supervised(r["output"]) for r in records)
    if layout == "self_instruct":
        outputs = [i["output"] for r in records for i in r["instances"]]
        return len(outputs), sum(supervised(o) for o in outputs)
    if layout == "sharegpt":
        replies = [_tool_call_text(t["value"]) if t["from"] == "function_call" else t["value"]
                   for r in records for t in r["conversations"]
                   if t["from"] in ("gpt", "function_call")]
        return len(records), sum(supervised(text) for text in replies)
    if layout == "sharegpt_preference":  # the chosen side is what the description counts
        return len(records), sum(supervised(r["chosen"]["value"]) for r in records)
    if layout == "hh_rlhf":
        return len(records), sum(supervised(hh_final_reply(r["chosen"])) for r in records)
    raise AssertionError(layout)


# --- every sample uploads as shipped ------------------------------------------------------------

SHIPPED = {
    # file → (layout, kind, container, compression)
    "alpaca_en_demo.tail.json": ("alpaca", "sft", "json_array", None),
    "sharegpt_dummy_conversation.tail.json": ("sharegpt", "sft", "json_array", None),
    "glaive_toolcall_en_demo.tail.json": ("sharegpt", "sft", "json_array", None),
    "dpo_en_demo.tail.json": ("sharegpt_preference", "preference", "json_array", None),
    "self_instruct_seed_tasks.tail.jsonl": ("self_instruct", "sft", "jsonl", None),
    "hh_rlhf_harmless_base_test.tail.jsonl.gz": ("hh_rlhf", "preference", "jsonl", "gzip"),
}


def test_every_sample_is_covered() -> None:
    assert set(SHIPPED) | {"kto_en_demo.tail.json"} == {
        p.name for p in REAL.iterdir() if p.name != "SOURCES.md"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_real_file_uploads_as_shipped(client, tokenizer, name: str) -> None:
    layout, kind, container, compression = SHIPPED[name]
    r = upload(client, (REAL / name).read_bytes(), name)
    assert r.status_code == 200, r.text
    d = r.json()["description"]
    assert (d["format"], d["kind"], d["container"], d["compression"]) == (
        layout, kind, container, compression)
    examples, supervised = recount(tokenizer, layout, raw_records(REAL / name))
    assert d["examples"] == d["tokenized_examples"] == examples
    assert d["supervised_tokens"]["total"] == supervised
    assert d["trains_on"] == "responses" and d["skipped"] is None


def test_tool_turns_become_tool_calls_and_results_with_their_tools() -> None:
    with open(REAL / "glaive_toolcall_en_demo.tail.json", "rb") as f:
        examples = [e for _, e in iter_normalised(f)]
    raw = raw_records(REAL / "glaive_toolcall_en_demo.tail.json")
    assert len(examples) == len(raw)
    n, example = next((i, e) for i, e in enumerate(examples)
                      if any("tool_calls" in m for m in e["messages"]))
    declared = json.loads(raw[n]["tools"])
    assert [t["function"] for t in example["tools"]] == declared
    assert all(t["type"] == "function" for t in example["tools"])
    turns = raw[n]["conversations"]
    first_call = [t["from"] for t in turns].index("function_call")
    call, result = example["messages"][first_call:first_call + 2]
    sent = json.loads(turns[first_call]["value"])
    assert call["role"] == "assistant" and call["tool_calls"] == [{"type": "function", "function": {
        "name": sent["name"], "arguments": json.dumps(sent["arguments"])}}]
    assert result == {"role": "tool", "content": turns[first_call + 1]["value"]}
    # A record whose tools field is "[]" has no tools.
    assert all("tools" not in e for e, r in zip(examples, raw) if r["tools"] == "[]")


def test_records_of_an_array_are_numbered_and_the_refusal_says_what_it_read(client, app) -> None:
    records = raw_records(REAL / "alpaca_en_demo.tail.json")[:5]
    del records[2]["output"]
    r = upload(client, json.dumps(records, indent=2).encode(), "alpaca.json")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "file"
    assert error["message"].startswith("This is a JSON array of Alpaca records "
                                       "(instruction/input/output); record 3: missing field "
                                       "'output'. Fix these records, or upload with the form "
                                       "field invalid_records=skip")
    assert stored_keys(app) == set()


# --- containers -------------------------------------------------------------------------------


def _validate(content: bytes, **kwargs):
    return validate_file(io.BytesIO(content), max_line_bytes=LINE_LIMIT, **kwargs)


ALPACA = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(4)]


@pytest.mark.parametrize("pack", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize("structure", ["jsonl", "json_array"])
def test_containers_are_recognised_by_content(pack: str, structure: str) -> None:
    text = (json.dumps(ALPACA, indent=2) if structure == "json_array"
            else "\n".join(json.dumps(r) for r in ALPACA))
    content = {"plain": lambda b: b, "gzip": gzip.compress,
               "zstd": zstandard.ZstdCompressor().compress}[pack](text.encode())
    report = _validate(content)
    assert report.ok, report.summary()
    assert (report.container.structure, report.container.compression) == (
        structure, None if pack == "plain" else pack)
    assert (report.format, report.examples) == ("alpaca", 4)
    assert [e for _, e in iter_normalised(io.BytesIO(content))] == [
        e for _, e in iter_normalised(io.BytesIO("\n".join(json.dumps(r) for r in ALPACA)
                                                 .encode()))]


def test_a_json_array_broken_mid_way_ends_with_one_problem_naming_the_record() -> None:
    text = json.dumps(ALPACA, indent=2)
    cut = text.index('"Say 2.')
    report = _validate((text[:cut] + "oops" + text[cut:]).encode())
    assert not report.ok and report.examples == 2
    assert report.fatal is not None and report.fatal.code == "invalid_json"
    assert str(report.problems[0]).startswith("record 3: invalid JSON in the array")
    with pytest.raises(FormatError, match="record 3: invalid JSON"):
        list(iter_normalised(io.BytesIO((text[:cut] + "oops" + text[cut:]).encode())))


def test_an_over_long_array_record_is_refused_without_building_it() -> None:
    huge = {"instruction": "x", "output": "y" * (4 * LINE_LIMIT)}
    report = _validate(json.dumps([ALPACA[0], huge, ALPACA[1]]).encode())
    assert report.fatal is not None and report.fatal.code == "record_too_long"
    assert str(report.fatal) == (f"record 2: a record is longer than the limit of {LINE_LIMIT} "
                                 "bytes; nothing after it can be read")


def test_one_object_over_many_lines_is_told_apart_from_json_lines() -> None:
    report = _validate(json.dumps(ALPACA[0], indent=2).encode())
    assert report.fatal is not None and report.fatal.code == "not_json_lines"
    assert "send a JSON array of records" in report.fatal.message


def test_corrupt_compression_is_one_problem() -> None:
    content = gzip.compress(b"\n".join(json.dumps(r).encode() for r in ALPACA * 200))
    report = _validate(content[: len(content) // 2])
    assert report.fatal is not None and report.fatal.code == "invalid_compression"


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress],
                         ids=["gzip", "zstd"])
def test_a_zip_bomb_is_refused_naming_the_limit(tmp_path, tiny_dir, compress) -> None:
    app = create_app(Settings(**settings_for(tmp_path, tiny_dir, max_upload_bytes=1 << 20)))
    bomb = compress(b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 kB or less
    assert len(bomb) < 1 << 17
    with TestClient(app) as client:
        r = upload(client, bomb, "train.jsonl.gz")
    assert r.status_code == 413
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("decompressed_too_large", "file")
    assert f"decompresses to more than the limit of {4 << 20} bytes (4 x " \
           "TUNESERVE_MAX_UPLOAD_BYTES)" in error["message"]
    assert stored_keys(app) == set()


def _array_stream(records: int, output: str = "x" * 200) -> Iterator[bytes]:
    """A JSON array of ``records`` Alpaca records, in chunks of a thousand."""
    yield b"["
    for start in range(0, records, 1000):
        yield (b"," if start else b"") + b",".join(json.dumps(
            {"instruction": f"Repeat {i}.", "input": "", "output": output}).encode()
            for i in range(start, min(start + 1000, records)))
    yield b"]"


class _Stream:
    """A file made on the fly from chunks (nothing of it held), optionally gzip-compressed."""

    def __init__(self, chunks: Iterator[bytes], compress: bool = False):
        self._chunks: Iterator[bytes] | None = chunks
        self._buf = bytearray()
        self._gzip = zlib.compressobj(wbits=31) if compress else None

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < n and self._chunks is not None:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._buf += self._gzip.flush() if self._gzip else b""
                self._chunks = None
            else:
                self._buf += self._gzip.compress(chunk) if self._gzip else chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


@pytest.mark.parametrize("compress", [False, True], ids=["json_array", "gzip_json_array"])
def test_a_large_array_streams_through_bounded_memory(compress: bool, monkeypatch) -> None:
    # Duplicate detection remembers up to MAX_TRACKED examples (~100 bytes each, its own bound):
    # kept small here so that what is measured is the reading.
    monkeypatch.setattr("training.data.validation.MAX_TRACKED", 1000)
    records = 20_000  # ~5 MB of JSON
    stream = _Stream(_array_stream(records), compress)
    tracemalloc.start()
    try:
        report = validate_file(stream, max_line_bytes=LINE_LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.examples == records
    # Neither the array nor the decompressed text is held (measured: under 2 MB).
    assert peak < 8 << 20, peak


def _multipart(name: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    boundary = "tuneserve-shipped"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
           f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
           f"filename=\"{name}\"\r\n\r\n").encode()
    yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def _jsonl_200mb(compress: bool) -> Iterator[bytes]:
    """200 MB of JSONL (100,000 lines of 2 kB, each unlike the others), gzipped if asked."""
    gz = zlib.compressobj(wbits=31) if compress else None
    for start in range(0, 100_000, 500):
        block = b"".join(json.dumps({"instruction": f"Repeat {i}.", "input": "",
                                     "output": f"{i:08x} " * 220}).encode() + b"\n"
                         for i in range(start, start + 500))
        yield gz.compress(block) if gz else block
    if gz:
        yield gz.flush()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gzip_jsonl", "json_array"])
def test_200_mb_uploads_stream_through_bounded_memory(tmp_path, kind: str) -> None:
    """The API process's resident memory grows by under 64 MB while it receives, stores and
    validates 200 MB (the file is never held: reading streams, duplicate tracking is capped)."""
    import threading

    import psutil

    from tests.test_files_api import serve

    app = create_app(Settings(storage=str(tmp_path / "store"), builtin_models=False,
                              tiny_model=False, max_line_bytes=LINE_LIMIT))
    app.state.file_tokenizer = FileTokenizer()  # the reading is measured, not the chat template
    chunks = (_jsonl_200mb(compress=True) if kind == "gzip_jsonl"
              else _array_stream(100_000, output="x" * 2000))
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss)

    with serve(app) as url:
        before = process.memory_info().rss
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            r = httpx.post(f"{url}/v1/files", content=_multipart(f"big.{kind}", chunks),
                           timeout=900, headers={
                               "Content-Type": "multipart/form-data; boundary=tuneserve-shipped"})
        finally:
            done.set()
            sampler.join()
    assert r.status_code == 200, r.text[:500]
    d = r.json()["description"]
    assert d["examples"] == 100_000
    assert (d["container"], d["compression"]) == (
        ("jsonl", "gzip") if kind == "gzip_jsonl" else ("json_array", None))
    assert peak[0] - before < 64 << 20, (peak[0] - before) >> 20


# --- layouts as they ship ---------------------------------------------------------------------


def test_kto_is_refused_saying_what_it_is_and_nothing_is_stored(client, app) -> None:
    content = (REAL / "kto_en_demo.tail.json").read_bytes()
    for fields in ({}, {"invalid_records": "skip"}):
        r = upload(client, content, "kto_en_demo.json", **fields)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("This is a JSON array of KTO records")
        assert "Kahneman-Tversky Optimization" in message
        assert "DPO preference pairs" in message and '"chosen"' in message
    assert stored_keys(app) == set()


def test_legacy_completions_lose_their_end_marker_and_say_so(client, tokenizer) -> None:
    rows = [{"prompt": "Q: 2+2?\n\n###\n\n", "completion": " 4<|endoftext|>"},
            {"prompt": "Q: capital of France?\n\n###\n\n", "completion": " Paris <|endoftext|>\n"}]
    r = upload(client, "\n".join(json.dumps(r) for r in rows).encode(), "legacy.jsonl")
    assert r.status_code == 200, r.text
    d = r.json()["description"]
    assert d["format"] == "prompt_completion"
    assert d["notes"] == [("removed the end marker '<|endoftext|>' that ended 2 completion(s): "
                           "the chat template ends every response with its own end-of-turn "
                           "token")]
    assert d["supervised_tokens"]["total"] == sum(
        n_tokens(tokenizer, text + END) for text in (" 4", " Paris "))


def test_plain_text_trains_on_every_token(client, tokenizer) -> None:
    texts = ["Rivers carry sediment to the sea.", "Deltas grow where rivers slow down."]
    r = upload(client, "\n".join(json.dumps({"text": t}) for t in texts).encode(), "corpus.jsonl")
    assert r.status_code == 200, r.text
    d = r.json()["description"]
    assert (d["format"], d["trains_on"]) == ("text", "all_tokens")
    assert "every token is trained on (continued pretraining)" in d["notes"][0]
    # Each text and EOS; every token is a target except the first (nothing precedes it).
    assert d["tokens"]["total"] == sum(n_tokens(tokenizer, t) + 1 for t in texts)
    assert d["supervised_tokens"]["total"] == sum(n_tokens(tokenizer, t) for t in texts)


def test_unknown_keys_are_listed_not_silently_ignored(client) -> None:
    rows = [{"instruction": "Say hi.", "output": "Hi.", "outptu_note": "typo", "lang": "en"}]
    r = upload(client, json.dumps(rows).encode(), "a.json")
    assert r.status_code == 200, r.text
    assert r.json()["description"]["ignored_keys"] == {"lang": 1, "outptu_note": 1}


# --- HH-RLHF: invalid records refused, or skipped on request ------------------------------------

_H = "\n\nHuman: How do I make tea?\n\nAssistant: Boil water."
HH_BAD = [  # the three kinds of bad lines in HH-RLHF's harmless-base test split
    ({"chosen": _H + "\n\nHuman: And then?\n\nAssistant:",
      "rejected": _H + "\n\nHuman: And then?\n\nAssistant: Add the leaves."},
     "empty_response", "the final Assistant turn of 'chosen' is empty"),
    ({"chosen": _H + "\n\nAssistant: Then steep it.",
      "rejected": _H + "\n\nHuman: And?\n\nAssistant: Steep it."},
     "roles_out_of_order", "'chosen' has two Assistant turns in a row (turns 2 and 3)"),
    ({"chosen": _H + "\n\nHuman: And then?\n\nAssistant: Steep it.",
      "rejected": "\n\nHuman: How do I make coffee?\n\nAssistant: Grind beans.\n\nHuman: And "
                  "then?\n\nAssistant: Brew."},
     "prompts_differ", ("'chosen' and 'rejected' differ before their final assistant turn "
                        "(first at turn 1)")),
]
HH_BAD_LINES = (11, 52, 90)


def hh_with_bad_lines() -> tuple[bytes, list[dict]]:
    """The real sample with the three bad kinds at ``HH_BAD_LINES``, gzipped as shipped."""
    good = raw_records(REAL / "hh_rlhf_harmless_base_test.tail.jsonl.gz")
    rows = list(good)
    for line, (bad, _, _) in zip(HH_BAD_LINES, HH_BAD, strict=True):
        rows.insert(line - 1, bad)
    return gzip.compress("\n".join(json.dumps(r) for r in rows).encode() + b"\n"), good


def test_hh_rlhf_bad_lines_refuse_the_file_naming_the_first(client, app) -> None:
    content, _ = hh_with_bad_lines()
    r = upload(client, content, "test.jsonl.gz")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith(
        "This is a gzip-compressed JSONL file of HH-RLHF records (chosen/rejected "
        f"Human:/Assistant: transcripts); line {HH_BAD_LINES[0]}: {HH_BAD[0][2]}; ")
    for line, (_, _, phrase) in zip(HH_BAD_LINES, HH_BAD, strict=True):
        assert f"line {line}: {phrase}" in message
    assert "invalid_records=skip" in message
    assert stored_keys(app) == set()


def test_hh_rlhf_bad_lines_are_skipped_and_counted_on_request(client, tokenizer) -> None:
    content, good = hh_with_bad_lines()
    r = upload(client, content, "test.jsonl.gz", invalid_records="skip")
    assert r.status_code == 200, r.text
    d = r.json()["description"]
    assert (d["format"], d["examples"], d["invalid_records"]) == ("hh_rlhf", len(good), "skip")
    assert d["skipped"]["records"] == 3
    assert d["skipped"]["reasons"] == {code: 1 for _, code, _ in HH_BAD}
    first = d["skipped"]["first"]
    assert len(first) == 3
    for told, line, (_, _, phrase) in zip(first, HH_BAD_LINES, HH_BAD, strict=True):
        assert told.startswith(f"line {line}: {phrase}")
    assert d["supervised_tokens"]["total"] == recount(tokenizer, "hh_rlhf", good)[1]


def test_invalid_records_takes_refuse_or_skip(client) -> None:
    r = upload(client, b'{"instruction": "a", "output": "b"}', "a.jsonl", invalid_records="drop")
    assert r.status_code == 400
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (
        "invalid_records", "invalid_value")


# --- tools in the prompt ----------------------------------------------------------------------

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call:\n{% for tool in tools %}{{ tool | tojson }}"
    "\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A ChatML template that takes ``tools`` (as Qwen2.5's does), for the template path."""


@pytest.mark.parametrize("template", ["fallback", "takes_tools"])
def test_tool_definitions_are_in_the_prompt_and_outside_the_supervised_tokens(
        tokenizer, template: str) -> None:
    import copy

    from training.model import chat

    tok = copy.deepcopy(tokenizer)
    if template == "takes_tools":
        tok.chat_template = TOOLS_TEMPLATE
    with open(REAL / "glaive_toolcall_en_demo.tail.json", "rb") as f:
        example = next(e for _, e in iter_normalised(f)
                       if "tools" in e and any("tool_calls" in m for m in e["messages"]))
    messages, tools = example["messages"], example["tools"]
    trained = chat.tokenize_conversation(tok, messages, None, tools)
    bare = chat.tokenize_conversation(tok, messages)
    first = next(i for i, label in enumerate(trained.labels) if label != chat.IGNORE_INDEX)
    context = tok.decode(trained.input_ids[:first])
    supervised = tok.decode([t for t, label in zip(trained.input_ids, trained.labels, strict=True)
                             if label != chat.IGNORE_INDEX])
    for tool in tools:
        assert tool["function"]["description"] in context
        assert tool["function"]["description"] not in supervised
    assert ("# Tools" in context) == (template == "fallback")
    # The tools add context only: the same responses are supervised, token for token.
    assert supervised == tok.decode([t for t, label in zip(bare.input_ids, bare.labels,
                                                             strict=True)
                                     if label != chat.IGNORE_INDEX])
    assert len(trained.input_ids) > len(bare.input_ids)
    # Serving renders the same prompt for the first reply (the same module, the same tools).
    reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert chat.render_prompt(tok, messages[:reply], tools) == trained.input_ids[:first]


# --- one validator: the CLI gives the server's verdict --------------------------------------------


def _cli_verdict(path: Path, env: dict, monkeypatch, capsys) -> dict:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = cli_main(["files", "validate", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if out["ok"] else 1)
    return out


def test_files_validate_gives_the_servers_verdict(tmp_path, tiny_dir, monkeypatch,
                                                  capsys) -> None:
    settings = settings_for(tmp_path, tiny_dir, max_upload_bytes=1 << 20)
    env = {"TUNESERVE_STORAGE": settings["storage"], "TUNESERVE_BUILTIN_MODELS": "false",
           "TUNESERVE_TINY_MODEL": "false", "TUNESERVE_MODELS": f"tiny={tiny_dir}",
           "TUNESERVE_MAX_LINE_BYTES": str(LINE_LIMIT), "TUNESERVE_MAX_UPLOAD_BYTES": str(1 << 20)}
    files = {name: REAL / name for name in [*SHIPPED, "kto_en_demo.tail.json"]}
    hh_bad, _ = hh_with_bad_lines()
    extra = {"hh_bad.jsonl.gz": hh_bad, "bomb.gz": gzip.compress(b"\0" * (8 << 20)),
             "legacy.jsonl": json.dumps({"prompt": "Hi", "completion": " Yo<|endoftext|>"})
             .encode(),
             "special.jsonl": json.dumps({"instruction": "x", "output": "a<|im_start|>b"})
             .encode()}
    for name, content in extra.items():
        (tmp_path / name).write_bytes(content)
        files[name] = tmp_path / name
    verdicts = []
    with TestClient(create_app(Settings(**settings))) as client:
        for name, path in files.items():
            r = upload(client, path.read_bytes(), name)
            cli = _cli_verdict(path, env, monkeypatch, capsys)
            assert cli["ok"] == (r.status_code == 200), name
            if cli["ok"]:
                assert cli["description"] == r.json()["description"], name
            else:
                assert cli["message"] == r.json()["error"]["message"], name
            verdicts.append(cli["ok"])
    # Both kinds of verdict were compared: four refusals (KTO, bad lines, bomb, a special
    # token inside a response: the tokenizer's check), the legacy file and samples accepted.
    assert verdicts.count(False) == 4 and verdicts.count(True) == len(SHIPPED) + 1


# --- a DPO job on the records kept (the shared service: slow) -----------------------------------


def test_a_dpo_job_trains_on_the_records_an_upload_kept(shared_service) -> None:
    content, good = hh_with_bad_lines()
    http = httpx.Client(base_url=f"{shared_service.url}/v1",
                        headers={"Authorization": "Bearer local"}, timeout=120)
    r = http.post("/files", files={"file": ("hh.jsonl.gz", content)},
                  data={"purpose": "fine-tune", "invalid_records": "skip"})
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    r = http.post("/fine_tuning/jobs", json={
        "model": "tuneserve/tiny-llama", "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1,
                                                              "batch_size": 16}}}})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    job = _finished(http, job_id)
    events = http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()
    # The train split's data event (DPO's reference-pass event names the split too).
    data = next(e["data"] for e in events["data"]
                if (e.get("data") or {}).get("split") == "train" and "n_examples" in e["data"])
    assert data["n_skipped"] == 3
    assert data["n_examples"] + data["n_rejected"] + data["n_truncated"] == len(good)
    assert job["status"] == "succeeded", job.get("error")


def test_tool_calling_files_train(shared_service) -> None:
    """The ShareGPT tool-calling sample as shipped, and an OpenAI chat file with ``tools``."""
    chat_with_tools = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 4}'},
        {"role": "assistant", "content": "It is 4 °C in Oslo."}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}
    files = {"glaive_toolcall_en_demo.json":
             (REAL / "glaive_toolcall_en_demo.tail.json").read_bytes(),
             "chat_tools.jsonl": (json.dumps(chat_with_tools) + "\n").encode() * 8}
    http = httpx.Client(base_url=f"{shared_service.url}/v1",
                        headers={"Authorization": "Bearer local"}, timeout=120)
    jobs = []
    for name, content in files.items():
        r = http.post("/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        r = http.post("/fine_tuning/jobs", json={
            "model": "tuneserve/tiny-llama", "training_file": r.json()["id"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 8}}}})
        assert r.status_code == 200, r.text
        jobs.append(r.json()["id"])
    for job_id in jobs:
        job = _finished(http, job_id)
        assert job["status"] == "succeeded", job.get("error")


def _finished(http: httpx.Client, job_id: str) -> dict:
    from tests.helpers import wait_until

    return wait_until(lambda: (j := http.get(f"/fine_tuning/jobs/{job_id}").json())["status"]
                      in {"succeeded", "failed", "cancelled"} and j, 600, interval=2,
                      what=f"job {job_id} to finish")
