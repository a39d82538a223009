"""The driver of one data-generation job: a detached Ray actor, so the API replica never
generates and an API restart does not stop the job."""

from __future__ import annotations

import asyncio

import ray

from service.core.settings import Settings
from service.core.storage import open_storage
from service.datagen.store import DatagenStore


@ray.remote(num_cpus=0, max_restarts=0)
class DatagenDriver:
    def __init__(self, job_id: str, settings: Settings, app_name: str):
        self.job_id, self.settings, self.app_name = job_id, settings, app_name

    def run(self) -> str:
        from service.chat.backends import ServeChatBackend
        from service.datagen.runner import execute

        store = DatagenStore(open_storage(self.settings.storage_config()))
        chat = ServeChatBackend(self.settings, app_name=self.app_name)
        return asyncio.run(execute(store, chat, self.job_id, settings=self.settings)).status

    def exit(self) -> None:
        ray.actor.exit_actor()
