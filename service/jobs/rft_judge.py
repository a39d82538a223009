"""The judge actor of a reinforcement job whose grader calls a model (``score_model``,
``label_model``): the training workers' way to the chat deployment (``training.judge``).

The driver starts it before the run and ends it after; it holds a ``ChatJudge`` over the Serve
deployment of the app that created the job, with the judge models resolved for the job's
tenant when the job was created (``extensions.rft_judges``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import ray

from service.jobs.store import JobRecord
from training.judge import judge_actor_name

log = logging.getLogger(__name__)

JUDGE_CONCURRENCY = 64
"""Judge requests one actor has in flight (the chat engine batches them)."""


@ray.remote(num_cpus=0, max_concurrency=JUDGE_CONCURRENCY)
class JudgeActor:
    def __init__(self, targets: dict[str, dict[str, Any]], app_name: str | None):
        from service.chat.backends import ServeChatBackend
        from service.core.settings import Settings
        from service.evals import runner
        from service.evals.judge import ChatJudge
        from service.evals.store import Target

        chat = ServeChatBackend(Settings.model_construct(), app_name=app_name)
        self.chat_judge = ChatJudge(chat, {m: Target(**t) for m, t in targets.items()},
                               runner.DEFAULT_MAX_TOKENS)

    async def judge(self, model: str, messages: list[dict[str, str]],
                    params: dict[str, Any],
                    response_format: dict[str, Any] | None = None) -> tuple[str, int, int]:
        from training.graders import SamplingParams

        answer = await self.chat_judge(model, messages, SamplingParams(**params),
                                       response_format=response_format)
        return answer.text, answer.prompt_tokens, answer.completion_tokens


@contextmanager
def judge_for_job(record: JobRecord):
    """Run the job's judge actor while the block runs (nothing for other jobs)."""
    targets = record.extensions.get("rft_judges")
    if not targets:
        yield
        return
    actor = JudgeActor.options(name=judge_actor_name(record.id)).remote(
        targets, record.extensions.get("serve_app"))
    try:
        yield
    finally:
        ray.kill(actor)



