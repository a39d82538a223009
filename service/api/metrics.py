"""``GET /metrics``: Prometheus text for operators.

What is measured where:
- HTTP requests and their latency, and uploaded bytes: ``MetricsMiddleware`` around the app
  (the route template is the label, never the raw path, so ids do not explode the series).
- Chat requests, latency, time to first token and tokens: ``InstrumentedChat`` wraps the chat
  back end the app is given, so ``service.api.routes.chat`` stays as it is.
- Jobs by status, training steps, tokens and tokens/s, resumes and the steps they lost:
  ``JobsCollector`` reads the job records and the newest metrics events from storage at scrape
  time (cached for a few seconds), so every API replica reports the same job figures.

The request and chat figures are per process: under Ray Serve each API replica keeps its own
registry, and a scrape through the Serve proxy reaches one replica. That is exact with one API
replica (the default); with several, scrape each replica or sum what they report.

- Eval runs by status, and the requests and tokens of their model graders (judges):
  ``EvalsCollector``, from the run records (under Serve a run's driver is an actor of its own,
  whose chat calls never pass this process; without Serve a judge's calls also count as chat
  requests above).

- Adapters loaded per chat replica and adapter hot-load time: the chat replicas are processes
  of their own (Ray Serve actors), so counters kept there would never reach this ``/metrics``
  (``ray.util.metrics`` goes to Ray's metrics agent, another scrape target). Instead every chat
  answer carries a small ``ReplicaStats`` (replica, adapters it holds, hot-load seconds if this
  request loaded the adapter), and ``InstrumentedChat`` records it: the histogram
  ``tuneserve_adapter_load_seconds`` and the gauge ``tuneserve_adapters_loaded{replica}`` as
  last reported. A replica that answered nothing for ``REPLICA_TTL_S`` (stopped, replaced, or
  idle) drops out of the gauge rather than reporting a stale count forever.

``/metrics`` needs an API key, like every route but the health probes (``create_app`` includes
it with ``get_tenant``; with no keys configured, embedded on loopback, it needs none): give the
Prometheus scrape job one as its bearer token (``authorization: {credentials: <key>}``). Any
tenant's key reads it: no label holds a tenant, a job id or a model name, so it tells nothing
about anyone's data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.evals.store import FINISHED, EvalStore, RunRecord, RunStatus
from service.jobs.store import JobStore, Status
from service.jobs.progress import latest_metrics
from service.core.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(tags=["metrics"])

STATUSES: tuple[str, ...] = Status.__args__  # type: ignore[attr-defined]
RUN_STATUSES: tuple[str, ...] = RunStatus.__args__  # type: ignore[attr-defined]
SCAN_TTL_S = 5.0
"""Job figures come from storage; scrapes within this many seconds reuse the last read."""

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REPLICA_TTL_S = 900.0
"""A chat replica not heard from for this long leaves ``tuneserve_adapters_loaded``."""


class Metrics:
    """One app's metrics, in a registry of its own (several apps live in one test process)."""

    def __init__(self, storage: Storage):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("tuneserve_http_requests", "HTTP requests answered.",
                                     ["method", "route", "status"], registry=r)
        self.http_latency = Histogram("tuneserve_http_request_duration_seconds",
                                      "Time to answer an HTTP request (to the end of the body).",
                                      ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upload_bytes = Counter("tuneserve_upload_bytes", "Request bytes received by "
                                    "POST /v1/files.", ["outcome"], registry=r)
        self.uploads = Counter("tuneserve_uploads", "Uploads by outcome.", ["outcome"],
                               registry=r)
        self.chat_requests = Counter("tuneserve_chat_requests", "Chat completions by model "
                                     "type and outcome.", ["model_type", "outcome"], registry=r)
        self.chat_latency = Histogram("tuneserve_chat_request_duration_seconds",
                                      "Time from the call to the last token.", ["model_type"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.chat_first_token = Histogram("tuneserve_chat_time_to_first_token_seconds",
                                          "Streaming: time from the call to the first piece.",
                                          ["model_type"], buckets=_LATENCY_BUCKETS, registry=r)
        self.chat_tokens = Counter("tuneserve_chat_tokens", "Tokens of chat completions.",
                                   ["model_type", "kind"], registry=r)
        self.adapter_load = Histogram("tuneserve_adapter_load_seconds", "Adapter hot-loads "
                                      "on chat replicas: fetch, check and load time.",
                                      buckets=_LOAD_BUCKETS, registry=r)
        self.adapters = AdaptersCollector()
        r.register(self.adapters)
        self.jobs = JobsCollector(storage)
        r.register(self.jobs)
        r.register(EvalsCollector(storage))


def init_metrics(app) -> Metrics:
    app.state.metrics = Metrics(app.state.storage)
    if app.state.chat is not None:
        app.state.chat = InstrumentedChat(app.state.chat, app.state.metrics)
    return app.state.metrics


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


# --- jobs, from storage ---------------------------------------------------------------------


class StorageCollector:
    """Figures computed from storage at scrape time, the last read reused for ``SCAN_TTL_S``."""

    what = "records"

    def __init__(self, storage: Storage):
        self.storage = storage
        self._lock = threading.Lock()
        self._cached: tuple[float, list] | None = None

    def describe(self) -> list:
        return []  # no scan at registration time

    def collect(self):
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > SCAN_TTL_S:
                try:
                    self._cached = (time.monotonic(), self._scan())
                except Exception:  # noqa: BLE001 - a storage outage must not break the scrape
                    log.warning("could not read %s for /metrics", self.what, exc_info=True)
                    self._cached = (time.monotonic(), [])
            return iter(self._cached[1])

    def _scan(self) -> list:
        raise NotImplementedError


class JobsCollector(StorageCollector):
    """Jobs by status and training progress."""

    what = "jobs"

    def __init__(self, storage: Storage):
        super().__init__(storage)
        self._final_steps: dict[str, int] = {}
        """Last step of finished jobs: it never changes, so it is read once per process."""

    def _scan(self) -> list:
        by_status = dict.fromkeys(STATUSES, 0)
        steps = tokens = resumes = steps_lost = 0
        tokens_per_second = 0.0
        for job in JobStore(self.storage).list():
            by_status[job.status] = by_status.get(job.status, 0) + 1
            tokens += job.trained_tokens or 0
            resumes += job.resumes
            steps_lost += job.steps_lost
            latest = self._latest(job.id, job.status)
            steps += latest.get("step", 0)
            if job.status == "running":
                tokens_per_second += float(latest.get("tokens_per_second") or 0.0)
        jobs = GaugeMetricFamily("tuneserve_jobs", "Fine-tuning jobs by status.",
                                 labels=["status"])
        for status, count in by_status.items():
            jobs.add_metric([status], count)
        return [
            jobs,
            CounterMetricFamily("tuneserve_training_steps", "Optimizer steps reported by all "
                                "jobs (their latest step each).", value=steps),
            CounterMetricFamily("tuneserve_trained_tokens", "Tokens trained by succeeded jobs.",
                                value=tokens),
            GaugeMetricFamily("tuneserve_training_tokens_per_second", "Training throughput "
                              "of the running jobs (sum of their latest reports).",
                              value=tokens_per_second),
            CounterMetricFamily("tuneserve_training_resumes", "Restarts of training runs "
                                "(lost worker, driver or cluster; preemption), resumed from "
                                "their newest complete checkpoint.", value=resumes),
            CounterMetricFamily("tuneserve_training_steps_lost", "Steps trained again "
                                "because of those restarts.", value=steps_lost),
        ]

    def _latest(self, job_id: str, status: str) -> dict[str, Any]:
        if job_id in self._final_steps:
            return {"step": self._final_steps[job_id]}
        if status in ("validating_files", "queued"):
            return {}
        latest = latest_metrics(self.storage, job_id) or {}
        if status in ("succeeded", "failed", "cancelled"):
            self._final_steps[job_id] = int(latest.get("step", 0))
        return latest


class EvalsCollector(StorageCollector):
    """Eval runs by status and their model graders' calls and tokens, from the run records:
    under Serve a run's driver is an actor of its own that calls the chat deployment directly,
    so a judge's requests never pass this process's ``InstrumentedChat``."""

    what = "eval runs"

    def __init__(self, storage: Storage):
        super().__init__(storage)
        self._finished: dict[str, RunRecord] = {}
        """Finished runs never change: each is read once per process."""

    def _scan(self) -> list:
        by_status = dict.fromkeys(RUN_STATUSES, 0)
        judge: dict[str, int] = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        for key, run in EvalStore(self.storage).all_runs():
            run = self._finished.get(key, run)
            if run.status in FINISHED:
                self._finished[key] = run
            by_status[run.status] += 1
            for name in judge:
                judge[name] += run.judge_usage.get(name, 0)
        runs = GaugeMetricFamily("tuneserve_eval_runs", "Eval runs by status.",
                                 labels=["status"])
        for status, count in by_status.items():
            runs.add_metric([status], count)
        tokens = CounterMetricFamily("tuneserve_eval_judge_tokens", "Tokens of model graders' "
                                     "requests in eval runs.", labels=["kind"])
        tokens.add_metric(["prompt"], judge["prompt_tokens"])
        tokens.add_metric(["completion"], judge["completion_tokens"])
        return [runs, CounterMetricFamily("tuneserve_eval_judge_requests", "Requests of model "
                                          "graders (score_model, label_model) in eval runs.",
                                          value=judge["calls"]), tokens]


# --- chat replicas, as their answers report them ------------------------------------------


class AdaptersCollector:
    """``tuneserve_adapters_loaded{replica}``: what each chat replica last reported."""

    def __init__(self, ttl: float = REPLICA_TTL_S):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._replicas: dict[str, tuple[int, float]] = {}

    def note(self, replica: str, adapters_loaded: int) -> None:
        with self._lock:
            self._replicas[replica] = (adapters_loaded, time.monotonic())

    def describe(self) -> list:
        return []

    def collect(self):
        family = GaugeMetricFamily("tuneserve_adapters_loaded", "Adapters held by each chat "
                                   "replica, as its latest answer reported.", labels=["replica"])
        now = time.monotonic()
        with self._lock:
            for replica, (count, seen) in list(self._replicas.items()):
                if now - seen > self.ttl:
                    del self._replicas[replica]
                else:
                    family.add_metric([replica], count)
        yield family


# --- HTTP -----------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts requests by route template and status, their latency, and upload bytes."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        received = {"bytes": 0}
        is_upload = scope.get("method") == "POST" and scope.get("path") == "/v1/files"

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive if is_upload else receive, tracking_send)
        finally:
            self._record(scope, status["code"], time.perf_counter() - started,
                         received["bytes"] if is_upload else None)

    def _record(self, scope, status: int, seconds: float, upload_bytes: int | None) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # FastAPI 0.165 reports an included router's route without the include prefix.
        if scope.get("path", "").startswith("/v1/") and not route.startswith("/v1"):
            route = "/v1" + route
        method = scope.get("method", "")
        m = self.metrics
        m.http_requests.labels(method, route, str(status)).inc()
        m.http_latency.labels(method, route).observe(seconds)
        if upload_bytes is not None:
            outcome = "accepted" if status < 400 else "rejected"
            m.upload_bytes.labels(outcome).inc(upload_bytes)
            m.uploads.labels(outcome).inc()


# --- chat -----------------------------------------------------------------------------------


class InstrumentedChat:
    """The app's chat back end with counters around it; everything else passes through."""

    def __init__(self, inner, metrics: Metrics):
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def complete(self, call):
        kind = _model_type(call)
        started = time.perf_counter()
        try:
            output = await self._inner.complete(call)
        except BaseException:
            self._metrics.chat_requests.labels(kind, "error").inc()
            raise
        self._replica(output)
        self._done(kind, started, output)
        return output

    async def stream(self, call) -> AsyncIterator:
        kind = _model_type(call)
        started = time.perf_counter()
        outputs = self._inner.stream(call)
        last, outcome = None, "cancelled"
        try:
            async for output in outputs:
                if last is None:
                    self._metrics.chat_first_token.labels(kind).observe(
                        time.perf_counter() - started)
                self._replica(output)
                last = output
                yield output
        except Exception:
            outcome = "error"
            raise
        finally:
            await outputs.aclose()
            # The caller closes the stream right after the piece with the finish reason, so
            # completion is told by that piece, not by how the generator ended.
            if last is not None and last.finish_reason is not None:
                self._done(kind, started, last)
            else:
                self._metrics.chat_requests.labels(kind, outcome).inc()

    def _replica(self, output) -> None:
        stats = getattr(output, "replica", None)
        if stats is None:
            return
        self._metrics.adapters.note(stats.replica, stats.adapters_loaded)
        if stats.adapter_load_seconds is not None:
            self._metrics.adapter_load.observe(stats.adapter_load_seconds)

    def _done(self, kind: str, started: float, output) -> None:
        m = self._metrics
        m.chat_requests.labels(kind, "ok").inc()
        m.chat_latency.labels(kind).observe(time.perf_counter() - started)
        m.chat_tokens.labels(kind, "prompt").inc(output.prompt_tokens)
        m.chat_tokens.labels(kind, "completion").inc(output.completion_tokens)


def _model_type(call) -> str:
    return "base" if call.adapter_id is None else "tuned"
