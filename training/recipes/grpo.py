"""Reinforcement fine-tuning as GRPO: OpenAI's ``method: reinforcement``, rewards from a grader.

The shared machinery (data plan, optimizer, all-reduce, checkpoints, export) is the base
recipe's (``training.recipes.base.Recipe``). What is GRPO's own, per step:

1. rollouts: ``group_size`` completions of each of this rank's prompts, sampled from the policy
   as it is now by ``training.model.sampler`` (the trainer's own model under no_grad: no second
   copy, nothing reloaded), each step with a generator seeded by (seed, step, rank), so a run
   resumed from a checkpoint samples exactly what the lost run would have;
2. grading: every completion scored by the job's grader (``training.graders``, all at once;
   model judges through the chat deployment, ``training.judge``);
3. the loss (``training.losses.grpo``): advantages normalised within each group, the clipped
   policy-gradient loss on the completion tokens only, and β × KL to the reference: the policy
   with its adapter disabled, or the frozen adapter of the ``ft:`` model it started from (as
   DPO's). Groups whose rewards are all equal carry no signal and are not trained on. A
   group's completions are packed in one row after their shared prompt, computed once
   (``packing.collate_groups``).

With ``hard_prompt_samples``, a group that scored alike and below the step's mean reward (a
prompt the policy rarely gets right) gets that many more completions before the loss
(``hard_groups``); if they now differ, it trains on all of them. Without it, a prompt whose
group is all wrong never teaches (``bench/quality/rft_reach.py`` counts such prompts).

Metrics per step: reward (mean, spread within groups), share of zero-signal groups, KL, clip
fraction, completion length, the rollout/grade/train split of the step, the hard prompts
sampled again and how many of them then taught (``hard_prompts``, ``hard_prompts_rescued``),
and for a model judge its requests and tokens (``judge_requests``, ``judge_tokens``); every
``eval_interval`` steps the grader's mean over greedy answers to ``eval_samples`` validation
prompts (``valid_score``), and over all of them at the end (``full_valid_score``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from datasets import Dataset, load_from_disk

from service.core.errors import InvalidRequest
from training import graders
from training.data import examples as data
from training.data import packing
from training.graders.grade import judge_models
from training.losses import grpo
from training.model import chat, sampler
from training.model.chat import IGNORE_INDEX
from training.recipes import reference
from training.recipes.base import Recipe

SUM_FIELDS = ("loss", "reward", "group_std", "zero_signal", "groups", "completions",
              "completion_tokens", "finished", "kl", "clipped", "tokens", "supervised",
              "rollout_seconds", "grade_seconds", "train_seconds", "judge_requests",
              "judge_tokens", "hard", "hard_rescued")
"""What a step sums over this rank's groups (then all-reduced over ranks)."""
EVAL_FIELDS = ("score", "count")
ROLLOUT_ROWS = 128
"""Completions decoded in one batch at most (prompts × group size)."""


@dataclass(frozen=True)
class Prompt:
    index: int
    ids: list[int]
    """The conversation rendered with the generation prompt: what the policy continues."""
    item: dict[str, Any]
    """The file's line: what ``{{item.…}}`` reads."""


def token_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                softcap: float | None, temperature: float) -> torch.Tensor:
    """(N,) log p(label) at the N supervised positions of a packed row, in row order (the
    logits of prompt tokens are never computed)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep]).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    return -torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")


def hard_groups(rewards: list[torch.Tensor], mean: float) -> list[int]:
    """The groups to sample again: every reward equal (no signal) and below the step's mean
    (most prompts of the step do better). A group all right, or all as good as the step, is
    left alone: there is little to gain where the policy already does well."""
    return [i for i, r in enumerate(rewards) if bool(grpo.zero_signal(r, len(r))) and
            float(r[0]) < mean]


class GRPORecipe(Recipe[Prompt]):
    """One worker's share of a reinforcement run (see the module docstring)."""

    noun = "prompts"
    SUMS: ClassVar[tuple[str, ...]] = SUM_FIELDS
    # Validation is OpenAI's ``eval_interval`` × ``eval_samples`` (``step_metrics``): one curve
    # of one size, and no greedy answers to grade at every checkpoint besides.
    validates_at_checkpoints = False

    # -- data ----------------------------------------------------------------------------------

    def split_fingerprint(self, file_ids: list[str]) -> str:
        return data.fingerprint(file_ids, self.fingerprint["template_hash"],
                                self.spec.max_length) + "-prompts"

    def build_split(self, file_ids: list[str]) -> tuple[Any, data.SplitStats]:
        stats = data.SplitStats(fingerprint=self.split_fingerprint(file_ids), file_hashes={})
        columns: dict[str, list] = {"input_ids": [], "item": [], "source": []}
        room = self.spec.max_length - self.spec.max_completion_tokens
        for source, file_id in enumerate(file_ids):
            examples, digest = data.read_examples(self.storage, file_id, stats)
            stats.file_hashes[file_id] = digest
            for line, example in examples:
                stats.n_lines += 1
                if "item" not in example:
                    raise InvalidRequest(f"{file_id} line {line} is not a reinforcement prompt "
                                         "(messages ending with the user's turn)",
                                         param="training_file", code="invalid_training_file")
                ids = chat.render_prompt(self.tokenizer, example["messages"],
                                         example.get("tools"))
                if len(ids) > room:
                    stats.n_truncated += 1
                    stats.note(file_id, line, f"{len(ids)} prompt tokens leave no room for "
                                              f"{self.spec.max_completion_tokens} completion tokens")
                    continue
                stats.n_examples += 1
                stats.n_tokens += len(ids)
                columns["input_ids"].append(ids)
                columns["item"].append(json.dumps(example["item"]))
                columns["source"].append(source)
        if stats.n_examples == 0:
            raise InvalidRequest(f"no usable prompt in {', '.join(file_ids)}: "
                                 + ("; ".join(stats.problems[:5]) or "the files hold none"),
                                 param="training_file", code="invalid_training_file")
        return Dataset.from_dict(columns), stats

    def load_split(self, prefix: str, folder: Path) -> tuple[list[Prompt], list[int]]:
        self.storage.download_prefix(prefix, str(folder))
        columns = load_from_disk(str(folder)).to_dict()
        prompts = [Prompt(i, ids, json.loads(item)) for i, (ids, item)
                   in enumerate(zip(columns["input_ids"], columns["item"], strict=True))]
        return prompts, columns["source"]

    def example_tokens(self, example: Prompt) -> int:
        return len(example.ids) + self.spec.max_completion_tokens

    def batches(self, examples: list[Prompt]) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError("GRPO builds its batches from each step's rollouts")

    # -- the model, the reference, the grader ----------------------------------------------------

    def setup_model(self, model_dir: Path) -> None:
        super().setup_model(model_dir)
        spec = self.spec
        self.grader = graders.parse(spec.grader, "grader")
        self.judge = self.context.judge if judge_models(self.grader) else None
        if judge_models(self.grader) and self.judge is None:
            raise InvalidRequest("a model grader's judge is reached through the service's chat "
                                 "deployment, and none is reachable from this run",
                                 param="grader.model")
        self.eot_ids = chat.end_of_turn_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        if spec.reference_adapter and spec.reference_adapter == spec.init_adapter:
            self.reference_dir = self.init_dir
        else:
            self.reference_dir = self.fetch_adapter(spec.reference_adapter, "reference-adapter")

    def reference_active(self):
        """The policy computing the reference (adapter disabled, or the frozen start adapter)."""
        return reference.reference_mode(self.model, self.reference_dir)

    # -- rollouts and rewards --------------------------------------------------------------------

    def rollouts(self, prompts: list[Prompt], n: int, *, greedy: bool = False,
                 seed: int | None = None) -> list[list[sampler.Completion]]:
        """``n`` completions per prompt from the policy as it is now (eval mode, no grad)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        per_batch = max(1, ROLLOUT_ROWS // n)
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[list[sampler.Completion]] = []
            for i in range(0, len(prompts), per_batch):
                out += sampler.sample(
                    self.decoder, self.lm_head, [p.ids for p in prompts[i:i + per_batch]], n,
                    max_new_tokens=self.spec.max_completion_tokens, eot_ids=self.eot_ids,
                    pad_id=self.pad_id, temperature=self.spec.temperature, greedy=greedy,
                    generator=generator, bf16=self.use_bf16, softcap=self.softcap)
            return out
        finally:
            self.model.train(was_training)

    def answer_text(self, completion: sampler.Completion) -> str:
        tokens = [t for t in completion.tokens if t not in self.eot_ids]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def rewards(self, prompts: list[Prompt], groups: list[list[sampler.Completion]],
                sums: dict[str, float] | None = None) -> torch.Tensor:
        """The grader's score of every completion, (prompts × n,), in one batch; a model
        judge's requests and tokens are added to ``sums``."""
        async def one(item: dict[str, Any], text: str) -> float:
            try:
                result = await graders.grade(self.grader, item, graders.Sample(text), self.judge)
            except (graders.TemplateError, graders.GraderInvalid):
                return 0.0
            if sums is not None:
                for used in result.usage.values():
                    sums["judge_requests"] += used["invocation_count"]
                    sums["judge_tokens"] += used["total_tokens"]
            return float(result.score)

        async def every() -> list[float]:
            return await asyncio.gather(*(one(p.item, self.answer_text(c))
                                          for p, group in zip(prompts, groups, strict=True)
                                          for c in group))
        return torch.tensor(asyncio.run(every()), dtype=torch.float32)

    def step_seed(self, step: int, draw: str = "") -> int:
        digest = hashlib.sha256(f"{self.spec.seed}/{step}/{self.rank}{draw}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    # -- the step --------------------------------------------------------------------------------

    def forward_backward(self, prompts: list[Prompt]) -> torch.Tensor:
        n = self.spec.group_size
        sums = dict.fromkeys(SUM_FIELDS, 0.0)
        started = time.perf_counter()
        groups = self.rollouts(prompts, n, seed=self.step_seed(self.state.step)) if prompts else []
        sums["rollout_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        rewards = self.rewards(prompts, groups, sums) if prompts else torch.zeros(0)
        sums["grade_seconds"] = time.perf_counter() - started
        per_group: list[torch.Tensor] = []
        if prompts:
            # What the policy does: the step's own groups of n, before any hard prompt's extras.
            flat = rewards.view(-1, n)
            per_group = list(flat)
            sums.update(reward=float(rewards.sum()), group_std=float(flat.std(dim=1).sum()),
                        zero_signal=float(grpo.zero_signal(rewards, n).sum()),
                        groups=len(prompts), completions=len(rewards))
            for group in groups:
                sums["completion_tokens"] += sum(len(c.tokens) for c in group)
                sums["finished"] += sum(c.finished for c in group)
            if self.spec.hard_prompt_samples:
                self.sample_hard_prompts(prompts, groups, per_group, float(rewards.mean()), sums)
        started = time.perf_counter()
        trained: list[tuple[Prompt, list[sampler.Completion], torch.Tensor]] = [
            (p, group, grpo.group_advantages(r, len(r), scale=self.spec.scale_rewards))
            for p, group, r in zip(prompts, groups, per_group, strict=True)
            if not bool(grpo.zero_signal(r, len(r)))]
        local = torch.tensor([float(sum(len(c.tokens) for _, g, _ in trained for c in g))])
        global_tokens = max(int(self.all_reduce(local).item()), 1)
        for batch_groups in self.micro_groups(trained):
            self.train_groups(batch_groups, global_tokens, sums)
        sums["train_seconds"] = time.perf_counter() - started
        return torch.tensor([sums[k] for k in SUM_FIELDS], dtype=torch.float64)

    def sample_hard_prompts(self, prompts: list[Prompt], groups: list[list[sampler.Completion]],
                            per_group: list[torch.Tensor], mean: float,
                            sums: dict[str, float]) -> None:
        """``hard_prompt_samples`` more completions for each of the ``hard_groups``, added to
        its group and its rewards in place (seeded by the step, as the first draw is)."""
        hard = hard_groups(per_group, mean)
        if not hard:
            return
        chosen = [prompts[i] for i in hard]
        started = time.perf_counter()
        extra = self.rollouts(chosen, self.spec.hard_prompt_samples,
                              seed=self.step_seed(self.state.step, "/hard"))
        sums["rollout_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        more = self.rewards(chosen, extra, sums).view(len(hard), -1)
        sums["grade_seconds"] += time.perf_counter() - started
        for i, group, r in zip(hard, extra, more, strict=True):
            groups[i] = groups[i] + group
            per_group[i] = torch.cat([per_group[i], r])
            sums["hard_rescued"] += not bool(grpo.zero_signal(per_group[i], len(per_group[i])))
        sums["hard"] += len(hard)

    def micro_groups(self, trained: list) -> list[list]:
        """Groups packed into rows of at most ``pack_length`` tokens (prompt counted once)."""
        rows: list[list] = []
        size = self.spec.pack_length + 1
        for entry in trained:
            tokens = len(entry[0].ids) + sum(len(c.tokens) for c in entry[1])
            if size + tokens > self.spec.pack_length:
                rows.append([])
                size = 0
            rows[-1].append(entry)
            size += tokens
        return rows

    def train_groups(self, entries: list, global_tokens: int, sums: dict[str, float]) -> None:
        """Forward/backward of one packed row of groups; adds to ``sums``."""
        examples = [[(p.ids + c.tokens, [IGNORE_INDEX] * len(p.ids) + c.tokens) for c in group]
                    for p, group, _ in entries]
        batch, _ = packing.collate_groups(examples, self.share_prefix)
        old = torch.tensor([lp for _, group, _ in entries for c in group for lp in c.logps])
        adv = torch.cat([torch.repeat_interleave(a, torch.tensor([len(c.tokens) for c in group]))
                         for _, group, a in entries])
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(self.device)
        ref = None
        if self.spec.kl_beta:
            with torch.no_grad(), self.reference_active():
                ref = self.policy_logps(inputs, labels)
        logps = self.policy_logps(inputs, labels)
        out = grpo.grpo_token_losses(logps, old.to(self.device), adv.to(self.device), ref,
                                     epsilon=self.spec.clip_epsilon, beta=self.spec.kl_beta)
        (out.losses.sum() / global_tokens).backward()
        sums["loss"] += float(out.losses.detach().sum())
        sums["kl"] += float(out.kl.sum())
        sums["clipped"] += float(out.clipped.sum())
        sums["supervised"] += len(old)
        sums["tokens"] += sum(len(ids) for group in examples for ids, _ in group)

    def policy_logps(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            hidden = self.decoder(**inputs, use_cache=False).last_hidden_state
            return token_logps(hidden, labels, self.lm_head, self.softcap, self.spec.temperature)

    # -- metrics ---------------------------------------------------------------------------------

    def train_metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        completions, groups = max(sums["completions"], 1), max(sums["groups"], 1)
        trained = max(sums["supervised"], 1)
        world = self.world_size
        judged = {"judge_requests": int(sums["judge_requests"]),
                  "judge_tokens": int(sums["judge_tokens"])} if self.judge is not None else {}
        return {**judged, "train_loss": sums["loss"] / trained,
                "reward_mean": sums["reward"] / completions,
                "reward_std_within_group": sums["group_std"] / groups,
                "zero_signal_share": sums["zero_signal"] / groups,
                "kl": sums["kl"] / trained,
                "clip_fraction": sums["clipped"] / trained,
                "completion_length": sums["completion_tokens"] / completions,
                "finished_share": sums["finished"] / completions,
                "rollout_seconds": sums["rollout_seconds"] / world,
                "grade_seconds": sums["grade_seconds"] / world,
                "train_seconds": sums["train_seconds"] / world,
                "supervised_tokens": int(sums["supervised"]),
                **({"hard_prompts": int(sums["hard"]),
                    "hard_prompts_rescued": int(sums["hard_rescued"])}
                   if self.spec.hard_prompt_samples else {})}

    def step_metrics(self, sums: torch.Tensor, seconds: float, epoch: int) -> dict[str, Any]:
        metrics = super().step_metrics(sums, seconds, epoch)
        every = self.spec.eval_interval
        if self.valid_examples and every and self.state.step % every == 0:
            metrics.update(self.valid_metrics(self.valid_examples, "valid_"))
        return metrics

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError("GRPO evaluates by grading greedy answers (evaluate)")

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"score": sums["score"] / max(sums["count"], 1), "count": sums["count"]}

    @torch.no_grad()
    def evaluate(self, examples: list[Prompt], max_batches: int | None = None
                 ) -> dict[str, float]:
        """The grader's mean over greedy answers to ``examples`` (sharded over ranks)."""
        mine = examples[self.rank::self.world_size]
        score = 0.0
        if mine:
            score = float(self.rewards(mine, self.rollouts(mine, 1, greedy=True)).sum())
        sums = self.all_reduce(torch.tensor([score, float(len(mine))], dtype=torch.float64))
        return self.eval_metrics(dict(zip(EVAL_FIELDS, sums.tolist(), strict=True)))

    def held_out(self) -> list[Prompt]:
        """The validation prompts the curve is scored on: the first ``eval_samples``."""
        return self.valid_examples[:self.spec.eval_samples]

    def valid_metrics(self, examples: list[Prompt], prefix: str) -> dict[str, float]:
        if prefix == "valid_":
            examples = self.held_out()
        return super().valid_metrics(examples, prefix)

    def verify_settings(self) -> None:
        """Grade greedy answers before step 1, so a broken grader or template fails in seconds,
        not after the first rollouts. A fresh run grades the held-out prompts of the curve: its
        point before training (``initial_score``), what ``valid_score`` is compared with. A
        resumed run, or one without a validation file, grades two prompts per worker."""
        if self.state.step == 0 and self.valid_examples:
            examples = self.held_out()
        else:
            examples = (self.valid_examples or self.train_examples)[:2 * self.world_size]
        metrics = self.evaluate(examples)
        self.emit(f"Verified settings: grader score before training={metrics['score']:.3f} on "
                  f"{int(metrics['count'])} prompts, group_size={self.spec.group_size}, "
                  f"kl_beta={self.spec.kl_beta}, {self.total_steps} steps "
                  f"({self.hp.n_epochs} epochs × {self.steps_per_epoch} steps of "
                  f"{self.hp.batch_size} prompts)",
                  data={"initial_score": metrics["score"], "initial_metrics": metrics,
                        "total_steps": self.total_steps, "hyperparameters": self.hp.as_dict(),
                        "group_size": self.spec.group_size})

    def manifest(self) -> dict[str, Any]:
        spec = self.spec
        return {**super().manifest(), "reinforcement": {
            "grader": spec.grader, "group_size": spec.group_size, "kl_beta": spec.kl_beta,
            "clip_epsilon": spec.clip_epsilon, "temperature": spec.temperature,
            "scale_rewards": spec.scale_rewards, "hard_prompt_samples": spec.hard_prompt_samples,
            "max_completion_tokens": spec.max_completion_tokens,
            "init_adapter": spec.init_adapter, "reference_adapter": spec.reference_adapter}}



