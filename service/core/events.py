"""A job's events in storage: one small JSON object per event, listed in key (= time) order.

Key: ``jobs/<job_id>/events/<created_ns:020d>-<seq:06d>.json``. The nanosecond timestamp sorts
events from different writers (the API, a driver, rank 0), the per-writer sequence number keeps
two events of one writer in order even within one clock tick. The event ``id`` is
``ftevent-<created_ns>-<seq>``: the key's stem, so a cursor ``after=<id>`` is a key prefix.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any, Literal

from service.core.names import event_created_ns, event_id_from_key, event_key

__all__ = ["EventLog", "event_created_ns", "event_id_from_key", "event_key"]

log = logging.getLogger(__name__)

Level = Literal["info", "warn", "error"]
EventType = Literal["message", "metrics"]


class EventLog:
    """Appends events of one job. Never raises on a storage failure: losing a progress message
    must not kill a training run, so failures are logged and counted instead."""

    def __init__(self, storage: Any, job_id: str):
        self.storage = storage
        self.job_id = job_id
        self._seq = itertools.count()
        self.failures = 0

    def add(self, message: str, level: Level = "info", type: EventType = "message",  # noqa: A002
            data: dict[str, Any] | None = None) -> dict[str, Any] | None:
        created_ns = time.time_ns()
        key = event_key(self.job_id, created_ns, next(self._seq))
        event = {"object": "fine_tuning.job.event", "id": event_id_from_key(key),
                 "created_at": created_ns // 1_000_000_000, "level": level,
                 "message": message, "type": type, "data": data or {}}
        try:
            self.storage.put(key, json.dumps(event).encode())
        except Exception:  # noqa: BLE001 - see the class docstring
            self.failures += 1
            log.warning("could not write event %r of job %s", message, self.job_id, exc_info=True)
            return None
        return event

    def metrics(self, data: dict[str, Any], total_steps: int) -> dict[str, Any] | None:
        """A ``type="metrics"`` event in OpenAI's wording: ``Step 5/40: training loss=1.23``;
        DPO steps add the reward accuracy and margin (``rewards/…``, ``valid_rewards/…``)."""
        parts = [f"training loss={data['train_loss']:.4f}"]
        if data.get("rewards/accuracies") is not None:
            parts.append(f"reward accuracy={data['rewards/accuracies']:.2f}, "
                         f"reward margin={data['rewards/margins']:.3f}")
        if data.get("reward_mean") is not None:  # reinforcement fine-tuning
            parts.append(f"mean reward={data['reward_mean']:.3f}, "
                         f"zero-signal groups={data['zero_signal_share']:.0%}, "
                         f"KL={data['kl']:.4f}")
        if data.get("hard_prompts") is not None:
            parts.append(f"hard prompts sampled again={data['hard_prompts']} "
                         f"({data['hard_prompts_rescued']} now with a signal)")
        if data.get("valid_score") is not None:
            parts.append(f"held-out score={data['valid_score']:.3f}")
        if data.get("valid_loss") is not None:
            parts.append(f"validation loss={data['valid_loss']:.4f}")
        if data.get("valid_rewards/accuracies") is not None:
            parts.append(f"validation reward accuracy={data['valid_rewards/accuracies']:.2f}, "
                         f"validation reward margin={data['valid_rewards/margins']:.3f}")
        message = f"Step {data['step']}/{total_steps}: " + ", ".join(parts)
        return self.add(message, type="metrics", data={**data, "total_steps": total_steps})
