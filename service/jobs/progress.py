"""How far a job's training has got, read from its events in storage.

The dashboard and ``/metrics`` need a job's latest metrics without reading every event of a
long run: event keys sort by time, so the newest metrics event is found by listing the keys
(cheap) and reading from the end until one of ``type == "metrics"`` turns up.
"""

from __future__ import annotations

import json
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
