"""Run an eval: sample the model on every item, grade each answer, store results as they come.

Many items are in flight at once (``concurrency``): the chat engine decodes them together in
one batch, so an eval runs at the engine's batched speed, not one request at a time. Finished
items are written every ``FLUSH_S`` seconds with the run's progress; a run cancelled meanwhile
(its record says ``canceled``) stops at the next flush.

Where it runs: under Ray Serve, in a detached actor per run (``EvalDriver``), like a job's
driver, so the API replica only writes records; without Serve (tests of the app in process),
as a task beside the app on its own chat back end.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections import Counter
from typing import Any

from service.core import names
from service.core.errors import RateLimited, TuneserveError
from service.evals import datasource
from service.evals.jobs import serve_app_name
from service.evals.judge import ChatJudge
from service.evals.store import EvalRecord, EvalStore, RunRecord
from service.files import store as file_store
from serving.protocol import ChatCall
from training import graders
from training.graders import Sample, TemplateError

log = logging.getLogger(__name__)

NAMESPACE = "tuneserve-evals"
CONCURRENCY = 32
"""Items in flight at once by default: the chat engine's own bound on requests in flight
(``TUNESERVE_CHAT_MAX_CONCURRENCY``), twice its batch, so the batch never waits for the runner;
more would only be refused by the engine (429). Callers pass the deployment's setting."""
BUSY_RETRY_S = (0.05, 2.0)
"""Back-off (first, most) when the engine is at capacity (other callers share it)."""
BUSY_GIVE_UP_S = 600.0
FLUSH_S = 2.0
DEFAULT_MAX_TOKENS = 256
"""An answer's cap when the run's sampling_params name none."""


def load_items(storage, run: RunRecord) -> list[dict[str, Any]]:
    source = datasource.CompletionsSource.model_validate(run.data_source)
    if isinstance(source.source, datasource.FileContentSource):
        return [row.item for row in source.source.content]
    with file_store.open_content(storage, run.tenant, source.source.id) as stream:
        return datasource.parse_lines(stream.read(), "data_source.source.id")


async def execute(store: EvalStore, chat, eval_id: str, run_id: str, *, max_tokens_cap: int,
                  concurrency: int = CONCURRENCY) -> RunRecord:
    run = store.get_run(eval_id, run_id)
    try:
        record = store.get(eval_id, run.tenant)
        items = await asyncio.to_thread(load_items, store.storage, run)
        return await _execute(store, chat, record, run, items, max_tokens_cap, concurrency)
    except Exception as exc:  # noqa: BLE001 - the run, not the caller, carries the failure
        log.error("eval run %s failed: %s", run_id, traceback.format_exc())
        message = exc.message if isinstance(exc, TuneserveError) else \
            f"{type(exc).__name__}: {exc}"
        return store.update_run(eval_id, run_id, lambda r: r.model_copy(update={
            "status": "failed", "finished_at": int(time.time()),
            "error": {"code": "eval_run_failed", "message": message[:2000]}}))


async def _execute(store: EvalStore, chat, record: EvalRecord, run: RunRecord,
                   items: list[dict[str, Any]], max_tokens_cap: int,
                   concurrency: int) -> RunRecord:
    criteria = [graders.parse(c, f"testing_criteria.{i}")
                for i, c in enumerate(record.testing_criteria)]
    source = datasource.CompletionsSource.model_validate(run.data_source)
    params = source.sampling_params
    judge = ChatJudge(chat, run.targets, max_tokens_cap)
    target = run.targets[run.model]
    limit = min(params.max_completion_tokens or DEFAULT_MAX_TOKENS, max_tokens_cap)
    store.update_run(record.id, run.id, lambda r: r.model_copy(
        update={"status": "in_progress", "items": len(items)}))
    gate = asyncio.Semaphore(concurrency)
    created = int(time.time())

    async def one(index: int, item: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            return await _item(index, item)

    async def _item(index: int, item: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "object": "eval.run.output_item", "id": names.output_item_id(run.id, index),
            "run_id": run.id, "eval_id": record.id, "created_at": created, "status": "error",
            "datasource_item_id": index, "datasource_item": item, "results": [],
            "sample": {"input": [], "output": [], "finish_reason": None, "model": run.model,
                       "usage": None, "error": None, "temperature": call_temperature,
                       "max_completion_tokens": limit, "top_p": params.top_p or 1.0,
                       "seed": call_seed}}
        try:
            messages = datasource.prompt(source, item)
            out["sample"]["input"] = messages
            answer = await _complete(chat, ChatCall(
                base_model=target.base_model, adapter_id=target.adapter_id, messages=messages,
                max_tokens=limit, temperature=call_temperature, top_p=params.top_p or 1.0,
                seed=call_seed))
            out["sample"].update(
                output=[{"role": "assistant", "content": answer.text}],
                finish_reason=answer.finish_reason,
                usage={"prompt_tokens": answer.prompt_tokens,
                       "completion_tokens": answer.completion_tokens,
                       "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                       "cached_tokens": 0})
            results = [await graders.grade(c, item, Sample(answer.text), judge)
                       for c in criteria]
        except (TuneserveError, TemplateError, graders.GraderInvalid) as exc:
            out["sample"]["error"] = {"code": getattr(exc, "code", None) or "item_failed",
                                      "message": str(getattr(exc, "message", exc))[:1000]}
            return out
        out["results"] = [{"name": r.name, "type": r.type, "score": r.score,
                           "passed": r.passed, "sample": _grader_sample(r)} for r in results]
        out["_usage"] = [r.usage for r in results]
        out["status"] = "error" if any(r.errored for r in results) else \
            "pass" if all(r.passed for r in results) else "fail"
        return out

    # Spec defaults (temperature 1, seed 42): a run is reproducible unless told otherwise.
    call_temperature = 1.0 if params.temperature is None else params.temperature
    call_seed = 42 if params.seed is None else params.seed
    tally = _Tally(run.model, [c.name for c in criteria])
    tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
    pending, done_batch, chunk = set(tasks), [], 0
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=FLUSH_S)
            done_batch.extend(t.result() for t in done)
            if done_batch or not pending:
                chunk = await asyncio.to_thread(_flush, store, record.id, run.id, chunk,
                                                done_batch, tally)
                done_batch = []
            if store.get_run(record.id, run.id).status == "canceled":
                break
    finally:
        for task in pending:
            task.cancel()
    return store.update_run(record.id, run.id, lambda r: r.model_copy(update={
        "status": "completed", "finished_at": int(time.time()), **tally.fields()}))


async def _complete(chat, call: ChatCall):
    """One completion; at capacity (429, others share the engine) wait and send it again."""
    wait, deadline = BUSY_RETRY_S[0], time.monotonic() + BUSY_GIVE_UP_S
    while True:
        try:
            return await chat.complete(call)
        except RateLimited:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(wait)
            wait = min(wait * 2, BUSY_RETRY_S[1])


def _grader_sample(result: graders.Result) -> dict[str, Any] | None:
    if result.judge_output is None and not result.sub_scores and not result.errored:
        return None
    return {"output": result.judge_output, "sub_scores": result.sub_scores or None,
            "errors": {k: v for k, v in result.errors.items() if v}}


class _Tally:
    """The run's counts, per criterion and per model, as items finish."""

    def __init__(self, model: str, criteria: list[str]):
        self.model = model
        self.criteria = criteria
        self.counts: Counter[str] = Counter()
        self.per_criterion = [Counter() for _ in criteria]
        self.usage: dict[str, Counter[str]] = {}
        self.judge: Counter[str] = Counter()
        """Model graders' calls and tokens, apart from the sampled model's (for /metrics)."""

    def add(self, item: dict[str, Any]) -> None:
        self.counts["total"] += 1
        self.counts[{"pass": "passed", "fail": "failed"}.get(item["status"], "errored")] += 1
        for i, result in enumerate(item["results"]):
            self.per_criterion[i]["passed" if result["passed"] else "failed"] += 1
        usage = item["sample"]["usage"]
        if usage:
            self._use(self.model, usage)
        for used in item.pop("_usage", []):
            for model, counts in used.items():
                self._use(model, counts, invocations=counts["invocation_count"])
                self.judge["calls"] += counts["invocation_count"]
                for key in ("prompt_tokens", "completion_tokens"):
                    self.judge[key] += counts.get(key, 0)

    def _use(self, model: str, usage: dict[str, int], invocations: int = 1) -> None:
        seen = self.usage.setdefault(model, Counter())
        seen["invocation_count"] += invocations
        for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
            seen[key] += usage.get(key, 0)

    def fields(self) -> dict[str, Any]:
        return {
            "result_counts": {k: self.counts[k] for k in ("total", "errored", "failed",
                                                          "passed")},
            "per_testing_criteria_results": [
                {"testing_criteria": name, "passed": c["passed"], "failed": c["failed"]}
                for name, c in zip(self.criteria, self.per_criterion, strict=True)],
            "per_model_usage": [{"model_name": m, **{k: u[k] for k in (
                "invocation_count", "prompt_tokens", "completion_tokens", "total_tokens",
                "cached_tokens")}} for m, u in self.usage.items()],
            "judge_usage": dict(self.judge),
        }


def _flush(store: EvalStore, eval_id: str, run_id: str, chunk: int,
           done: list[dict[str, Any]], tally: _Tally) -> int:
    for item in done:
        tally.add(item)
    if done:
        store.write_items(eval_id, run_id, chunk, sorted(done,
                                                         key=lambda i: i["datasource_item_id"]))
    store.update_run(eval_id, run_id, lambda r: r.model_copy(update=tally.fields()))
    return chunk + 1 if done else chunk


# -- off the API replica ---------------------------------------------------------------------


def start(app, eval_id: str, run_id: str) -> None:
    """Run it in a detached actor under Serve; beside the app otherwise (no Serve here)."""
    settings = app.state.settings
    app_name = serve_app_name()
    if app_name is None:
        task = asyncio.get_running_loop().create_task(execute(
            EvalStore(app.state.storage), app.state.chat, eval_id, run_id,
            max_tokens_cap=settings.max_tokens_cap,
            concurrency=settings.chat_max_concurrency))
        app.state.__dict__.setdefault("eval_tasks", set()).add(task)
        task.add_done_callback(app.state.eval_tasks.discard)
        return
    import ray

    from service.evals.driver import EvalDriver

    env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = EvalDriver.options(name=run_id, namespace=NAMESPACE, lifetime="detached",
                                runtime_env={"env_vars": env}).remote(
        eval_id, run_id, settings.model_copy(update={"api_keys": {}}), app_name)
    driver.run.remote()
    driver.exit.remote()  # queued behind run(): the actor leaves when the run is over
