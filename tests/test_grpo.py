"""Reinforcement fine-tuning (GRPO) on the tiny model: the loss is the formula, equal rewards
teach nothing, a grader's reward rises, a killed worker's run resumes on the same curve, and the
API refuses what cannot run with a 400 naming the field.

The toy task: an SFT adapter first learns to answer "yes" or "no" (half each) to numbered
questions; the RFT job then rewards "yes" (``string_check`` ``ilike``). Rollouts sample at a low
temperature: the tiny model's distribution is nearly flat over its 49k tokens, and only the
top of it says yes or no.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import torch

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import own_train_workers
from training import checkpoints, graders
from training.losses import grpo
from training.model import registry as models
from training.model import sampler
from training.recipes import grpo as grpo_recipe
from training.recipes import run_recipe
from training.recipes.context import WorkerContext
from training.spec import TrainSpec

TINY = models.TINY_MODEL_ID
SFT_JOB, RFT_JOB, KILLED_JOB = ("ftjob-" + c * 24 for c in "bcd")
SFT_FILE, TRAIN, VALID = ("file-" + c * 24 for c in "123")
YES = {"type": "string_check", "name": "says yes", "input": "{{sample.output_text}}",
       "reference": "{{item.answer}}", "operation": "ilike"}
STEPS = 20


def question(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: yes or no?"}]


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def put_toy_files(storage) -> None:
    sft = [{"messages": [*question(i), {"role": "assistant", "content": "yes" if i % 2 else "no"}]}
           for i in range(64)]
    storage.put(f"files/{SFT_FILE}/content", jsonl(sft))
    storage.put(f"files/{TRAIN}/content",
                jsonl([{"messages": question(100 + i), "answer": "yes"} for i in range(4 * STEPS)]))
    storage.put(f"files/{VALID}/content",
                jsonl([{"messages": question(500 + i), "answer": "yes"} for i in range(16)]))


def rft_spec(job_id: str, **fields) -> TrainSpec:
    # fp32: at temperature 0.1 bf16 rounding makes the sampler's and the trainer's log-probs of
    # a token differ by up to ~0.4 nats, and differently on each CPU's bf16 kernels (AMX or
    # AVX512-bf16), so a 20-step toy curve would depend on the machine.
    adapter = f"adapters/{SFT_JOB}/final"
    return TrainSpec(**{
        "job_id": job_id, "base_model": TINY, "method": "reinforcement",
        "training_files": ((TRAIN, 1.0),), "validation_file": VALID, "batch_size": 4,
        "n_epochs": 1, "grader": YES, "group_size": 8, "max_completion_tokens": 4,
        "temperature": 0.1, "learning_rate_multiplier": 20.0, "init_adapter": adapter,
        "reference_adapter": adapter, "checkpoint_every_steps": 0,
        "checkpoint_every_seconds": 0, "eval_interval": 5, "seed": 1, "bf16": False,
        **fields}).validate()


def step_metrics(storage, job_id: str) -> dict[int, list[dict]]:
    """Every metrics event of the run by step (a step redone after a restart appears twice)."""
    steps: dict[int, list[dict]] = {}
    for info in storage.iter(f"jobs/{job_id}/events/"):
        event = json.loads(storage.get(info.key))
        if event["type"] == "metrics":
            steps.setdefault(event["data"]["step"], []).append(event["data"])
    return steps


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The SFT adapter, then an uninterrupted 20-step RFT run from it, in this process."""
    config = StorageConfig(uri=str(tmp_path_factory.mktemp("grpo") / "storage"))
    storage = open_storage(config)
    put_toy_files(storage)
    run_recipe(TrainSpec(job_id=SFT_JOB, base_model=TINY, training_files=((SFT_FILE, 1.0),),
                         n_epochs=15, batch_size=8, learning_rate_multiplier=5.0,
                         checkpoint_every_steps=0, checkpoint_every_seconds=0, seed=3,
                         bf16=False), config)
    recipe = run_recipe(rft_spec(RFT_JOB), config, WorkerContext())
    return config, storage, recipe


# -- the loss ---------------------------------------------------------------------------------


def test_loss_on_a_hand_made_group_equals_the_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = grpo.group_advantages(rewards, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL
    assert torch.allclose(adv, (rewards - 0.5) / (std + grpo.STD_EPSILON))
    # Unscaled (Dr. GRPO): r − mean(r); a group with one slip among four weighs less, next to
    # a half-right group, than the std's scaling makes it weigh.
    slip = torch.tensor([1.0, 1.0, 1.0, 0.0])
    unscaled = grpo.group_advantages(torch.cat([slip, rewards]), 4, scale=False)
    assert torch.allclose(unscaled, torch.tensor([0.25, 0.25, 0.25, -0.75, 0.5, -0.5, -0.5, 0.5]))
    scaled = grpo.group_advantages(torch.cat([slip, rewards]), 4)

    def weight(adv: torch.Tensor) -> float:  # the half-right group's over the slip's
        return float(adv[4:].abs().sum() / adv[:4].abs().sum())
    assert weight(unscaled) == pytest.approx(2 / 1.5)
    assert weight(unscaled) > weight(scaled) > 1
    # Three tokens: ratios e^0.1 (unclipped), e^0.5 (clipped above for A>0), e^-0.5 (clipped
    # below for A<0); one reference value per token.
    logps = torch.tensor([-1.0, -0.5, -2.5], requires_grad=True)
    old = torch.tensor([-1.1, -1.0, -2.0])
    a = torch.tensor([1.0, 1.0, -1.0])
    ref = torch.tensor([-1.2, -0.7, -2.4])
    out = grpo.grpo_token_losses(logps, old, a, ref, epsilon=0.2, beta=0.04)
    ratio = torch.exp(logps.detach() - old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    d = ref - logps.detach()
    kl = torch.exp(d) - d - 1
    expected = -torch.min(ratio * a, clipped * a) + 0.04 * kl
    assert torch.allclose(out.losses.detach(), expected)
    assert out.clipped.tolist() == [False, True, True]
    assert torch.allclose(out.kl, kl)
    # The gradient of a clipped token is the KL term's alone.
    out.losses.sum().backward()
    assert logps.grad[1].item() == pytest.approx((0.04 * (1 - torch.exp(d[1]))).item(), rel=1e-5)


def test_rollout_tokens_are_drawn_by_their_probabilities():
    # A vocabulary as wide as SmolLM2's, two rows with different distributions; one token is
    # impossible in each.
    vocab = 49152
    probs = torch.zeros(2, vocab)
    probs[0, [7, 100, 40000]] = torch.tensor([0.2, 0.5, 0.3])
    probs[1, [3, vocab - 1]] = torch.tensor([0.9, 0.1])
    rows = probs.repeat(10000, 1)
    drawn = sampler.draw(rows, torch.Generator().manual_seed(0)).view(-1, 2)
    first = torch.bincount(drawn[:, 0], minlength=vocab)
    second = torch.bincount(drawn[:, 1], minlength=vocab)
    assert first.sum() == second.sum() == 10000
    assert set(first.nonzero().view(-1).tolist()) == {7, 100, 40000}
    assert set(second.nonzero().view(-1).tolist()) == {3, vocab - 1}
    # Within 4 standard deviations of the expected counts.
    for counts, token, p in ((first, 7, 0.2), (first, 100, 0.5), (second, vocab - 1, 0.1)):
        assert abs(counts[token].item() - 10000 * p) < 4 * (10000 * p * (1 - p)) ** 0.5
    again = sampler.draw(rows, torch.Generator().manual_seed(0)).view(-1, 2)
    assert torch.equal(drawn, again)  # a seeded generator draws the same tokens


def test_a_group_with_equal_rewards_contributes_no_gradient(toy):
    _, _, recipe = toy
    assert torch.all(grpo.group_advantages(torch.ones(8), 8) == 0)
    assert grpo.zero_signal(torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 1]), 4).tolist() == [True, False]
    # A grader no answer satisfies: every group is all zeros; the step trains on nothing.
    recipe.grader = recipe.grader.model_copy(update={"reference": "zzz-never-said"})
    recipe.optimizer.zero_grad(set_to_none=True)
    sums = dict(zip(recipe.SUMS, recipe.forward_backward(recipe.train_examples[:4]).tolist()))
    assert sums["zero_signal"] == sums["groups"] == 4 and sums["reward"] == 0
    assert sums["supervised"] == 0 and sums["loss"] == 0
    assert all(p.grad is None or not p.grad.any() for p in recipe.params)


# -- hard prompts -------------------------------------------------------------------------------


def test_hard_groups_are_the_alike_ones_below_the_steps_mean():
    rewards = [torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1, 0, 0]),
               torch.full((4,), 0.5)]
    assert grpo_recipe.hard_groups(rewards, 0.5) == [0]  # 0.5 alike is not below the mean
    assert grpo_recipe.hard_groups(rewards, 0.6) == [0, 3]
    assert grpo_recipe.hard_groups([torch.zeros(4)] * 2, 0.0) == []  # nothing does better


def with_answers(recipe, answers: list[str]) -> list:
    """Toy prompts whose ``item.answer`` is each of ``answers``: "" is in every answer (the
    ``ilike`` grader's 1), "zzz" in none (its 0)."""
    return [grpo_recipe.Prompt(i, p.ids, {"answer": a})
            for i, (p, a) in enumerate(zip(recipe.train_examples, answers, strict=False))]


def test_a_hard_prompt_is_sampled_again_and_trains_on_every_completion(toy):
    _, _, recipe = toy
    spec = recipe.spec
    # No KL term: the run is over and its reference adapter's folder is gone.
    recipe.spec = dataclasses.replace(spec, hard_prompt_samples=6, kl_beta=0.0)
    recipe.grader = graders.parse(YES, "grader")
    try:
        # The step: two prompts every answer satisfies, two none does. Only the latter are
        # below the step's mean; they get 6 more completions each, still all wrong, and no
        # group has a signal, so nothing trains.
        recipe.optimizer.zero_grad(set_to_none=True)
        sums = dict(zip(recipe.SUMS, recipe.forward_backward(
            with_answers(recipe, ["", "", "zzz", "zzz"])).tolist()))
        assert sums["hard"] == 2 and sums["hard_rescued"] == 0
        assert sums["completions"] == 4 * 8 and sums["reward"] == 2 * 8  # the step's own draw
        assert sums["supervised"] == 0
        # A group of 8 wrong answers whose 6 more completions are right (its answer is ""):
        # it now trains on all 14, the first 8 pushed down and the 6 new ones up.
        prompts = with_answers(recipe, ["", ""])
        groups = recipe.rollouts(prompts, 8, seed=1)
        per_group = [torch.zeros(8), torch.ones(8)]
        sums = dict.fromkeys(grpo_recipe.SUM_FIELDS, 0.0)
        recipe.sample_hard_prompts(prompts, groups, per_group, 0.5, sums)
        assert sums["hard"] == 1 and sums["hard_rescued"] == 1
        assert [len(g) for g in groups] == [14, 8] and per_group[0].tolist() == [0] * 8 + [1] * 6
        advantages = grpo.group_advantages(per_group[0], 14)
        assert (advantages[:8] < 0).all() and (advantages[8:] > 0).all()
        # The extra draw is seeded by the step: a resumed run samples the same completions.
        again = recipe.rollouts(prompts, 8, seed=1)
        recipe.sample_hard_prompts(prompts, again, [torch.zeros(8), torch.ones(8)], 0.5,
                                   dict.fromkeys(grpo_recipe.SUM_FIELDS, 0.0))
        assert [c.tokens for c in again[0]] == [c.tokens for c in groups[0]]
        recipe.optimizer.zero_grad(set_to_none=True)
        trained = dict.fromkeys(grpo_recipe.SUM_FIELDS, 0.0)
        recipe.train_groups([(prompts[0], groups[0], advantages)],
                            sum(len(c.tokens) for c in groups[0]), trained)
        assert trained["supervised"] == sum(len(c.tokens) for c in groups[0])
        assert any(p.grad is not None and p.grad.any() for p in recipe.params)
    finally:
        recipe.spec = spec


# -- a run ------------------------------------------------------------------------------------


def test_mean_reward_rises_and_every_step_reports_the_rl_metrics(toy):
    _, storage, _ = toy
    steps = step_metrics(storage, RFT_JOB)
    assert sorted(steps) == list(range(1, STEPS + 1))
    curve = [steps[s][0]["reward_mean"] for s in sorted(steps)]
    first, last = sum(curve[:4]) / 4, sum(curve[-5:]) / 5
    assert last > first + 0.15, curve
    for key in ("reward_mean", "reward_std_within_group", "zero_signal_share", "kl",
                "clip_fraction", "completion_length", "rollout_seconds", "grade_seconds",
                "train_seconds"):
        assert key in steps[STEPS][0], key
    assert steps[1][0]["kl"] == pytest.approx(0, abs=1e-3)  # the policy starts as its reference
    assert steps[STEPS][0]["kl"] > 0
    # Held out every eval_interval steps: greedy answers graded, better at the end.
    held = {s: steps[s][0]["valid_score"] for s in steps if "valid_score" in steps[s][0]}
    assert sorted(held) == [5, 10, 15, 20]
    events = [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{RFT_JOB}/events/")]
    # The curve's point before training is scored on the same 16 held-out prompts.
    settings = next(e["data"] for e in events if "initial_score" in e["data"])
    assert settings["initial_metrics"]["count"] == 16
    assert held[20] > settings["initial_score"]
    # The job page plots the reward and the held-out score; the events say them in words.
    from service.jobs.progress import metric_series
    from service.ui.dashboard import _charts

    drawn = "".join(_charts(metric_series(events)))
    assert "Reward (reinforcement)" in drawn and "held-out score" in drawn
    last = [e for e in events if e["type"] == "metrics"][-1]["message"]
    assert "mean reward=" in last and "held-out score=" in last
    manifest = json.loads(storage.get(f"adapters/{RFT_JOB}/final/manifest.json"))
    assert manifest["reinforcement"]["grader"] == YES


@pytest.mark.slow
def test_a_killed_worker_resumes_on_the_same_reward_curve(toy, ray_local, s3_server):
    """Ray Train, one worker SIGKILLed after its checkpoint at step 4 and a step or two more:
    the restart redoes those steps with the same rollouts and rewards, and the whole curve is
    the uninterrupted run's."""
    _, toy_storage, _ = toy
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env.items():
            env.setenv(name, value)
        config = StorageConfig(uri=f"s3://{s3_server.bucket}/grpo-{os.getpid()}",
                               endpoint_url=s3_server.endpoint_url)
        storage = open_storage(config)
        put_toy_files(storage)
        for info in toy_storage.iter(f"adapters/{SFT_JOB}/final/"):
            storage.put(info.key, toy_storage.get(info.key))
        killed: dict = {}

        def kill_after_step_5() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                workers = own_train_workers()
                complete = checkpoints.scan(storage, KILLED_JOB)[0]
                if (complete and complete[0] >= 4 and workers
                        and max(step_metrics(storage, KILLED_JOB), default=0) >= 5):
                    killed["pid"] = workers[-1].pid
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    return
                time.sleep(0.1)

        from training.run import run_training

        killer = threading.Thread(target=kill_after_step_5, daemon=True)
        killer.start()
        result = run_training(rft_spec(KILLED_JOB, checkpoint_every_steps=4, max_failures=2),
                              config)
        killer.join(timeout=1)
    assert killed, "no worker was killed"
    assert result["resumed_from_step"] == 4 and result["step"] == STEPS
    steps = step_metrics(storage, KILLED_JOB)
    redone = [s for s, runs in steps.items() if len(runs) > 1]
    assert redone and min(redone) == 5
    for s in redone:
        assert [r["reward_mean"] for r in steps[s]] == [steps[s][0]["reward_mean"]] * len(steps[s])
    uninterrupted = step_metrics(toy_storage, RFT_JOB)
    assert ([steps[s][-1]["reward_mean"] for s in sorted(steps)]
            == [uninterrupted[s][0]["reward_mean"] for s in sorted(uninterrupted)])
    # Validated every eval_interval (5) steps only, not at the checkpoints every 4 besides: one
    # curve of one size (eval_samples).
    held = sorted({s for s, runs in steps.items() if any("valid_score" in r for r in runs)})
    assert held == [5, 10, 15, 20]


@pytest.mark.slow
def test_two_workers_share_each_step_and_the_reward_rises(toy, ray_local):
    """Ray Train with two workers: each samples and grades its half of a step's prompts, the
    sums are all-reduced, and the toy's reward rises as with one worker."""
    from training.run import run_training

    config, storage, _ = toy
    result = run_training(rft_spec("ftjob-" + "e" * 24, num_workers=2), config)
    steps = step_metrics(storage, "ftjob-" + "e" * 24)
    assert result["step"] == STEPS and sorted(steps) == list(range(1, STEPS + 1))
    curve = [steps[s][0]["reward_mean"] for s in sorted(steps)]
    assert sum(curve[-5:]) / 5 > sum(curve[:4]) / 4 + 0.15, curve


def test_full_fine_tuning_moves_the_weights_and_exports_a_whole_model(toy, tmp_path):
    """``full_finetune`` from the base model (no reference, so kl_beta 0), with a graded reward
    that differs within every group (fuzzy match to "yes"): the weights move, and the export is
    a whole model, not an adapter."""
    from safetensors.torch import load_file

    config, storage, _ = toy
    job, prompts = "ftjob-" + "f" * 24, "file-" + "4" * 24
    storage.put(f"files/{prompts}/content",
                jsonl([{"messages": question(700 + i), "answer": "yes"} for i in range(8)]))
    fuzzy = {"type": "text_similarity", "name": "near yes", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
    run_recipe(rft_spec(job, training_files=((prompts, 1.0),), full_finetune=True, kl_beta=0.0,
                        init_adapter=None, reference_adapter=None, grader=fuzzy,
                        temperature=1.0, learning_rate_multiplier=100.0), config, WorkerContext())
    steps = step_metrics(storage, job)
    assert sorted(steps) == [1, 2] and all(s[0]["zero_signal_share"] < 1 for s in steps.values())
    final = f"adapters/{job}/final"
    assert not storage.exists(f"{final}/adapter_config.json")
    (tmp_path / "model.safetensors").write_bytes(storage.get(f"{final}/model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    base = load_file(str(models.resolve_model(TINY) / "model.safetensors"))
    assert set(exported) == set(base)
    moved = [k for k in base if not torch.equal(exported[k].float(), base[k].float())]
    assert len(moved) == len(base), sorted(set(base) - set(moved))


# -- the API ----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    """The API in this process (no runner: every request here is refused before a job runs)."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.core.settings import Settings

    settings = Settings(storage=str(tmp_path / "storage"), builtin_models=False,
                        tiny_model=False, models={"tiny": str(models.resolve_model(TINY))})
    with TestClient(create_app(settings)) as client:
        yield client


def upload(api, rows: list[dict], name: str) -> dict:
    response = api.post("/v1/files", files={"file": (name, jsonl(rows))},
                        data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def refused(api, training_file: str, grader: dict | None, **hp) -> dict:
    method = {"type": "reinforcement"}
    if grader is not None:
        method["reinforcement"] = {"grader": grader, "hyperparameters": hp}
    response = api.post("/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": training_file, "method": method})
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_reinforcement_requests_are_400s_naming_the_field(api):
    prompts = upload(api, [{"messages": question(i), "answer": "yes"} for i in range(8)],
                     "rft.jsonl")
    assert prompts["description"]["kind"] == "prompts"
    assert prompts["description"]["item_fields"] == ["answer", "messages"]
    prompts = prompts["id"]
    assert refused(api, prompts, {**YES, "type": "regex_check"})["param"] == (
        "method.reinforcement.grader.type")
    missing = refused(api, prompts, {**YES, "reference": "{{item.label}}"})
    assert missing["param"] == "method.reinforcement.grader.reference"
    assert "'label'" in missing["message"]
    sft = upload(api, [{"messages": [*question(1), {"role": "assistant", "content": "no"}]}],
                 "sft.jsonl")["id"]
    assert refused(api, sft, YES)["param"] == "training_file"
    pairs = upload(api, [{"input": {"messages": question(1)},
                          "preferred_output": [{"role": "assistant", "content": "yes"}],
                          "non_preferred_output": [{"role": "assistant", "content": "no"}]}],
                   "pairs.jsonl")["id"]
    assert refused(api, pairs, YES)["param"] == "training_file"
    assert refused(api, prompts, YES, compute_multiplier=0)["param"] == (
        "method.reinforcement.hyperparameters.compute_multiplier")
    assert refused(api, prompts, YES, temperature=0)["param"] == (
        "method.reinforcement.hyperparameters.temperature")
    assert refused(api, prompts, YES, hard_prompt_samples=65)["param"] == (
        "method.reinforcement.hyperparameters.hard_prompt_samples")
    assert "grader" in refused(api, prompts, None)["message"]


def test_a_score_model_judge_drives_a_short_rft_job_end_to_end(shared_service):
    """The judge is the tiny model the service serves, called by the training workers through
    the chat deployment (the job's judge actor). Its scores of random text are noise; the job
    must run and report rewards in the grader's range."""
    import httpx

    from tests.helpers import wait_until

    url = f"{shared_service.url}/v1"
    http = httpx.Client(base_url=url, headers={"Authorization": "Bearer local"}, timeout=60)
    rows = [{"messages": question(i), "answer": "yes"} for i in range(4)]
    file_id = http.post("/files", files={"file": ("rft.jsonl", jsonl(rows))},
                        data={"purpose": "fine-tune"}).json()["id"]
    judge = {"type": "score_model", "name": "judge", "model": TINY, "range": [0, 10],
             "input": [{"role": "user",
                        "content": "Score 0-10 how much this says {{item.answer}}: "
                                   "{{sample.output_text}}"}],
             "sampling_params": {"max_completions_tokens": 4}}
    job = http.post("/fine_tuning/jobs", json={
        "model": TINY, "training_file": file_id,
        "method": {"type": "reinforcement", "reinforcement": {"grader": judge, "hyperparameters": {
            "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5,
            "temperature": 0.7, "scale_rewards": False, "hard_prompt_samples": 2}}}}).json()
    assert job["method"]["reinforcement"]["grader"]["type"] == "score_model", job
    asked = job["method"]["reinforcement"]["hyperparameters"]
    assert asked["temperature"] == 0.7 and asked["scale_rewards"] is False
    assert asked["hard_prompt_samples"] == 2
    done = wait_until(lambda: (j := http.get(f"/fine_tuning/jobs/{job['id']}").json())["status"]
                      in {"succeeded", "failed", "cancelled"} and j, 600, interval=2,
                      what="the RFT job")
    assert done["status"] == "succeeded", done.get("error")
    events = http.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()
    steps = [e["data"] for e in events["data"] if e["type"] == "metrics"]
    assert steps and all(0 <= s["reward_mean"] <= 10 for s in steps)
    # Every completion of every step (2 prompts x a group of 2) was judged by the served model:
    # the judge actor's only way to a model is the chat deployment, whose engine counted tokens.
    # ... and every extra completion of a hard prompt too (2 more for each of them).
    assert all(s["judge_requests"] == 4 + 2 * s["hard_prompts"] and s["judge_tokens"] > 4 * 4
               for s in steps), steps
    assert all("hard prompts sampled again=" in e["message"] for e in events["data"]
               if e["type"] == "metrics")
