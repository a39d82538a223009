"""The judge of model graders: the served model, called through our own chat back end.

Given the app's back end (``InstrumentedChat`` in the API), a judge's requests are chat
requests like any other: batched by the chat engine and counted in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.errors import NotFound
from service.evals.store import Target
from serving.protocol import ChatCall
from training.graders import JudgeAnswer, SamplingParams


class ChatJudge:
    def __init__(self, chat, targets: Mapping[str, Target], max_tokens_cap: int):
        self.chat = chat
        self.targets = targets
        """Every judge model the grader names, resolved for the caller beforehand."""
        self.max_tokens_cap = max_tokens_cap

    async def __call__(self, model: str, messages: list[dict[str, str]],
                       params: SamplingParams,
                       response_format: dict[str, Any] | None = None) -> JudgeAnswer:
        target = self.targets.get(model)
        if target is None:  # resolved before grading; this is a bug, not the caller's mistake
            raise NotFound(f"The judge model {model!r} was not resolved.", param="model")
        call = ChatCall(base_model=target.base_model, adapter_id=target.adapter_id,
                        messages=messages,
                        max_tokens=min(params.token_cap() or self.max_tokens_cap,
                                       self.max_tokens_cap),
                        temperature=params.temperature if params.temperature is not None
                        else 0.0, top_p=params.top_p or 1.0, seed=params.seed,
                        response_format=response_format)
        output = await self.chat.complete(call)
        return JudgeAnswer(output.text, output.prompt_tokens, output.completion_tokens)
