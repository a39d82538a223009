"""Eval throughput: an eval run of N items with a ``string_check`` criterion against the chat
engine's own batched throughput on the same prompts, side by side in one process.

Both sides use one in-process chat back end (``LocalChatBackend``: the engine that a chat
replica runs) on the built-in model, greedy, ``--max-tokens`` per answer:

* ``engine``: the prompts submitted straight to the back end, as many in flight as the engine
  takes (``chat_max_concurrency``, twice its batch), so it decodes full batches: the ceiling;
* ``eval``: ``POST /v1/evals/{id}/runs`` on the app (items uploaded as a file of purpose
  ``evals``), the run going as it does without Serve (a task beside the app, on the same back
  end): checking the items, rendering the prompt template, sampling, grading, storing results
  every 2 s; timed from the POST of the run to its ``completed``.

Rounds alternate the order of the sides. Prints items/s of each and their ratio (the issue's
bar: eval ≥ 0.8× engine) and writes ``bench/results/eval_throughput.{json,md}``.

Run: ``.venv/bin/python -m bench.eval_throughput`` (``--n 100 --rounds 1`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from service.api.app import create_app
from service.chat.backends import LocalChatBackend
from service.cli import eval_tasks
from service.cli.evaluate import EXACT, ITEM_SCHEMA
from service.core.names import BUILTIN_MODEL_ID
from service.core.settings import Settings
from serving.protocol import ChatCall
from training.cpu.info import cpu_description

RESULTS = Path(__file__).parent / "results"
POLL_S = 0.25
"""How often the eval side asks for the run's status (as a client would; each ask is a storage
read on the same CPUs)."""


async def engine_side(backend, prompts: list[str], max_tokens: int, limit: int) -> float:
    calls = [ChatCall(base_model=BUILTIN_MODEL_ID, adapter_id=None,
                      messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
                      temperature=0.0, seed=42) for p in prompts]
    gate = asyncio.Semaphore(limit)  # the engine refuses more than this in flight

    async def one(call: ChatCall):
        async with gate:
            return await backend.complete(call)
    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in calls))
    return time.perf_counter() - started


async def eval_side(client: httpx.AsyncClient, eval_id: str, file_id: str,
                    max_tokens: int) -> tuple[float, dict]:
    body = {"data_source": {
        "type": "completions", "model": BUILTIN_MODEL_ID,
        "source": {"type": "file_id", "id": file_id},
        "input_messages": {"type": "template",
                           "template": [{"role": "user", "content": "{{item.prompt}}"}]},
        "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens}}}
    started = time.perf_counter()
    run = (await client.post(f"/v1/evals/{eval_id}/runs", json=body)).json()
    while run["status"] not in ("completed", "failed", "canceled"):
        await asyncio.sleep(POLL_S)
        run = (await client.get(f"/v1/evals/{eval_id}/runs/{run['id']}")).json()
    seconds = time.perf_counter() - started
    assert run["status"] == "completed", run
    return seconds, run


async def main_async(args: argparse.Namespace) -> dict:
    storage = tempfile.mkdtemp(prefix="eval-bench-")
    settings = Settings(storage=storage, tiny_model=False, max_tokens_cap=max(64, args.max_tokens),
                        max_request_bytes=64 * 1024 * 1024)
    backend = LocalChatBackend(settings)
    app = create_app(settings, chat=backend)
    prompts = [e.prompt for e in eval_tasks.heldout("sort", args.n, seed=args.seed)]
    items = [{"prompt": e.prompt, "reference": e.output}
             for e in eval_tasks.heldout("sort", args.n, seed=args.seed)]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench",
                                 timeout=600) as client:
        created = await client.post("/v1/evals", json={
            "name": "sort", "testing_criteria": [EXACT],
            "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}})
        eval_id = created.json()["id"]
        lines = "".join(json.dumps({"item": i}) + "\n" for i in items).encode()
        uploaded = await client.post("/v1/files", data={"purpose": "evals"},
                                     files={"file": ("items.jsonl", lines)})
        file_id = uploaded.json()["id"]
        await engine_side(backend, prompts[:32], args.max_tokens, settings.chat_max_concurrency)  # load and warm the engine
        rows = []
        for r in range(args.rounds):
            order = ["engine", "eval"] if r % 2 == 0 else ["eval", "engine"]
            row = {}
            for side in order:
                if side == "engine":
                    row["engine_s"] = await engine_side(backend, prompts, args.max_tokens,
                                                        settings.chat_max_concurrency)
                else:
                    row["eval_s"], run = await eval_side(client, eval_id, file_id, args.max_tokens)
                    row["passed"] = run["result_counts"]["passed"]
            row["ratio"] = row["engine_s"] / row["eval_s"]
            rows.append(row)
            print(f"round {r + 1} ({' then '.join(order)}): engine {args.n / row['engine_s']:.1f}"
                  f" items/s, eval {args.n / row['eval_s']:.1f} items/s, ratio "
                  f"{row['ratio']:.3f}", flush=True)
    backend.close()
    engine_ips = args.n / statistics.median(r["engine_s"] for r in rows)
    eval_ips = args.n / statistics.median(r["eval_s"] for r in rows)
    return {"n": args.n, "max_tokens": args.max_tokens, "rounds": rows,
            "engine_items_per_s": round(engine_ips, 2), "eval_items_per_s": round(eval_ips, 2),
            "ratio": round(statistics.median(r["ratio"] for r in rows), 3),
            "model": BUILTIN_MODEL_ID, "cpu": cpu_description(), "cpus": len(__import__("os")
                                                                     .sched_getaffinity(0)),
            "measured": time.strftime("%Y-%m-%d %H:%M")}


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        f"## Eval throughput: {result['n']} `sort` items, `string_check`, {result['model']}",
        "",
        (f"Greedy, at most {result['max_tokens']} tokens per answer; one in-process chat back "
         f"end; {len(result['rounds'])} rounds, sides alternating; medians."),
        "",
        "| side | items/s |", "|---|---|",
        ("| chat engine, at its capacity in flight (`complete` straight on the back end) | "
         f"{result['engine_items_per_s']} |"),
        ("| eval run (`POST /v1/evals/{id}/runs`, to `completed`) | "
         f"{result['eval_items_per_s']} |"),
        "",
        f"**eval / engine: {result['ratio']}** (the bar: ≥ 0.8)",
        "",
        f"CPU: {result['cpu']} ({result['cpus']} CPUs); measured {result['measured']}.",
        "",
        "Reproduce: `.venv/bin/python -m bench.eval_throughput`", ""]
    (RESULTS / "eval_throughput.md").write_text("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    if not args.no_write:
        write(result)


if __name__ == "__main__":
    main()
