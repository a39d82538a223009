"""The driver of one eval run: a detached Ray actor, so the API replica never samples or grades
and an API restart does not stop the run."""

from __future__ import annotations

import asyncio

import ray

from service.core.settings import Settings
from service.core.storage import open_storage
from service.evals.store import EvalStore


@ray.remote(num_cpus=0, max_restarts=0)
class EvalDriver:
    def __init__(self, eval_id: str, run_id: str, settings: Settings, app_name: str):
        self.eval_id, self.run_id = eval_id, run_id
        self.settings, self.app_name = settings, app_name

    def run(self) -> str:
        from service.chat.backends import ServeChatBackend
        from service.evals.runner import execute

        store = EvalStore(open_storage(self.settings.storage_config()))
        chat = ServeChatBackend(self.settings, app_name=self.app_name)
        run = asyncio.run(execute(store, chat, self.eval_id, self.run_id,
                                  max_tokens_cap=self.settings.max_tokens_cap,
                                  concurrency=self.settings.chat_max_concurrency))
        return run.status

    def exit(self) -> None:
        ray.actor.exit_actor()
