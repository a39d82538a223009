"""Chat contract benchmark: what constrained decoding and ``n`` cost, side by side in one run.

On SmolLM2-135M (the built-in model) in process through our engine, on one torch thread as a
chat replica runs, medians over repeats whose order alternates each round:

1. ``response_format`` ``json_schema`` against the same request without it: output tokens/s of
   decoding (the first token's time left out: the two answers differ in length, and the
   prefill would weigh more on the shorter), greedy, the same prompt;
2. ``n=4`` against four sequential ``n=1`` requests: output tokens/s over the whole request,
   64 sampled tokens per choice (end of turn ignored, so both sides make the same tokens).

Run: ``.venv/bin/python -m bench.chat_contract`` (``--reps 5``). Writes
``bench/results/chat_contract.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from service.ray.embedded import CHAT_REPLICA_ENV

for _name, _value in CHAT_REPLICA_ENV.items():  # as a chat replica, before torch loads OpenMP
    os.environ.setdefault(_name, _value)

from service.core.names import BUILTIN_MODEL_ID
from serving.engine.grammar import json_schema_grammar
from serving.engine.native import Engine, pick_dtype
from serving.engine.sampling import SamplingParams
from training.cpu.info import cpu_description
from training.model import chat

RESULTS = Path(__file__).parent / "results"
QUESTION = ("List four people of a small town, each with a name, an age, a job and whether "
            "they are married, as JSON.")
PEOPLE = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "array", "minItems": 4, "maxItems": 4, "items": {
              "type": "object", "additionalProperties": False,
              "required": ["name", "age", "job", "married"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "age": {"type": "integer", "minimum": 0, "maximum": 110},
                             "job": {"type": "string", "maxLength": 24},
                             "married": {"type": "boolean"}}}}}}


def decode_rate(engine: Engine, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
    """Tokens/s after the first piece of text, and the answer."""
    started = time.perf_counter()
    first = None
    text, last = [], None
    for last in engine.submit(prompt, params):
        if first is None:
            first = time.perf_counter()
        text.append(last.text)
    ended = time.perf_counter()
    assert last is not None and first is not None
    tokens = last.completion_tokens
    return {"tokens": tokens, "seconds": ended - started,
            "decode_tok_s": (tokens - 1) / (ended - first), "text": "".join(text)}


def choices_rate(engine: Engine, prompt: list[int], n: int, tokens: int, seed: int,
                 together: bool) -> float:
    """Output tokens/s of ``n`` choices: one request of ``n`` or ``n`` requests one by one."""
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eot=True)
    started = time.perf_counter()
    made = 0
    for generation in ([engine.submit(prompt, params, n=n)] if together else
                       (engine.submit(prompt, params) for _ in range(n))):
        made += sum(c.completion_tokens for c in generation if c.finish_reason)
    assert made == n * tokens
    return made / (time.perf_counter() - started)


def run(reps: int, tokens: int) -> dict[str, Any]:
    engine = Engine.for_base_model(BUILTIN_MODEL_ID, dtype="auto", threads=1, max_batch=16)
    prompt = chat.render_prompt(engine.tokenizer, [{"role": "user", "content": QUESTION}])
    grammar = json_schema_grammar(PEOPLE)
    free = SamplingParams(max_tokens=160, temperature=0)
    constrained = SamplingParams(max_tokens=160, temperature=0, grammar=grammar)
    decode_rate(engine, prompt, constrained)  # warm up: the grammar tokenizer, the caches
    decode_rate(engine, prompt, free)
    rates: dict[str, list[float]] = {"free": [], "json_schema": [], "n4": [], "seq4": []}
    samples: dict[str, Any] = {}
    for rep in range(reps):
        order = [("free", free), ("json_schema", constrained)]
        for name, params in order if rep % 2 == 0 else order[::-1]:
            result = decode_rate(engine, prompt, params)
            rates[name].append(result["decode_tok_s"])
            samples[name] = {k: result[k] for k in ("tokens", "text")}
        sides = [("n4", True), ("seq4", False)]
        for name, together in sides if rep % 2 == 0 else sides[::-1]:
            rates[name].append(choices_rate(engine, prompt, 4, tokens, rep, together))
    engine.close()
    json.loads(samples["json_schema"]["text"])  # the constrained answer parses
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"cpu": cpu_description(), "dtype": pick_dtype("auto"), "threads": 1, "reps": reps,
            "model": BUILTIN_MODEL_ID, "tokens_per_choice": tokens, "rates": rates,
            "medians": med, "constrained_cost": 1 - med["json_schema"] / med["free"],
            "n4_speedup": med["n4"] / med["seq4"], "samples": samples}


def markdown(r: dict[str, Any]) -> str:
    m, samples = r["medians"], r["samples"]
    cost_met = "yes" if r["constrained_cost"] <= 0.10 else "no"
    n_met = "yes" if r["n4_speedup"] >= 2.5 else "no"
    head = (f"`python -m bench.chat_contract --reps {r['reps']}`; {r['model']} in process "
            f"through the engine, {r['dtype']}, {r['threads']} torch thread; CPU: {r['cpu']}. "
            f"Medians of {r['reps']} rounds, the order of the sides alternating each round.")
    return "\n".join([
        "# Chat contract: constrained decoding and n", "", head, "",
        "| request | output tokens/s | target | met |", "|---|---|---|---|",
        f"| no response_format (greedy, decode) | {m['free']:.1f} | | |",
        (f"| response_format json_schema (same request) | {m['json_schema']:.1f} | cost ≤ 10 % "
         f"| {cost_met} (cost {100 * r['constrained_cost']:.1f} %) |"),
        f"| four sequential n=1 ({r['tokens_per_choice']} tokens each) | {m['seq4']:.1f} | | |",
        f"| n=4 | {m['n4']:.1f} | ≥ 2.5× | {n_met} ({r['n4_speedup']:.2f}×) |", "",
        (f"Constrained answer ({samples['json_schema']['tokens']} tokens): "
         f"`{samples['json_schema']['text'][:300]}`"), "",
        (f"Free answer ({samples['free']['tokens']} tokens): "
         f"`{samples['free']['text'][:300]!r}`"), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--name", default="chat_contract")
    args = parser.parse_args(argv)
    result = run(args.reps, args.tokens)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
