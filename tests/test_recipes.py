"""Recipes (``training.recipes``) train in a plain Python process where Ray cannot be imported:
Ray Train is their launcher, not a dependency of the step. SFT and DPO on the tiny model, local
storage; and the device strategy that decides which CPU-only accelerations a recipe gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import REPO, sorting_lines
from tests.test_dpo_loss import load_make_preferences
from training.cpu.info import cpu_description, cpu_has_bf16
from training.cpu.strategy import CPUStrategy, DeviceStrategy, strategy_for
from training.model import registry
from training.model.attention import FP32_ATTRIBUTE, use_packed_attention

JOB = "ftjob-" + "c" * 24
FILE = "file-" + "c" * 24

# Runs in a fresh interpreter: ``sys.modules["ray"] = None`` makes every ``import ray`` (and
# ``importlib.util.find_spec("ray")``) behave as if Ray were not installed.
SCRIPT = r"""
import json, sys
sys.modules["ray"] = None

import torch

from service.core.storage.config import StorageConfig
from training.recipes import RECIPES
from training.spec import TrainSpec

fields, root = json.loads(sys.argv[1]), sys.argv[2]
fields["training_files"] = tuple(tuple(f) for f in fields["training_files"])
spec = TrainSpec(**fields).validate()
recipe = RECIPES[spec.method](spec, StorageConfig(uri=root))
recipe.setup()
before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
recipe.train()
after = dict(recipe.model.named_parameters())
recipe.cleanup()
try:
    import ray  # noqa: F401
    ray_importable = True
except ImportError:
    ray_importable = False
changed = sorted(n for n in before if not torch.equal(before[n], after[n].detach()))
print(json.dumps({
    "ray_importable": ray_importable,
    "recipe": type(recipe).__name__,
    "strategy": type(recipe.device_strategy).__name__,
    "adapter": sorted(n for n in before if "lora_" in n),
    "changed": changed,
    "reports": recipe.context.reports,
}))
"""


def train_without_ray(tmp_path, content: bytes, **fields) -> tuple[dict, list[dict]]:
    """Train ``fields`` (a TrainSpec's) on ``content`` in a process without Ray; return what the
    script saw and the job's events."""
    storage = open_storage(StorageConfig(uri=str(tmp_path)))
    storage.put(f"files/{FILE}/content", content)
    spec = {"job_id": JOB, "base_model": registry.TINY_MODEL_ID,
            "training_files": [[FILE, 1.0]], "num_workers": 1, "seed": 3, **fields}
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec), str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    events = [json.loads(storage.get(i.key)) for i in storage.iter(f"jobs/{JOB}/events/")]
    assert storage.exists(f"adapters/{JOB}/final/manifest.json")
    return seen, events


def train_losses(events: list[dict]) -> list[float]:
    return [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]


def assert_trained_the_adapter_only(seen: dict) -> None:
    assert not seen["ray_importable"]
    assert seen["adapter"]  # LoRA weights exist...
    assert set(seen["changed"]) == set(seen["adapter"])  # ...all of them moved, nothing else


def test_sft_trains_in_a_process_without_ray(tmp_path):
    """Two CPUs and LoRA on the last layer: the CPU strategy runs the frozen first layer of the
    next step ahead, inside the plain process too."""
    seen, events = train_without_ray(tmp_path, sorting_lines(64, seed=1), n_epochs=4,
                                     batch_size=8, cpus_per_worker=2, lora_layers=1,
                                     learning_rate_multiplier=2.0)
    assert seen["recipe"] == "SFTRecipe" and seen["strategy"] == "CPUStrategy"
    assert_trained_the_adapter_only(seen)
    assert any("frozen layers of the next step ahead" in e["message"] for e in events)
    losses = train_losses(events)
    assert len(losses) == 32  # 64 examples / 8, four times
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert [r["step"] for r in seen["reports"]] == [8, 16, 24, 32]  # a checkpoint per epoch


def test_dpo_trains_in_a_process_without_ray(tmp_path):
    toy = load_make_preferences()
    train, _ = toy.make_preferences(32, 0, seed=0)
    seen, events = train_without_ray(tmp_path, toy.to_jsonl(train), method="dpo", n_epochs=3,
                                     batch_size=8, cpus_per_worker=1,
                                     learning_rate_multiplier=10.0)
    assert seen["recipe"] == "DPORecipe"
    assert_trained_the_adapter_only(seen)
    assert any(e["data"].get("reference_cache") == "miss" for e in events)
    losses = train_losses(events)
    assert len(losses) == 12
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert abs(losses[0] - torch.log(torch.tensor(2.0)).item()) < 1e-3  # policy = reference
    assert sum(losses[-4:]) / 4 < losses[0] - 0.05


def test_only_a_cpu_gets_the_cpu_accelerations():
    """A GPU worker gets the plain strategy: torch's thread count, no fp32 attention, no
    lookahead; a CPU worker gets them all."""
    assert type(strategy_for(torch.device("cuda"))) is DeviceStrategy
    assert type(strategy_for(torch.device("cpu"))) is CPUStrategy

    def prepared(strategy: DeviceStrategy) -> set[int]:
        model = registry.load_model(registry.resolve_model(registry.TINY_MODEL_ID),
                                    torch.float32, attn_implementation="sdpa")
        use_packed_attention(model)
        strategy.prepare_model(model)
        return {getattr(m, FP32_ATTRIBUTE) for m in model.modules() if hasattr(m, FP32_ATTRIBUTE)}

    assert prepared(DeviceStrategy()) == set()
    assert prepared(CPUStrategy()) == {512}
    threads = torch.get_num_threads()
    assert DeviceStrategy().set_threads(threads + 1) == threads  # left as torch had it
    try:
        assert CPUStrategy().set_threads(1) == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)



def test_the_cpu_is_described_by_its_model_and_its_bf16_path():
    """What every benchmark records of the machine it ran on: the model /proc/cpuinfo names, the
    bf16 path the recipes pick by (``cpu_has_bf16``), and the CPUs this process may use."""
    info = open("/proc/cpuinfo").read()
    model = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name"))
    described = cpu_description()
    assert described.startswith(f"{model} (")
    assert (("AMX-bf16" in described or "AVX512-bf16" in described) == cpu_has_bf16()
            == ("avx512_bf16" in info or "amx_bf16" in info))
    assert described.endswith(f", {len(os.sched_getaffinity(0))} CPUs")
