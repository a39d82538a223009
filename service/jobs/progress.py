"""How far a job's training has got, read from its events in storage.

The dashboard and ``/metrics`` need a job's latest metrics without reading every event of a
long run: event keys sort by time, so the newest metrics event is found by listing the keys
(cheap) and reading from the end until one of ``type == "metrics"`` turns up.
"""

from __future__ import annotations

import json
import time
from typing import Any

from service.core.names import events_prefix
from service.core.storage import Storage

LOOK_BACK = 20
"""Events read from the end at most; a run writes a metrics event every step, so the newest one
is among the last few unless the run has ended with a burst of messages."""


def latest_metrics(storage: Storage, job_id: str) -> dict[str, Any] | None:
    """The ``data`` of the job's newest metrics event (``step``, ``total_steps``, ``train_loss``,
    …), or None before the first step."""
    prefix = events_prefix(job_id)
    keys = [info.key for info in storage.iter(prefix)]
    for key in reversed(keys[-LOOK_BACK:]):
        event = json.loads(storage.get(key))
        if event.get("type") == "metrics":
            return event.get("data") or {}
    return None


def metric_series(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), …]}`` for every numeric metric of the metrics events, one point
    per step (a step reported twice, e.g. after a resume, keeps its latest value)."""
    by_step: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.get("data") or {}
        if event.get("type") == "metrics" and isinstance(data.get("step"), int):
            by_step[data["step"]] = data
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                series.setdefault(name, []).append((step, float(value)))
    return series


ESTIMATE_LOOK_BACK = 8
"""Events read from the end to time the latest steps: a few steps, not the whole run (a
restart's pause would otherwise count as training time)."""


def estimated_finish(storage: Storage, job_id: str,
                     estimate: dict[str, Any] | None = None) -> int | None:
    """When the run should end (Unix seconds), from the time its latest steps took and the
    steps left; until two steps have been measured, from the job's ``estimate`` (its seconds
    from now: no step is done yet), else None."""
    measured = _measured_finish(storage, job_id)
    if measured is None and estimate and estimate.get("seconds") is not None:
        return int(time.time() + float(estimate["seconds"]))
    return measured


def _measured_finish(storage: Storage, job_id: str) -> int | None:
    from service.core.names import event_created_ns

    keys = [info.key for info in storage.iter(events_prefix(job_id))]
    measured: list[tuple[int, int, int]] = []  # (created_ns, step, total_steps), newest first
    for key in reversed(keys[-ESTIMATE_LOOK_BACK:]):
        event = json.loads(storage.get(key))
        data = event.get("data") or {}
        if event.get("type") == "metrics" and isinstance(data.get("step"), int) \
                and isinstance(data.get("total_steps"), int):
            measured.append((event_created_ns(key), data["step"], data["total_steps"]))
    if len(measured) < 2:
        return None
    newest_ns, step, total = measured[0]
    older = [(ns, s) for ns, s, _ in measured[1:] if s < step]
    if not older:
        return None
    oldest_ns, oldest_step = older[-1]
    per_step_ns = (newest_ns - oldest_ns) / (step - oldest_step)
    return int((newest_ns + per_step_ns * max(total - step, 0)) / 1e9)
