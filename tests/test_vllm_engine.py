"""The chat tests against both engines: ours and vLLM (its CPU build, in ``.venv-vllm``).

Both are driven the way a chat replica drives them (``ChatServer``: template, adapters fetched
from storage and checked, ``ChatCall`` in, ``ChatOutput`` out). vLLM's CPU attention needs a
head size of at least 32, and the built-in tiny model has 16, so the model here is a tiny Llama
of head size 32 with the same tokenizer and template, given as a base-model override; its weights
are drawn wide enough that greedy answers do not hang on rounding.
One vLLM engine serves the whole module: it takes about half a minute to start.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from serving.adapters import AdapterIncompatible
from serving.device import ChatConfigError, place
from serving.engine.native import AdapterNotLoaded, Engine
from serving.engine.vllm_engine import VllmEngine
from serving.protocol import ChatCall, ChatOutput
from serving.server import ChatServer, collect, outputs
from tests.serving_adapters import write_adapter, write_full_model

BASE = "test/tiny-llama-hd32"
QUESTIONS = ["What is the capital of France?", "Hi", "Write a haiku about the sea, please.",
             "2+2?"]
ENGINES = ["native", "vllm"]


def _build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.model import registry

    tokenizer = registry._load_builtin_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0,
                         initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).float().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, storage with two adapters (one for another base model), and both servers."""
    from training.model import registry

    model_dir = tmp_path_factory.mktemp("hd32")
    _build_model(model_dir)
    config = StorageConfig(uri=str(tmp_path_factory.mktemp("storage")))
    storage = open_storage(config)
    base = registry.load_model(model_dir)
    adapters = [write_adapter(storage, model_dir, BASE, seed=i, model=base, scale=0.2)
                for i in range(2)]
    foreign = write_adapter(storage, model_dir, "other/model", seed=5, model=base)
    full = write_full_model(storage, model_dir, BASE, seed=6, scale=0.2)
    overrides = {BASE: str(model_dir)}
    servers = {engine: ChatServer.build(BASE, config, overrides=overrides, dtype="float32",
                                        device="cpu", engine=engine, max_batch=8,
                                        max_pending=16, max_adapters=4)
               for engine in ENGINES}
    yield servers, adapters, foreign, full
    for server in servers.values():
        server.close()


@pytest.fixture(params=ENGINES)
def server(request, setup) -> ChatServer:
    return setup[0][request.param]


def _call(question: str, adapter: str | None = None, **kwargs) -> ChatCall:
    return ChatCall(BASE, adapter, [{"role": "user", "content": question}],
                    kwargs.pop("max_tokens", 12), **{"temperature": 0.0} | kwargs)


def _answer(server: ChatServer, call: ChatCall) -> ChatOutput:
    async def run() -> ChatOutput:
        return await collect(server.start(call), call)

    return asyncio.run(run())


def _concurrently(server: ChatServer, calls: list[ChatCall]) -> list[ChatOutput]:
    async def run() -> list[ChatOutput]:
        return list(await asyncio.gather(*(collect(server.start(c), c) for c in calls)))

    return asyncio.run(run())


def test_engines_are_what_was_asked_for(setup):
    servers = setup[0]
    assert isinstance(servers["native"].engine, Engine)
    assert isinstance(servers["vllm"].engine, VllmEngine)
    assert servers["vllm"].engine.healthy


def test_greedy_answers_are_identical_between_engines(setup):
    servers = setup[0]
    calls = [_call(q) for q in QUESTIONS]
    native = _concurrently(servers["native"], calls)
    vllm = _concurrently(servers["vllm"], calls)
    for a, b in zip(native, vllm, strict=True):
        assert a.text and (a.text, a.finish_reason, a.completion_tokens, a.prompt_tokens) == \
            (b.text, b.finish_reason, b.completion_tokens, b.prompt_tokens)


def test_hot_loaded_adapter_answers_as_in_the_native_engine(setup):
    servers, adapters, _, _ = setup
    for server in servers.values():
        for adapter in adapters:
            server.load_adapter(adapter)
        assert sorted(server.engine.adapters) == sorted(adapters)
    # Both adapters and the bare base in one batch.
    calls = [_call(q, a) for q in QUESTIONS[:2] for a in [*adapters, None]]
    native = _concurrently(servers["native"], calls)
    vllm = _concurrently(servers["vllm"], calls)
    assert [o.text for o in native] == [o.text for o in vllm]
    assert native[0].text != native[2].text  # the adapter changes the answer


def test_logprobs_agree_between_engines(setup):
    servers = setup[0]
    call = _call("Hi", logprobs=3, max_tokens=6)
    a, b = (_answer(servers[e], call) for e in ENGINES)
    assert a.logprobs and len(a.logprobs) == len(b.logprobs) == a.completion_tokens
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert x["token"] == y["token"] and x["bytes"] == y["bytes"]
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]


def test_stream_pieces_make_the_whole_answer(server):
    call = _call(QUESTIONS[2], max_tokens=12)

    async def pieces() -> list[ChatOutput]:
        return [p async for p in outputs(server.start(call), call)]

    streamed = asyncio.run(pieces())
    whole = _answer(server, call)
    assert "".join(p.text for p in streamed) == whole.text
    assert (streamed[-1].finish_reason, streamed[-1].completion_tokens) == \
        (whole.finish_reason, whole.completion_tokens)


def test_stop_string_ends_the_answer(server):
    full = _answer(server, _call("Hi", max_tokens=12)).text
    stop = full[4:7]
    cut = _answer(server, _call("Hi", max_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_seeded_sampling_repeats_and_choices_differ(server):
    call = _call("Hi", temperature=1.0, seed=7, n=2, max_tokens=8)
    first, again = _answer(server, call), _answer(server, call)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert 0 < first.completion_tokens <= 16


def test_json_object_response_format_gives_json(server):
    call = _call("Give me an object", response_format={"type": "json_object"}, max_tokens=16)
    answer = _answer(server, call)
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.text), dict)
    else:
        assert answer.text.startswith("{")


def test_limits_are_the_same_errors(server):
    with pytest.raises(InvalidRequest) as exc:
        server.start(_call("Hi", max_tokens=5000))
    assert exc.value.param == "max_tokens"
    with pytest.raises(AdapterNotLoaded):
        server.start(_call("Hi", "ftjob-000000000000000000000000/final"))


def test_adapter_for_another_base_model_is_refused(server, setup):
    with pytest.raises(AdapterIncompatible, match="other/model"):
        server.load_adapter(setup[2])


def test_a_full_fine_tune_answers_on_ours_and_vllm_refuses_it_naming_model(setup):
    """Ours runs a full fine-tune on an engine of its own; the vLLM engine serves LoRA
    adapters only, and says so (a 400 naming ``model``) rather than answering with the base."""
    servers, _, _, full = setup
    ours = servers["native"]
    ours.load_adapter(full)
    try:
        assert _answer(ours, _call(QUESTIONS[0], full)).text != \
            _answer(ours, _call(QUESTIONS[0])).text
    finally:
        ours.unload_adapter(full)
    with pytest.raises(AdapterIncompatible, match="full fine-tune") as refused:
        servers["vllm"].load_adapter(full)
    assert refused.value.param == "model" and refused.value.status == 400


def test_unloaded_adapter_is_gone(setup):
    servers, adapters, _, _ = setup
    for server in servers.values():
        server.load_adapter(adapters[0])
        server.unload_adapter(adapters[0])
        assert adapters[0] not in server.engine.adapters
        with pytest.raises(AdapterNotLoaded):
            server.start(_call("Hi", adapters[0]))


def test_cuda_on_a_machine_without_a_gpu_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESERVE_CHAT_DEVICE", "cuda")
    settings = Settings(storage=str(tmp_path))
    with pytest.raises(ChatConfigError, match="TUNESERVE_CHAT_DEVICE=cuda"):
        ChatServer.from_settings("tuneserve/tiny-llama", settings)


def test_engine_choice(tmp_path):
    assert place(device="auto", engine="auto").engine == "native"  # no GPU here
    assert place(device="cpu", engine="vllm").engine == "vllm"
    with pytest.raises(ChatConfigError, match="TUNESERVE_CHAT_ENGINE=vllm"):
        place(engine="vllm", vllm_python=str(tmp_path / "no-python"))
