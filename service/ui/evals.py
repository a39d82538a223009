"""The job page's eval section: a job's eval before and after training, side by side, and the
items whose outcome changed (from the two runs' stored items)."""

from __future__ import annotations

from typing import Any

from service.core.errors import NotFound
from service.evals.store import EvalStore

MAX_CHANGED = 50
"""Changed items shown on the page (the job's ``<job>-eval.json`` result file holds all)."""


def eval_view(storage, events: list[dict[str, Any]], tenant: str) -> dict[str, Any] | None:
    """None when the job has no eval; else both phases (either may still be missing)."""
    phases = {e["data"]["eval"]["phase"]: e["data"]["eval"] for e in events
              if "eval" in (e.get("data") or {})}
    if not phases:
        return None
    before, after = phases.get("before"), phases.get("after")
    criteria = []
    for phase in (before, after):
        for row in (phase or {}).get("per_testing_criteria_results") or []:
            if row["testing_criteria"] not in criteria:
                criteria.append(row["testing_criteria"])
    return {"before": before, "after": after, "criteria": [
        {"name": name, "before": _rate(before, name), "after": _rate(after, name)}
        for name in criteria], "changed": _changed(storage, before, after, tenant)}


def _rate(phase: dict[str, Any] | None, criterion: str) -> str:
    for row in (phase or {}).get("per_testing_criteria_results") or []:
        if row["testing_criteria"] == criterion:
            total = row["passed"] + row["failed"]
            return f"{row['passed'] / total:.1%}" if total else "–"
    return "–"


def _changed(storage, before, after, tenant: str) -> list[dict[str, Any]]:
    if not before or not after:
        return []
    store = EvalStore(storage)
    try:
        for phase in (before, after):
            store.get_run(phase["eval_id"], phase["run_id"], tenant)
        was = {i["datasource_item_id"]: i for i in store.items(before["eval_id"],
                                                                before["run_id"])}
        rows = []
        for item in store.items(after["eval_id"], after["run_id"]):
            old = was.get(item["datasource_item_id"])
            if old is not None and old["status"] != item["status"]:
                rows.append({"id": item["datasource_item_id"], "item": item["datasource_item"],
                             "before": old["status"], "after": item["status"],
                             "before_output": _text(old), "after_output": _text(item)})
                if len(rows) >= MAX_CHANGED:
                    break
        return rows
    except NotFound:  # the eval or a run was deleted since
        return []


def _text(item: dict[str, Any]) -> str:
    output = item["sample"]["output"]
    return (output[0].get("content") or "") if output else ""
