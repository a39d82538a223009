"""The generation engine on the tiny model: mixed-adapter batches, LRU, checks, sampling, limits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.core.errors import InvalidRequest, NotFound, RateLimited
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from serving.engine import packed_linear
from serving.adapters import AdapterCache, AdapterIncompatible, fetch_adapter
from serving.engine.native import AdapterNotLoaded, Engine
from serving.engine.prefix_cache import PrefixCache
from serving.engine.sampling import IncrementalText, SamplingParams, StopText
from tests.helpers import wait_until
from tests.serving_adapters import write_adapter, write_full_model
from training.model import chat
from training.model import registry

GREEDY = SamplingParams(max_tokens=12, temperature=0)
QUESTIONS = ["What is the capital of France?", "Hi", "Write a haiku about the sea, please.",
             "2+2?"]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return registry.resolve_model(registry.TINY_MODEL_ID)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_dir):
    """Local storage holding four adapters of the tiny model (seeds 0..3)."""
    storage = open_storage(StorageConfig(uri=str(tmp_path_factory.mktemp("storage"))))
    base = registry.load_model(tiny_dir)
    ids = [write_adapter(storage, tiny_dir, registry.TINY_MODEL_ID, seed=i, model=base)
           for i in range(4)]
    return storage, ids


@pytest.fixture
def engine(tiny_dir):
    eng = Engine.for_base_model(registry.TINY_MODEL_ID, dtype="float32", max_batch=8,
                                max_pending=16)
    yield eng
    eng.close()


def _load(engine: Engine, storage, adapter_id: str, tmp_path: Path) -> None:
    engine.load_adapter(adapter_id, fetch_adapter(storage, adapter_id, tmp_path))


def _prompt(engine: Engine, question: str) -> list[int]:
    return chat.render_prompt(engine.tokenizer, [{"role": "user", "content": question}])


def test_mixed_batch_of_four_adapters_equals_each_alone(engine, store, tmp_path):
    storage, ids = store
    for adapter_id in ids:
        _load(engine, storage, adapter_id, tmp_path)
    # Different prompt lengths, so the batch is left-padded; adapters interleaved with the base.
    cases = [(a, q) for a, q in zip([None, *ids], [*QUESTIONS, "Bonjour"])]
    cases += [(ids[2], QUESTIONS[1]), (ids[0], QUESTIONS[3])]
    alone = {case: engine.generate(_prompt(engine, case[1]), GREEDY, case[0]).text
             for case in cases}
    assert len({alone[c] for c in cases}) >= 5, "adapters should change the answer"

    generations = [engine.submit(_prompt(engine, q), GREEDY, a) for a, q in cases]
    together = {case: "".join(c.text for c in g) for case, g in zip(cases, generations)}
    assert together == alone


def test_request_joining_a_running_batch_gets_its_own_answer(engine, store, tmp_path):
    storage, ids = store
    for adapter_id in ids[:2]:
        _load(engine, storage, adapter_id, tmp_path)
    long = SamplingParams(max_tokens=40, temperature=0)
    first_alone = engine.generate(_prompt(engine, QUESTIONS[0]), long, ids[0]).text
    late_alone = engine.generate(_prompt(engine, QUESTIONS[2]), GREEDY, ids[1]).text

    first = engine.submit(_prompt(engine, QUESTIONS[0]), long, ids[0])
    stream = iter(first)
    pieces = [next(stream).text]  # the first row is decoding now
    late = engine.submit(_prompt(engine, QUESTIONS[2]), GREEDY, ids[1])
    assert "".join(c.text for c in late) == late_alone
    assert "".join(pieces + [c.text for c in stream]) == first_alone


def test_prompts_sharing_a_prefix_reuse_it_and_answer_as_without(engine, store, tiny_dir,
                                                                 tmp_path):
    """A conversation's next turn, and other prompts with the same opening, reuse the keys and
    values already computed for that opening, per adapter, and answer exactly as without."""
    storage, ids = store
    uncached = Engine(registry.load_model(tiny_dir), engine.tokenizer, base_model=engine.base_model,
                      fingerprint=engine.fingerprint, eot_ids=engine.eot_ids,
                      prefix_cache_tokens=0)
    for eng in (engine, uncached):
        for adapter_id in ids[:2]:
            _load(eng, storage, adapter_id, tmp_path)
    turn1 = [{"role": "system", "content": "You answer in one short sentence."},
             {"role": "user", "content": QUESTIONS[0]}]
    turn2 = [*turn1, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": QUESTIONS[2]}]
    first, second = (chat.render_prompt(engine.tokenizer, t) for t in (turn1, turn2))
    assert second[:len(first)] == first

    def answers(eng: Engine, cases: list[tuple[str | None, list[int]]]) -> list[str]:
        generations = [eng.submit(prompt, GREEDY, adapter) for adapter, prompt in cases]
        return ["".join(c.text for c in g) for g in generations]

    assert answers(engine, [(ids[0], first)]) == answers(uncached, [(ids[0], first)])
    assert engine.prefixes.reused_tokens == 0
    assert answers(engine, [(ids[0], second)]) == answers(uncached, [(ids[0], second)])
    assert engine.prefixes.reused_tokens == len(first)  # the whole first turn was reused

    # One batch of hits of several lengths, misses, another adapter's first sight of a prompt
    # another adapter has cached (its keys differ: no reuse), and the base model.
    batch = [(ids[0], second), (ids[1], first), (None, first), (ids[0], _prompt(engine, "Hi")),
             (ids[1], second), (ids[0], first)]
    assert answers(engine, batch) == answers(uncached, batch)
    assert len({a for a, _ in batch} | {None}) == 3
    assert answers(engine, batch) == answers(uncached, batch)  # now every row is a hit

    entries = len(engine.prefixes)
    engine.remove_adapter(ids[1])
    assert len(engine.prefixes) == entries - 2  # its two prompts are forgotten with it
    uncached.close()


def test_prefix_cache_keeps_the_longest_match_within_its_budget():
    def kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1),) * 2]

    cache = PrefixCache(max_tokens=50)
    other, long = list(range(50, 62)), [*range(20), 99]
    cache.store(0, long, lambda: kv(21))
    cache.store(0, other, lambda: kv(12))
    cache.store(0, list(range(12)), lambda: kv(12))  # a shorter match for the query below
    n, layers = cache.match(0, [*range(20), 7, 8])
    assert n == 20 and layers[0][0].shape[2] == 20  # the longest entry, up to where they part
    assert cache.match(0, long)[0] == 20  # never the last token: its logits are needed
    assert cache.match(1, long) == (0, None)  # another adapter's keys are not these
    assert cache.match(0, [*range(5), 50, 51, 52, 53, 54])[0] == 0  # below MIN_MATCH
    assert cache.match(0, [*other, 5])[0] == 12  # used now, after `long`
    cache.store(0, list(range(100, 130)), lambda: kv(30))  # 75 tokens > 50: LRU ones go
    assert cache.match(0, long)[0] == 0 and len(cache) == 2
    assert cache.match(0, [*other, 5])[0] == 12
    assert PrefixCache(max_tokens=0).match(0, long) == (0, None)


def test_batched_lora_matches_peft(engine, store, tiny_dir, tmp_path):
    """Our LoRA arithmetic is PEFT's: same greedy tokens as PEFT's own forward."""
    storage, ids = store
    path = fetch_adapter(storage, ids[3], tmp_path)
    engine.load_adapter(ids[3], path)
    prompt = _prompt(engine, QUESTIONS[0])
    ours = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0), ids[3])

    assert ours.text == _peft_greedy(engine, tiny_dir, path, prompt, ours.completion_tokens)


def _peft_greedy(engine: Engine, tiny_dir: Path, path: Path, prompt: list[int],
                 n_tokens: int, dtype: torch.dtype = torch.float32) -> str:
    """PEFT's own greedy answer (full forward per token) with the adapter folder at ``path``."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(registry.load_model(tiny_dir, dtype=dtype),
                                           str(path)).eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n_tokens):
            tokens.append(int(peft_model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return engine.tokenizer.decode(tokens[len(prompt):], skip_special_tokens=True)


needs_native_bf16 = pytest.mark.skipif(
    not packed_linear.native_bf16(), reason="bf16 weights are packed only on CPUs with native bf16")


@needs_native_bf16
@pytest.mark.parametrize("rows", [1, 8, 320])
def test_packed_weights_give_the_plain_product_exactly(rows):
    weight = torch.randn(1536, 576, dtype=torch.bfloat16)
    bias = torch.randn(1536, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 576, dtype=torch.bfloat16)
    packed = packed_linear.pack(weight)

    assert packed is not None
    assert torch.equal(packed_linear.linear(x, packed, bias), F.linear(x, weight, bias))
    assert packed_linear.pack(weight.float()) is None  # fp32 keeps its plain weight


@needs_native_bf16
def test_bf16_engine_on_packed_weights_answers_as_peft(store, tiny_dir, tmp_path):
    """In bf16 the engine's base matmuls run on packed weights (the plain copies are freed);
    with an adapter its greedy answer is PEFT's own on the plain bf16 model."""
    storage, ids = store
    engine = Engine.for_base_model(registry.TINY_MODEL_ID, dtype="bfloat16")
    try:
        path = fetch_adapter(storage, ids[1], tmp_path)
        engine.load_adapter(ids[1], path)
        assert all(m.packed is not None and m.weight is None for m in engine.modules.values())
        prompt = _prompt(engine, QUESTIONS[2])
        ours = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0), ids[1])

        assert ours.text == _peft_greedy(engine, tiny_dir, path, prompt, ours.completion_tokens,
                                         dtype=torch.bfloat16)
    finally:
        engine.close()


def test_adapters_on_some_sibling_modules_with_other_ranks(engine, store, tiny_dir, tmp_path):
    """q/k/v and gate/up share one A product per group; adapters that target only some of the
    siblings, with different ranks, still give PEFT's answers, alone and batched together."""
    storage, ids = store
    specs = [(["q_proj", "v_proj", "up_proj"], 4), (["k_proj", "gate_proj", "down_proj"], 8),
             (["v_proj", "o_proj"], 2)]
    partial = [write_adapter(storage, tiny_dir, registry.TINY_MODEL_ID, seed=20 + i, r=r,
                             targets=targets) for i, (targets, r) in enumerate(specs)]
    paths = {a: fetch_adapter(storage, a, tmp_path) for a in [*partial, ids[0]]}
    for adapter_id, path in paths.items():
        engine.load_adapter(adapter_id, path)
    cases = [(None, QUESTIONS[0]), (partial[0], QUESTIONS[1]), (partial[1], QUESTIONS[2]),
             (partial[2], QUESTIONS[3]), (ids[0], QUESTIONS[0]), (partial[0], QUESTIONS[3])]
    alone = {case: engine.generate(_prompt(engine, case[1]), GREEDY, case[0]) for case in cases}
    for adapter_id in partial:
        prompt = _prompt(engine, QUESTIONS[partial.index(adapter_id) + 1])
        answer = alone[(adapter_id, QUESTIONS[partial.index(adapter_id) + 1])]
        assert answer.text == _peft_greedy(engine, tiny_dir, paths[adapter_id], prompt,
                                           answer.completion_tokens)

    generations = [engine.submit(_prompt(engine, q), GREEDY, a) for a, q in cases]
    together = {case: "".join(c.text for c in g) for case, g in zip(cases, generations)}
    assert together == {case: chunk.text for case, chunk in alone.items()}


def test_lru_with_room_for_two_and_requests_for_three(engine, store, tmp_path):
    storage, ids = store
    loads: list[str] = []
    evictions: list[str] = []

    def load(adapter_id: str) -> None:
        loads.append(adapter_id)
        _load(engine, storage, adapter_id, tmp_path)

    def unload(adapter_id: str) -> None:
        evictions.append(adapter_id)
        engine.remove_adapter(adapter_id)

    a, b, c = ids[:3]
    reference = {}
    for adapter_id in (a, b, c):  # answers of each adapter on an engine of its own
        solo = Engine(registry.load_model(registry.resolve_model(registry.TINY_MODEL_ID)),
                      engine.tokenizer, base_model=engine.base_model,
                      fingerprint=engine.fingerprint, eot_ids=engine.eot_ids)
        solo.load_adapter(adapter_id, fetch_adapter(storage, adapter_id, tmp_path))
        reference[adapter_id] = solo.generate(_prompt(solo, "Hi"), GREEDY, adapter_id).text
        solo.close()

    cache = AdapterCache(2, load, unload)

    async def ask(adapter_id: str) -> str:
        await cache.get(adapter_id)
        return "".join([c.text async for c in engine.submit(_prompt(engine, "Hi"), GREEDY,
                                                              adapter_id)])

    async def scenario() -> list[tuple[str, str, list[str]]]:
        steps = []
        for adapter_id in (a, b, a, c, b, a):
            answer = await ask(adapter_id)
            steps.append((adapter_id, answer, cache.loaded))
        return steps

    steps = asyncio.run(scenario())
    assert [answer for _, answer, _ in steps] == [reference[x] for x, _, _ in steps]
    # LRU order after each request (least recently used first).
    assert [loaded for _, _, loaded in steps] == [[a], [a, b], [b, a], [a, c], [c, b], [b, a]]
    assert evictions == [b, a, c]
    assert loads == [a, b, c, b, a]
    assert sorted(engine.adapters) == sorted([b, a])


def test_concurrent_requests_share_one_adapter_load(engine, store, tmp_path):
    storage, ids = store
    release = threading.Event()
    loads: list[str] = []

    def load(adapter_id: str) -> None:
        loads.append(adapter_id)
        release.wait(timeout=10)
        _load(engine, storage, adapter_id, tmp_path)

    cache = AdapterCache(2, load, engine.remove_adapter)

    async def scenario() -> list[float | None]:
        waiters = [asyncio.create_task(cache.get(ids[0])) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*waiters)

    load_seconds = asyncio.run(scenario())
    assert loads == [ids[0]]
    # The request that caused the hot-load reports its time (for /metrics); the others none.
    assert sum(s is not None for s in load_seconds) == 1 and max(filter(None, load_seconds)) > 0
    assert engine.adapters == [ids[0]]


def test_adapter_in_use_is_unloaded_after_its_requests(engine, store, tmp_path):
    storage, ids = store
    _load(engine, storage, ids[0], tmp_path)
    generation = engine.submit(_prompt(engine, "Hi"), SamplingParams(max_tokens=30,
                                                                      temperature=0), ids[0])
    engine.remove_adapter(ids[0])
    assert engine.adapters == []
    with pytest.raises(AdapterNotLoaded):
        engine.submit(_prompt(engine, "Hi"), GREEDY, ids[0])
    chunks = list(generation)  # the running request still finishes with its adapter
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(not m.factors for m in engine.modules.values())


@pytest.mark.parametrize("change, message", [
    ({"base_weights_hash": "sha256:other"}, "different base weights"),
    ({"template_hash": "sha256:other"}, "different base chat template"),
    ({"base_model": registry.BUILTIN_MODEL_ID}, "trained on 'HuggingFaceTB/SmolLM2-135M-Instruct'"),
    ({"lora": {"r": 512}}, "rank 512"),
])
def test_mismatched_adapter_is_refused(engine, store, tiny_dir, tmp_path, change, message):
    storage, _ = store
    adapter_id = write_adapter(storage, tiny_dir, registry.TINY_MODEL_ID, seed=9,
                               manifest_overrides=change)
    with pytest.raises(AdapterIncompatible, match=message) as info:
        _load(engine, storage, adapter_id, tmp_path)
    assert info.value.status == 400 and info.value.param == "model"
    assert engine.adapters == []


def test_pickled_adapter_is_refused(engine, store, tiny_dir, tmp_path):
    storage, _ = store
    adapter_id = write_adapter(storage, tiny_dir, registry.TINY_MODEL_ID, seed=9)
    storage.put(f"adapters/{adapter_id}/adapter_model.bin", b"pickle")
    with pytest.raises(AdapterIncompatible, match=r"pickled weights \(adapter_model.bin\)"):
        _load(engine, storage, adapter_id, tmp_path)


def test_adapter_without_manifest_is_not_found(engine, store, tiny_dir, tmp_path):
    storage, _ = store
    adapter_id = write_adapter(storage, tiny_dir, registry.TINY_MODEL_ID, seed=9)
    storage.delete(f"adapters/{adapter_id}/manifest.json")  # still being written
    with pytest.raises(NotFound):
        _load(engine, storage, adapter_id, tmp_path)


def test_stop_strings_and_length(engine):
    prompt = _prompt(engine, "Hi")
    full = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    assert full.finish_reason == "length" and full.completion_tokens == 12
    stop = full.text[4:7]
    cut = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_seeded_sampling_is_reproducible(engine):
    prompt = _prompt(engine, "Hi")
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = engine.generate(prompt, params).text
    assert engine.generate(prompt, params).text == a
    others = {engine.generate(prompt, SamplingParams(max_tokens=10, seed=s)).text
              for s in range(3)}
    assert len(others) > 1


def test_limits(engine):
    prompt = _prompt(engine, "Hi")
    with pytest.raises(InvalidRequest, match="context is 2048 tokens") as info:
        engine.submit([1] * 2048, GREEDY)
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequest, match="Lower max_tokens") as info:
        engine.submit(prompt, SamplingParams(max_tokens=2048 - len(prompt) + 1))
    assert info.value.param == "max_tokens"

    slow = SamplingParams(max_tokens=2000, temperature=0)
    running = [engine.submit(prompt, slow) for _ in range(engine.max_pending)]
    with pytest.raises(RateLimited) as info:
        engine.submit(prompt, GREEDY)
    assert info.value.retry_after >= 1
    for generation in running:
        generation.cancel()
    deadline = time.monotonic() + 10
    while engine.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load == (0, 0)  # cancelled requests leave the batch and the queue
    assert engine.generate(prompt, GREEDY).finish_reason == "length"


@pytest.mark.parametrize("stop, pieces, sent", [
    (("END",), ["Hello E", "Hello EN", "Hello END more"], ["Hello ", "", ""]),
    (("END",), ["Hello E", "Hello Ex"], ["Hello ", "Ex"]),
    ((), ["caf\ufffd", "café"], ["caf", "é"]),
])
def test_stop_text_holds_back_possible_stops(stop, pieces, sent):
    tracker = StopText(stop)
    assert [tracker.update(p) for p in pieces] == sent


def test_manifest_check_reads_the_manifest_file(engine, store, tmp_path):
    storage, ids = store
    path = fetch_adapter(storage, ids[0], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["base_model"] == registry.TINY_MODEL_ID
    engine.load_adapter(ids[0], path)
    assert engine.adapters == [ids[0]]


def test_incremental_text_equals_decoding_everything(engine):
    """Token by token, the answer is always a prefix of the whole decode and ends equal to it,
    also across characters split over several byte-level tokens."""
    text = "Café ☕ — naïve 東京 🚀🚀 done.\n  Indented\tline"
    tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    incremental = IncrementalText(engine.tokenizer)
    for n in range(1, len(tokens) + 1):
        so_far = incremental.update(tokens[:n])
        assert "\ufffd" not in so_far
        assert engine.tokenizer.decode(tokens[:n], skip_special_tokens=True).startswith(so_far)
    assert incremental.update(tokens, final=True) == engine.tokenizer.decode(tokens)


def test_full_fine_tunes_run_on_engines_of_their_own_the_least_recently_used_leaving(
        store, tiny_dir, tmp_path):
    """A full fine-tune, fetched by its adapter id, answers with its own weights next to the
    base model and its adapters; beyond the server's cap the least recently used one is
    unloaded (a call for it then finds it not loaded), and loaded again it answers as before."""
    from serving.protocol import ChatCall
    from serving.server import ChatServer, collect

    storage, adapters = store
    full = [write_full_model(storage, tiny_dir, registry.TINY_MODEL_ID, seed=s) for s in (1, 2)]
    server = ChatServer(Engine.for_base_model(registry.TINY_MODEL_ID, dtype="float32"),
                        storage, cache_dir=tmp_path, max_full_models=1)

    def ask(adapter_id: str | None) -> str:
        call = ChatCall(base_model=registry.TINY_MODEL_ID, adapter_id=adapter_id,
                        messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                        temperature=0.0)

        async def answer() -> str:
            return (await collect(server.start(call), call)).text
        return asyncio.run(answer())

    try:
        server.load_adapter(adapters[0])
        server.load_adapter(full[0])
        assert server.loaded == [adapters[0], full[0]]
        answers = {name: ask(name) for name in (None, adapters[0], full[0])}
        assert len(set(answers.values())) == 3  # base, adapter and full model each their own
        first_engine = server.full_models[full[0]]
        server.load_adapter(full[1])
        assert server.loaded == [adapters[0], full[1]]
        assert ask(full[1]) not in (answers[None], answers[full[0]])
        wait_until(lambda: not first_engine.healthy, 30, what="the unloaded engine to close")
        with pytest.raises(AdapterNotLoaded):
            ask(full[0])
        server.load_adapter(full[0])
        assert ask(full[0]) == answers[full[0]]
        assert ask(adapters[0]) == answers[adapters[0]]
    finally:
        server.close()
