"""The Serve path's own cost: per-request overhead over plain uvicorn, and job → first token.

Measures, in one run on this machine, with only the tiny model offered (quick):

1. **Per-request overhead of the Serve path** over a plain uvicorn app. The same FastAPI app
   (``service.api.app.create_app``, same settings, same local storage, same API key) is served (a)
   by plain uvicorn on a loopback port and (b) by ``tuneserve up`` (HAProxy → the ``Api``
   ingress replica's own uvicorn, the embedded default; with ``RAY_SERVE_ENABLE_HA_PROXY=0`` in
   the environment, Serve's Python proxy → the replica). Both are hit with the same
   authenticated cheap request (``GET /v1/models``), sequentially, one kept-alive connection
   each, after a warm-up, in interleaved blocks (so load from other processes falls on both
   alike). Reports p50/p99 of each and the p50 difference.
2. **Time from a job's ``succeeded`` to the first streamed token of its adapter**, through the
   running service: upload a small chat file, start a job on the tiny model with a few steps,
   poll ``GET /v1/fine_tuning/jobs/{id}`` every ``--poll-ms`` until ``succeeded``, then at once
   send a streaming chat completion to the ``fine_tuned_model`` and time the first content
   chunk. Repeated ``--jobs`` times (one job after the other); also reported: the same from the
   record's ``finished_at`` (whole seconds, truncated, so that figure is an upper bound up to
   1 s high), and a second request to the now-loaded adapter for comparison.

Usage: ``python -m bench.serve_path`` (``--requests 50 --jobs 1`` for a smoke run). Writes
``bench/results/serve_path.json`` and ``bench/results/serve_path.md`` (what follows ``NOTES``
in the old ``.md``, written by hand, is kept). Starts everything it
needs (a temporary storage directory, ``tuneserve up`` and a uvicorn process on free loopback
ports) and stops it on exit, also on Ctrl-C / SIGTERM. A few minutes on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.ray.embedded import HAPROXY_ENV, RAY_DEFAULTS
from training.cpu.info import cpu_description

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
TINY = "tuneserve/tiny-llama"
API_KEY = "bench-serve-path-key"
CHEAP_PATH = "/v1/models"
TERMINAL = {"succeeded", "failed", "cancelled"}
NOTES = "<!-- notes below are written by hand and kept when the benchmark rewrites this file -->"


def plain_app():
    """The ingress's app without Serve: what ``service.ray.app`` builds on its replica, minus
    the chat and runner back ends (the cheap request uses neither). For ``uvicorn --factory``."""
    from service.api.app import create_app
    from service.core.logs import setup_logging
    from service.core.settings import Settings

    setup_logging()
    return create_app(Settings())


# --------------------------------------------------------------------------- processes


class PlainUvicorn:
    """``uvicorn bench.serve_path:plain_app --factory`` in a subprocess on a loopback port."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.env, self.log_path = env, log_path
        # No access log: uvicorn's per-request line would only slow the peer down (and so
        # shrink the overhead measured); the app logs what it logs in both set-ups.
        self.args = [sys.executable, "-m", "uvicorn", "bench.serve_path:plain_app", "--factory",
                     "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                     "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> PlainUvicorn:
        from tests.helpers import start_until_ready

        self.proc, self.log = start_until_ready(self.args, self.env, self.log_path, self.url,
                                                timeout, what="plain uvicorn", interval=0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


# --------------------------------------------------------------------------- 1. overhead


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def _timed_get(http: httpx.Client, path: str) -> float:
    started = time.perf_counter()
    response = http.get(path)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
    return elapsed


def measure_overhead(plain_url: str, serve_url: str, *, requests: int, block: int,
                     warmup: int) -> dict[str, Any]:
    """Sequential ``GET CHEAP_PATH`` to both, interleaved in blocks; seconds per request."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    clients = {name: httpx.Client(base_url=url, headers=headers, timeout=30)
               for name, url in (("plain_uvicorn", plain_url), ("serve", serve_url))}
    times: dict[str, list[float]] = {name: [] for name in clients}
    try:
        # The same answer from both (``created`` of a base model is each process's start).
        ids = {name: [m["id"] for m in http.get(CHEAP_PATH).json()["data"]]
               for name, http in clients.items()}
        if ids["plain_uvicorn"] != ids["serve"]:
            raise RuntimeError(f"the two set-ups answer differently: {ids}")
        for http in clients.values():
            for _ in range(warmup):
                _timed_get(http, CHEAP_PATH)
        order = list(clients)
        done = 0
        while done < requests:
            n = min(block, requests - done)
            for name in order:
                times[name] += [_timed_get(clients[name], CHEAP_PATH) for _ in range(n)]
            order.reverse()  # neither set-up always goes first
            done += n
    finally:
        for http in clients.values():
            http.close()
    summary: dict[str, Any] = {name: {"p50_ms": round(_pct(t, 0.5) * 1000, 2),
                                      "p99_ms": round(_pct(t, 0.99) * 1000, 2),
                                      "mean_ms": round(statistics.fmean(t) * 1000, 2)}
                               for name, t in times.items()}
    summary.update(request=f"GET {CHEAP_PATH} (authenticated)", requests_each=requests,
                   block=block, warmup_each=warmup,
                   p50_overhead_ms=round(summary["serve"]["p50_ms"]
                                         - summary["plain_uvicorn"]["p50_ms"], 2))
    return summary


# --------------------------------------------------------------------------- 2. job → token


def chat_file(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                          {"role": "assistant", "content": f"word {i % 7}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows).encode()


def stream_first_token(http: httpx.Client, model: str, max_tokens: int = 8) -> dict[str, Any]:
    """One streaming chat completion; seconds to the first chunk, the first content chunk and
    the end, and the wall-clock time of the first content chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": "Repeat the word number 3."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first_chunk = first_content = first_content_wall = None
    text = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"chat with {model} answered {response.status_code}: "
                               f"{response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"chat with {model} streamed an error: {chunk}")
            now = time.perf_counter()
            first_chunk = first_chunk or now
            content = "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            if content and first_content is None:
                first_content, first_content_wall = now, time.time()
            text.append(content)
    ended = time.perf_counter()
    if first_content is None:
        raise RuntimeError(f"chat with {model} streamed no content")
    return {"first_chunk_s": first_chunk - started, "first_token_s": first_content - started,
            "stream_s": ended - started, "first_token_wall": first_content_wall,
            "started": started, "first_token": first_content, "text": "".join(text)}


def wait_succeeded(http: httpx.Client, job_id: str, poll: float, timeout: float) -> dict:
    """Poll the job every ``poll`` s; returns the record that said ``succeeded`` and when (the
    perf_counter at the end of that response) plus the latency of that poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.perf_counter()
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        seen = time.perf_counter()
        if job.get("status") in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            return {"job": job, "seen": seen, "seen_wall": time.time(),
                    "poll_latency_s": seen - started}
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")


def _record_written(storage: Path, job_id: str, seen_wall: float) -> float | None:
    """When the job record said ``succeeded``: its file's mtime in local storage (the record is
    only ever replaced whole), or None if it was written again after we saw ``succeeded``."""
    written = (storage / "jobs" / job_id / "job.json").stat().st_mtime
    return written if written <= seen_wall else None


def measure_handoff(serve_url: str, storage: Path, *, jobs: int, examples: int, batch_size: int,
                    poll: float, job_timeout: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    runs = []
    with httpx.Client(base_url=serve_url, headers=headers, timeout=120) as http:
        base = stream_first_token(http, TINY)  # the base model is loaded and warm, as in service
        file_id = http.post("/v1/files", data={"purpose": "fine-tune"}, files={
            "file": ("train.jsonl", io.BytesIO(chat_file(examples)))}).json()["id"]
        for i in range(jobs):
            created = http.post("/v1/fine_tuning/jobs", json={
                "model": TINY, "training_file": file_id, "suffix": f"handoff{i}",
                "hyperparameters": {"n_epochs": 1, "batch_size": batch_size}})
            if created.status_code != 200:
                raise RuntimeError(f"creating a job answered {created.status_code}: {created.text}")
            job_id = created.json()["id"]
            done = wait_succeeded(http, job_id, poll, job_timeout)
            job = done["job"]
            first = stream_first_token(http, job["fine_tuned_model"])
            again = stream_first_token(http, job["fine_tuned_model"])
            written = _record_written(storage, job_id, done["seen_wall"])
            runs.append({
                "job_id": job_id, "fine_tuned_model": job["fine_tuned_model"],
                "job_seconds": (job["finished_at"] - job["created_at"]),
                "succeeded_to_first_token_s": round(first["first_token"] - done["seen"], 3),
                "request_to_first_token_s": round(first["first_token_s"], 3),
                "request_to_first_chunk_s": round(first["first_chunk_s"], 3),
                "finished_at_to_first_token_s": round(first["first_token_wall"]
                                                      - job["finished_at"], 3),
                "record_written_to_first_token_s": None if written is None else
                round(first["first_token_wall"] - written, 3),
                "record_written_to_seen_s": None if written is None else
                round(done["seen_wall"] - written, 3),
                "status_poll_latency_s": round(done["poll_latency_s"], 3),
                "warm_adapter_first_token_s": round(again["first_token_s"], 3),
                "answer": first["text"]})
            sys.stderr.write(f"job {i + 1}/{jobs}: {json.dumps(runs[-1])}\n")

    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 3) if values else None
    return {"jobs": runs, "examples": examples, "batch_size": batch_size, "n_epochs": 1,
            "poll_ms": round(poll * 1000),
            "base_model_first_request_first_token_s": round(base["first_token_s"], 3),
            "median_succeeded_to_first_token_s": median("succeeded_to_first_token_s"),
            "median_finished_at_to_first_token_s": median("finished_at_to_first_token_s"),
            "median_record_written_to_first_token_s": median("record_written_to_first_token_s"),
            "median_warm_adapter_first_token_s": median("warm_adapter_first_token_s")}


# --------------------------------------------------------------------------- results


def _mark(passed: bool) -> str:
    return "✅" if passed else "❌"


def markdown(r: dict[str, Any]) -> str:
    c, o, h = r["config"], r["overhead"], r["handoff"]
    setting = (f"{c['when']}, {c['machine']}, {c['cpus']} CPUs (load average "
               f"{c['load_average']:.2f} at start, {c['load_average_end']:.2f} at the end), tiny "
               f"model only (`{TINY}`), local storage, loopback; {c['duration_s']:.0f} s in all. "
               f"Command: `{c['command']}`.")
    lines = ["# Serve path: per-request overhead and job → first token", "", setting, "",
             (f"## Per-request overhead of the Serve path ({o['request']}, "
              f"{o['requests_each']} sequential requests each after {o['warmup_each']} warm-up, "
              f"one kept-alive connection, interleaved in blocks of {o['block']})"), "",
             "| set-up | p50 ms | p99 ms | mean ms |", "|---|---|---|---|"]
    ingress = "HAProxy → the Api replica's uvicorn" if c["haproxy"] else "Serve proxy → Api replica"
    for name, label in (("plain_uvicorn", "same app, plain uvicorn"),
                        ("serve", f"`tuneserve up` ({ingress})")):
        lines.append(f"| {label} | {o[name]['p50_ms']} | {o[name]['p99_ms']} | "
                     f"{o[name]['mean_ms']} |")
    overhead = o["p50_overhead_ms"]
    lines += ["", f"p50 overhead: **{overhead:+.2f} ms** (target ≤ +3 ms) {_mark(overhead <= 3)}",
              "", (f"## Job `succeeded` → first streamed token of its adapter "
                   f"({len(h['jobs'])} jobs, {h['examples']} examples, batch {h['batch_size']}, "
                   f"1 epoch; status polled every {h['poll_ms']} ms)"), "",
              ("| job | job s | `succeeded` seen → first token s | record written → first "
               "token s | `finished_at` → first token s (≤ 1 s high) | request → first token s "
               "| adapter's 2nd request, first token s | status poll s |"),
              "|---|---|---|---|---|---|---|---|"]
    for j in h["jobs"]:
        lines.append(f"| {j['job_id']} | {j['job_seconds']} | {j['succeeded_to_first_token_s']} | "
                     f"{j['record_written_to_first_token_s']} | "
                     f"{j['finished_at_to_first_token_s']} | {j['request_to_first_token_s']} | "
                     f"{j['warm_adapter_first_token_s']} | {j['status_poll_latency_s']} |")
    med = h["median_succeeded_to_first_token_s"]
    lines += ["", (f"Median `succeeded` → first token: **{med} s** (target ≤ 2 s) "
                   f"{_mark(med <= 2)}; from the write of the `succeeded` record (its file's "
                   f"mtime): {h['median_record_written_to_first_token_s']} s; from "
                   f"`finished_at`: {h['median_finished_at_to_first_token_s']} s (whole "
                   "seconds, truncated: up to 1 s high). \"Seen\" is the end of the status poll "
                   "that first said `succeeded`; the chat request is sent at once. For "
                   "comparison: the base model's first request on the fresh service "
                   f"{h['base_model_first_request_first_token_s']} s, the adapter's second "
                   f"request {h['median_warm_adapter_first_token_s']} s."), ""]
    return "\n".join(lines)


def write_results(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_path.json").write_text(json.dumps(result, indent=2) + "\n")
    md = RESULTS / "serve_path.md"
    notes = md.read_text().partition(NOTES)[2] if md.exists() else ""
    md.write_text(markdown(result) + (f"\n{NOTES}{notes}" if notes else ""))


# --------------------------------------------------------------------------- main


def _raise_on_sigterm(*_: object) -> None:
    # Once: the finally blocks that stop the processes run, and a second SIGTERM does not
    # cut them short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from tests.helpers import Service, free_port

    parser = argparse.ArgumentParser(prog="bench.serve_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per set-up")
    parser.add_argument("--block", type=int, default=50, help="requests per interleaved block")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--poll-ms", type=float, default=50)
    parser.add_argument("--job-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    started = time.monotonic()
    config: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": cpu_description(),
        "cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()[0],
        "command": "python -m bench.serve_path " + " ".join(argv or sys.argv[1:]),
        # the service inherits this environment; unset, it takes the embedded default
        "haproxy": os.environ.get(HAPROXY_ENV, RAY_DEFAULTS[HAPROXY_ENV]) == "1"}
    with tempfile.TemporaryDirectory(prefix="tuneserve-serve-path-") as tmp:
        storage = str(Path(tmp) / "storage")
        env = {"TUNESERVE_STORAGE": storage, "TUNESERVE_API_KEYS": f"{API_KEY}:bench",
               "TUNESERVE_BUILTIN_MODELS": "0", "TUNESERVE_TINY_MODEL": "1",
               "TUNESERVE_CPUS_PER_WORKER": "1"}
        service = Service(storage, env=env)
        plain = PlainUvicorn({**os.environ, **env}, free_port(), Path(tmp) / "uvicorn.log")
        try:
            service.start()
            plain.start()
            overhead = measure_overhead(plain.url, service.url, requests=args.requests,
                                        block=args.block, warmup=args.warmup)
            sys.stderr.write(f"overhead: {json.dumps(overhead)}\n")
            plain.stop()  # not needed for the second part
            handoff = measure_handoff(service.url, Path(storage), jobs=args.jobs, examples=args.examples,
                                      batch_size=args.batch_size, poll=args.poll_ms / 1000,
                                      job_timeout=args.job_timeout)
        finally:
            plain.stop()
            service.stop()
    config.update(load_average_end=os.getloadavg()[0],
                  duration_s=round(time.monotonic() - started, 1))
    result = {"config": config, "overhead": overhead, "handoff": handoff}
    write_results(result)
    sys.stdout.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
