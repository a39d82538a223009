"""Load while training: pollers and streaming chats against ``tuneserve up`` on loopback.

During a running training job, ``--pollers`` clients (default 50) each loop over "retrieve the
job, list its events", and ``--chats`` clients (default 8) each loop over one streaming chat
completion on the tiny model, for ``--seconds`` (default 60). Every request is timed; any
non-2xx answer, broken stream or transport error counts as an error. The peer figure is the
same requests from one client with no load, measured first in the same run: the report gives
loaded/unloaded latency ratios.

Run: ``.venv/bin/python -m bench.load`` (``--seconds 15`` for a short run). Writes
``bench/results/load.json`` and ``bench/results/load.md``. Bounded: it stops by itself after
the window, cancels its job and stops the service it started; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from training.cpu.info import cpu_description

RESULTS = Path(__file__).parent / "results"
TINY = "tuneserve/tiny-llama"
CHAT_BODY = {"model": TINY, "messages": [{"role": "user", "content": "Say something."}],
             "max_tokens": 16, "temperature": 0, "stream": True}


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, list[str]] = {}

    def ok(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)

    def error(self, kind: str, what: str) -> None:
        self.errors.setdefault(kind, []).append(what[:200])

    def summary(self, window: float) -> dict[str, Any]:
        kinds = sorted(set(self.latencies) | set(self.errors))
        return {kind: _stats(self.latencies.get(kind, []), len(self.errors.get(kind, [])),
                             window) for kind in kinds}


def _stats(values: list[float], errors: int, window: float) -> dict[str, Any]:
    ordered = sorted(values)

    def pct(p: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1) \
            if ordered else None
    return {"requests": len(values), "errors": errors, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
            "per_second": round(len(values) / window, 1) if window else None}


async def _timed(rec: Recorder, kind: str, call) -> None:
    started = time.perf_counter()
    try:
        response = await call()
    except httpx.HTTPError as exc:
        rec.error(kind, f"{type(exc).__name__}: {exc}")
        return
    if response.status_code >= 300:
        rec.error(kind, f"{response.status_code} {response.text[:150]}")
        return
    rec.ok(kind, time.perf_counter() - started)


async def poller(http: httpx.AsyncClient, rec: Recorder, job_id: str, until: float) -> None:
    while time.monotonic() < until:
        await _timed(rec, "job", lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}"))
        await _timed(rec, "events",
                     lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                      params={"limit": 20}))


async def stream_once(http: httpx.AsyncClient, rec: Recorder) -> None:
    """One streaming completion: time to first token, and the whole stream."""
    started = time.perf_counter()
    first: float | None = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=CHAT_BODY) as response:
            if response.status_code != 200:
                rec.error("chat_stream", f"{response.status_code} {(await response.aread())[:150]!r}")
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error("chat_stream", json.dumps(chunk)[:200])
                    return
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - started
    except httpx.HTTPError as exc:
        rec.error("chat_stream", f"{type(exc).__name__}: {exc}")
        return
    if not done:
        rec.error("chat_stream", "the stream ended without [DONE]")
        return
    rec.ok("chat_stream", time.perf_counter() - started)
    if first is not None:
        rec.ok("chat_first_token", first)


async def chatter(http: httpx.AsyncClient, rec: Recorder, until: float) -> None:
    while time.monotonic() < until:
        await stream_once(http, rec)


def _client(base_url: str, api_key: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                             headers={"Authorization": f"Bearer {api_key}"})


async def unloaded(base_url: str, job_id: str, api_key: str, rounds: int = 10) -> dict:
    """The peer: the same requests from one client, nothing else running but the training."""
    rec = Recorder()
    async with _client(base_url, api_key, 2) as http:
        for _ in range(rounds):
            await _timed(rec, "job", lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}"))
            await _timed(rec, "events", lambda: http.get(
                f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 20}))
        for _ in range(3):
            await stream_once(http, rec)
    return rec.summary(0)


async def run_load(base_url: str, job_id: str, *, seconds: float = 60, pollers: int = 50,
                   chats: int = 8, api_key: str = "local") -> dict[str, Any]:
    """Load the service for ``seconds``; returns the per-kind summary and the error samples."""
    rec = Recorder()
    until = time.monotonic() + seconds
    async with _client(base_url, api_key, pollers + chats) as http:
        tasks = [poller(http, rec, job_id, until) for _ in range(pollers)]
        tasks += [chatter(http, rec, until) for _ in range(chats)]
        started = time.monotonic()
        await asyncio.gather(*tasks)
        window = time.monotonic() - started
    return {"window_s": round(window, 1), "pollers": pollers, "chats": chats,
            "kinds": rec.summary(window),
            "error_samples": {k: v[:5] for k, v in rec.errors.items()},
            "errors": sum(len(v) for v in rec.errors.values())}


def write_results(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [(f"# Load while training ({result['window_s']} s, {result['pollers']} pollers, "
              f"{result['chats']} streaming chats, loopback)"), "",
             f"Machine: {result['machine']}. Errors: **{result['errors']}**.", "",
             ("| request | requests | errors | p50 ms | p99 ms | max ms | per s | "
              "unloaded p50 ms | p50 ratio |"), "|---|---|---|---|---|---|---|---|---|"]
    for kind, s in result["kinds"].items():
        base = result["unloaded"].get(kind, {}).get("p50_ms")
        ratio = f"{s['p50_ms'] / base:.1f}×" if base and s["p50_ms"] else "–"
        lines.append(f"| {kind} | {s['requests']} | {s['errors']} | {s['p50_ms']} | "
                     f"{s['p99_ms']} | {s['max_ms']} | {s['per_second']} | {base} | {ratio} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    (RESULTS / "load.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers import Service, wait_until

    parser = argparse.ArgumentParser(prog="bench.load", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--chats", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="tuneserve-load-") as tmp:
        service = Service(str(Path(tmp) / "storage")).start()
        try:
            with httpx.Client(base_url=service.url, timeout=60) as http:
                lines = [json.dumps({"messages": [
                    {"role": "user", "content": f"Repeat number {i}."},
                    {"role": "assistant", "content": f"number {i % 7}"}]}) for i in range(64)]
                file_id = http.post("/v1/files", data={"purpose": "fine-tune"}, files={
                    "file": ("t.jsonl", io.BytesIO("\n".join(lines).encode()))}).json()["id"]
                job_id = http.post("/v1/fine_tuning/jobs", json={
                    "model": TINY, "training_file": file_id,
                    "hyperparameters": {"n_epochs": 50, "batch_size": 4}}).json()["id"]
                wait_until(lambda: any(e["type"] == "metrics" for e in http.get(
                    f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]), 300,
                    what="the job's first step")
                base = asyncio.run(unloaded(service.url, job_id, "local"))
                result = asyncio.run(run_load(service.url, job_id, seconds=args.seconds,
                                              pollers=args.pollers, chats=args.chats))
                status = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
                http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        finally:
            service.stop()
    result.update(unloaded=base, job_status_during_load=status,
                  machine=f"{cpu_description()}, shared",
                  command="python -m bench.load " + " ".join(argv or sys.argv[1:]))
    write_results(result)
    sys.stdout.write(json.dumps({k: result[k] for k in ("errors", "kinds")}, indent=2) + "\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
