"""The Self-Instruct loop (Wang et al., 2023, §2): grow a pool of tasks from seed tasks.

Each round sends ``prompts_per_round`` instruction prompts at once (6 seed and 2 generated
instructions each, as the paper), so the chat engine decodes them in one batch; every new
instruction is screened against the pool as it comes (``service.datagen.filters``) and joins it
when it passes, so two near-copies of one round cannot both get in. The instructions kept are
then asked, again all at once, whether they are classification tasks, and then for instances
(output-first for classification, input-first otherwise); instances are filtered, and a graded
quality filter (any grader of ``training.graders``) may drop the last ones. The round ends with
a progress report; the loop stops at ``count`` examples, when ``should_stop`` says so
(cancelled), or after ``STALL_ROUNDS`` rounds in a row that kept nothing.

The chat back end is anything with ``async complete(ChatCall)``: the app's, a Serve handle's
(``ServeChatBackend``), or an in-process engine (the benchmark).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from service.core.errors import RateLimited
from service.datagen import prompts
from service.datagen.filters import FilterSettings, Pool, Tally, instance_ok, screen
from service.datagen.seeds import SeedTask
from serving.protocol import ChatCall

STALL_ROUNDS = 10
"""Rounds in a row that keep nothing before the loop gives up (a generator that only repeats
itself, or answers nothing usable, would otherwise run forever)."""
SEED_IN_PROMPT = 6
GENERATED_IN_PROMPT = 2
"""The paper's 8 in-context instructions: 6 human-written, 2 from earlier rounds."""
DEMOS_IN_PROMPT = 2
"""Seed tasks shown as worked examples in an instance prompt."""
CLASSIFY_TOKENS = 4
BUSY_RETRY_S = (0.05, 2.0)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.5
    """The paper's instruction sampling (temperature 0.7, top_p 0.5)."""
    max_tokens: int = 256
    seed: int = 42
    instance_temperature: float = 0.0
    """The paper generates instances greedily."""
    instance_max_tokens: int = 256


@dataclass(frozen=True)
class LoopSettings:
    count: int
    sampling: Sampling = field(default_factory=Sampling)
    filters: FilterSettings = field(default_factory=FilterSettings)
    prompts_per_round: int = 16
    max_instances_per_task: int = 1
    """Examples one kept instruction gives at most (the paper keeps several instances)."""


@dataclass
class Target:
    base_model: str
    adapter_id: str | None = None


Grade = Callable[[str, dict[str, str]], Awaitable[bool]]
"""The optional quality filter: ``(instruction, instance) -> keep?``."""


@dataclass
class Progress:
    round: int
    examples: int
    count: int
    instructions: int
    candidates: int
    removed: dict[str, int]
    seconds: float

    def data(self) -> dict[str, Any]:
        return {"round": self.round, "examples": self.examples, "count": self.count,
                "instructions": self.instructions, "candidates": self.candidates,
                "removed": self.removed, "seconds": round(self.seconds, 1)}


@dataclass
class Result:
    examples: list[dict]
    instructions: list[dict[str, Any]]
    """Each kept instruction: ``{"instruction", "is_classification", "instances"}``."""
    tally: Tally
    rounds: int
    stopped: str
    """Why the loop ended: ``count``, ``stalled`` or ``cancelled``."""


class SelfInstruct:
    def __init__(self, chat, target: Target, seeds: list[SeedTask], settings: LoopSettings, *,
                 concurrency: int = 32, grade: Grade | None = None):
        self.chat, self.target, self.seeds, self.settings = chat, target, seeds, settings
        self.grade = grade
        self.gate = asyncio.Semaphore(concurrency)
        self.rng = random.Random(settings.sampling.seed)
        self.pool = Pool([s.instruction for s in seeds], settings.filters.rouge_l_threshold)
        self.tally = Tally()
        self.kept: list[dict[str, Any]] = []
        self.examples: list[dict] = []
        self._calls = 0
        self._demos = {flag: [s for s in seeds if s.instances and s.is_classification is flag]
                       or [s for s in seeds if s.instances] for flag in (True, False)}

    async def run(self, report: Callable[[Progress], Awaitable[None]] | None = None,
                  should_stop: Callable[[], Awaitable[bool]] | None = None) -> Result:
        started, rounds, idle, stopped = time.monotonic(), 0, 0, "count"
        while len(self.examples) < self.settings.count:
            if should_stop is not None and await should_stop():
                stopped = "cancelled"
                break
            if idle >= STALL_ROUNDS:
                stopped = "stalled"
                break
            rounds += 1
            before = len(self.examples)
            await self.round()
            idle = 0 if len(self.examples) > before else idle + 1
            if report is not None:
                await report(Progress(rounds, len(self.examples), self.settings.count,
                                      len(self.kept), self.tally.candidates,
                                      self.tally.counts(), time.monotonic() - started))
        return Result(self.examples[:self.settings.count], self.kept, self.tally, rounds,
                      stopped)

    # -- one round -----------------------------------------------------------------------------

    async def round(self) -> None:
        s = self.settings.sampling
        replies = await asyncio.gather(*(
            self._complete(prompts.instruction_prompt(self._in_context()), s.temperature,
                           s.top_p, s.max_tokens)
            for _ in range(self.settings.prompts_per_round)))
        fresh = []
        for reply in replies:
            for text in prompts.parse_instructions(reply):
                self.tally.candidates += 1
                problem = screen(text, self.pool, self.settings.filters)
                if problem is not None:
                    self.tally.reject(problem)
                    continue
                self.pool.add(text)
                fresh.append(text)
        if not fresh:
            return
        flags = await asyncio.gather(*(self._classify(text) for text in fresh))
        answers = await asyncio.gather(*(
            self._complete(prompts.instance_prompt(text, flag, self._demo(flag)),
                           s.instance_temperature, 1.0, s.instance_max_tokens)
            for text, flag in zip(fresh, flags, strict=True)))
        verdicts = await asyncio.gather(*(self._instances(text, flag, answer)
                                          for text, flag, answer in zip(fresh, flags, answers,
                                                                        strict=True)))
        for text, flag, instances in zip(fresh, flags, verdicts, strict=True):
            if isinstance(instances, str):
                self.tally.reject(instances)
                continue
            room = self.settings.count - len(self.examples)
            if room <= 0:
                break
            self.tally.kept += 1
            self.kept.append({"instruction": text, "is_classification": flag,
                              "instances": instances})
            self.examples += [prompts.example(text, i) for i in instances[:room]]

    async def _instances(self, text: str, flag: bool, answer: str) -> list[dict] | str:
        """The instruction's usable instances, or the filter that removed it."""
        instances, seen = [], set()
        for instance in prompts.parse_instances(answer, flag):
            key = (instance["input"], instance["output"])
            if key not in seen and instance_ok(instance, self.settings.filters):
                seen.add(key)
                instances.append(instance)
        instances = instances[:self.settings.max_instances_per_task]
        if not instances:
            return "no_instances"
        if self.grade is not None:
            passed = await asyncio.gather(*(self.grade(text, i) for i in instances))
            instances = [i for i, ok in zip(instances, passed, strict=True) if ok]
            if not instances:
                return "quality"
        return instances

    def _in_context(self) -> list[str]:
        """6 seed and 2 generated instructions (more seeds while few were generated)."""
        generated = [k["instruction"] for k in self.kept]
        machine = self.rng.sample(generated, min(GENERATED_IN_PROMPT, len(generated)))
        human_n = min(SEED_IN_PROMPT + GENERATED_IN_PROMPT - len(machine), len(self.seeds))
        human = [t.instruction for t in self.rng.sample(self.seeds, human_n)]
        chosen = human + machine
        self.rng.shuffle(chosen)
        return chosen

    def _demo(self, classification: bool) -> list[SeedTask]:
        demos = self._demos[classification]
        return self.rng.sample(demos, min(DEMOS_IN_PROMPT, len(demos)))

    async def _classify(self, text: str) -> bool:
        reply = await self._complete(prompts.classification_prompt(text), 0.0, 1.0,
                                     CLASSIFY_TOKENS)
        return prompts.parse_classification(reply)

    async def _complete(self, messages: list[dict[str, str]], temperature: float, top_p: float,
                        max_tokens: int) -> str:
        """One chat request; many are in flight at once (the engine batches them). At
        capacity (429: others share the engine) it waits and sends it again."""
        self._calls += 1
        call = ChatCall(base_model=self.target.base_model, adapter_id=self.target.adapter_id,
                        messages=messages, max_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, seed=self.settings.sampling.seed + self._calls)
        wait = BUSY_RETRY_S[0]
        async with self.gate:
            while True:
                try:
                    return (await self.chat.complete(call)).text
                except RateLimited:
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, BUSY_RETRY_S[1])
