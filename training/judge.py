"""Model graders' judges for reinforcement rewards: the served model, through the chat
deployment.

Training imports nothing of the service beyond ``service.core``, so a worker cannot build a chat
client itself, and a recipe imports no Ray: the Ray Train worker (``training.worker``) puts an
``ActorJudge`` in the recipe's context. The job's driver (service side, ``service.jobs.rft_judge``)
starts one Ray actor per job that holds the service's chat client
(``service.evals.judge.ChatJudge`` over the Serve deployment, the same path an eval's judge takes:
batched by the chat engine; each step reports the judge's requests and tokens), named
``judge_actor_name(job_id)``; workers find it by that name and send it each judge request.

Graders without a model judge need none of this.
"""

from __future__ import annotations

from typing import Any

import ray

from training.graders import JudgeAnswer, SamplingParams


def judge_actor_name(job_id: str) -> str:
    return f"tuneserve-rft-judge-{job_id}"


class ActorJudge:
    """A ``training.graders.Judge`` that asks the job's judge actor."""

    def __init__(self, name: str):
        self.name = name
        self._actor: Any = None

    async def __call__(self, model: str, messages: list[dict[str, str]],
                       params: SamplingParams,
                       response_format: dict[str, Any] | None = None) -> JudgeAnswer:
        if self._actor is None:
            self._actor = ray.get_actor(self.name)
        text, prompt_tokens, completion_tokens = await self._actor.judge.remote(
            model, messages, params.model_dump(mode="json", exclude_none=True), response_format)
        return JudgeAnswer(text, prompt_tokens, completion_tokens)
