"""Test adapters for the serving tests: PEFT LoRA on a base model, in the training engine's layout.

``adapters/<job_id>/final/{adapter_model.safetensors, adapter_config.json, manifest.json}``
with the manifest written last, exactly as ``docs/interfaces.md`` pins it. The LoRA B factors
are random and non-zero (PEFT starts them at zero), so each adapter changes the model's answers.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

import torch

from service.core.storage import Storage, join_key

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def write_adapter(storage: Storage, model_dir: Path, base_model: str, *, seed: int,
                  job_id: str | None = None, step: int | None = None, tenant: str = "local",
                  r: int = 8, scale: float = 0.5, manifest_overrides: dict[str, Any] | None = None,
                  model: Any = None, targets: list[str] = TARGETS) -> str:
    """Write one adapter to storage; returns its adapter id (``<job_id>/final`` …).

    ``targets``: the module names that get LoRA factors (all linear layers by default).
    """
    from peft import LoraConfig, get_peft_model

    from training.model import registry

    job_id = job_id or new_job_id()
    folder = "final" if step is None else f"ckpt-step-{step}"
    base = model if model is not None else registry.load_model(model_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    manifest = {
        "base_model": base_model, **registry.model_fingerprint(model_dir),
        "eot_token_ids": [2], "job_id": job_id, "tenant": tenant, "step": step,
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": targets},
        "data_hashes": {}, "hyperparameters": {}, "seed": seed, "versions": {}, "metrics": {},
    } | (manifest_overrides or {})
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        prefix = join_key("adapters", job_id, folder)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            storage.upload_file(Path(tmp) / name, join_key(prefix, name))
        storage.put(join_key(prefix, "manifest.json"), json.dumps(manifest).encode())
    peft_model.unload()  # give the base model its plain Linear layers back
    return f"{job_id}/{folder}"


def write_full_model(storage: Storage, model_dir: Path, base_model: str, *, seed: int,
                     job_id: str | None = None, tenant: str = "local", scale: float = 0.05) -> str:
    """Write a full fine-tune of the base model (every weight moved by seeded noise), as a
    ``full_finetune`` job exports it: the model's config and safetensors, the manifest last."""
    from training.model import registry

    job_id = job_id or new_job_id()
    model = registry.load_model(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    manifest = {
        "base_model": base_model, **registry.model_fingerprint(model_dir),
        "eot_token_ids": [2], "job_id": job_id, "tenant": tenant, "step": None,
        "full_finetune": True, "lora": None, "data_hashes": {}, "hyperparameters": {},
        "seed": seed, "versions": {}, "metrics": {}}
    prefix = join_key("adapters", job_id, "final")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in Path(tmp).iterdir():
            storage.upload_file(path, join_key(prefix, path.name))
        storage.put(join_key(prefix, "manifest.json"), json.dumps(manifest).encode())
    return f"{job_id}/final"
