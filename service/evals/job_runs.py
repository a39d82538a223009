"""The before and after runs of a job's eval (``service.evals.jobs``), from inside the job's
driver: the same eval on the model the job starts from (cached per eval, model and data source)
and on the tuned model; events for both and a result file with the items that changed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

from service.core import names
from service.core.errors import NotFound
from service.evals import runner
from service.evals.store import EvalStore, RunRecord, Target

log = logging.getLogger(__name__)


def _target(model: str) -> Target:
    tuned = names.parse_tuned_model(model)
    return Target(base_model=tuned.base_model, adapter_id=tuned.adapter_id) if tuned \
        else Target(base_model=model)


class JobEvalRuns:
    """The before and after runs of one job (from inside its driver)."""

    def __init__(self, storage, job, events):
        self.store = EvalStore(storage)
        self.job, self.events = job, events
        self.spec: dict[str, Any] = job.extensions["eval"]

    @classmethod
    def of(cls, storage, job, events) -> JobEvalRuns | None:
        return cls(storage, job, events) if job.extensions.get("eval") else None

    def _baseline_key(self) -> str:
        digest = hashlib.sha256(json.dumps([self.job.model, self.spec["data_source"]],
                                           sort_keys=True).encode()).hexdigest()
        return names.eval_baseline_key(self.spec["id"], digest)

    def before(self) -> None:
        key = self._baseline_key()
        cached = self._cached(key)
        if cached is not None:
            self._report("before", cached, cached=True)
            return
        run = self._run(self.job.model, "before")
        if run is not None and run.status == "completed":
            self.store.storage.put(key, json.dumps({"run_id": run.id}).encode())
        if run is not None:
            self._report("before", run, cached=False)

    def after(self, model: str, jobs) -> None:
        """Run the eval on the tuned ``model``; both runs and the items whose outcome changed
        go into a result file ``<job id>-eval.json`` added to the job's ``result_files``."""
        from service.files.store import create_result_file

        after = self._run(model, "after")
        before = self._before_run()
        if after is None:
            return
        if before is None:
            self._report("after", after, cached=False)
            return
        try:
            report = {"eval_id": after.eval_id, "before": _summary(before),
                      "after": _summary(after), "changed": self.changed(before, after)}
            file_id = create_result_file(self.store.storage, self.job.organization_id,
                                         f"{self.job.id}-eval.json",
                                         json.dumps(report, indent=1).encode())
            jobs.update(self.job.id, lambda job: job.model_copy(
                update={"result_files": [*job.result_files, file_id]}))
        except Exception as exc:
            log.warning("job %s: eval report failed", self.job.id, exc_info=True)
            self.events.add(f"The eval report file could not be written: {exc}"[:500],
                            level="warn")
        self._report("after", after, cached=False)  # last: the result file is there by now

    def _before_run(self) -> RunRecord | None:
        return self._cached(self._baseline_key())

    def changed(self, before: RunRecord, after: RunRecord) -> list[dict[str, Any]]:
        """Items whose outcome differs between the runs (same data source, same order)."""
        was = {i["datasource_item_id"]: i for i in self.store.items(before.eval_id, before.id)}
        rows = []
        for item in self.store.items(after.eval_id, after.id):
            old = was.get(item["datasource_item_id"])
            if old is not None and old["status"] != item["status"]:
                rows.append({"datasource_item_id": item["datasource_item_id"],
                             "datasource_item": item["datasource_item"],
                             "before": old["status"], "after": item["status"],
                             "before_output": _text(old), "after_output": _text(item)})
        return rows

    def _cached(self, key: str) -> RunRecord | None:
        try:
            run_id = json.loads(self.store.storage.get(key))["run_id"]
            run = self.store.get_run(self.spec["id"], run_id, self.job.organization_id)
        except NotFound:
            return None
        return run if run.status == "completed" else None

    def _run(self, model: str, phase: str) -> RunRecord | None:
        from service.chat.backends import ServeChatBackend
        from service.core.settings import Settings

        eval_id = self.spec["id"]
        try:
            record = self.store.get(eval_id, self.job.organization_id)
            targets = {model: _target(model)}
            for criterion in record.testing_criteria:
                from training.graders.grade import judge_models, parse

                targets.update({m: _target(m) for m in judge_models(parse(criterion))})
            run = self.store.create_run(RunRecord(
                id=names.new_eval_run_id(), eval_id=eval_id, name=f"{self.job.id} {phase}",
                model=model, created_at=int(time.time()),
                data_source={**self.spec["data_source"], "model": model},
                metadata={"job": self.job.id, "phase": phase},
                tenant=self.job.organization_id, targets=targets))
            # The driver knows no settings; the back end reads none to call a deployment.
            chat = ServeChatBackend(Settings.model_construct(), app_name=self.spec["app"])
            run = asyncio.run(runner.execute(self.store, chat, eval_id, run.id,
                                             max_tokens_cap=runner.DEFAULT_MAX_TOKENS))
        except Exception as exc:
            log.warning("job %s: eval %s %s failed", self.job.id, eval_id, phase, exc_info=True)
            self.events.add(f"Eval {phase} training could not run: {exc}"[:500],
                            level="warn")
            return None
        return run

    def _report(self, phase: str, run: RunRecord, *, cached: bool) -> None:
        counts = run.result_counts
        rate = counts["passed"] / counts["total"] if counts["total"] else 0.0
        where = f" (cached: run {run.id})" if cached else f" (run {run.id})"
        self.events.add(f"Eval {phase} training on {run.model}: {rate:.1%} passed, "
                        f"{counts['passed']} of {counts['total']}{where}",
                        level="info" if run.status == "completed" else "warn",
                        data={"eval": {"phase": phase, "eval_id": run.eval_id,
                                       "run_id": run.id, "model": run.model,
                                       "status": run.status, "pass_rate": round(rate, 4),
                                       "result_counts": counts, "cached": cached,
                                       "per_testing_criteria_results":
                                           run.per_testing_criteria_results}})


def _text(item: dict[str, Any]) -> str | None:
    output = item["sample"]["output"]
    return output[0]["content"] if output else None


def _summary(run: RunRecord) -> dict[str, Any]:
    return {"run_id": run.id, "model": run.model, "status": run.status,
            "result_counts": run.result_counts,
            "per_testing_criteria_results": run.per_testing_criteria_results}

