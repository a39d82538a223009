"""The result of a run in storage: an adapter folder whose ``manifest.json`` is written last.

``adapters/<job_id>/final/`` (and ``ckpt-step-<N>/`` per checkpoint) hold the PEFT files
``adapter_model.safetensors`` + ``adapter_config.json`` (or, after full fine-tuning, the model's
``model.safetensors`` + ``config.json``). A reader that finds ``manifest.json`` finds a complete
adapter: every other file was uploaded before it.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from service.core import names
from training.spec import Hyperparameters, TrainSpec

log = logging.getLogger(__name__)

MANIFEST = names.ADAPTER_MANIFEST
adapter_prefix = names.adapter_prefix
"""``adapters/<job_id>/final`` or ``adapters/<job_id>/ckpt-step-<step>``."""
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "ray", "tuneserve")


def save_weights(model: torch.nn.Module, out_dir: Path) -> None:
    """PEFT adapter files, or the whole model after full fine-tuning, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # A PeftModel saves only the adapter; a plain model saves all of its weights.
    model.save_pretrained(str(out_dir), safe_serialization=True)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def build_manifest(spec: TrainSpec, *, fingerprint: dict[str, str], eot_token_ids: list[int],
                   target_modules: list[str], data_hashes: dict[str, str],
                   hyperparameters: Hyperparameters, metrics: dict[str, Any],
                   step: int) -> dict[str, Any]:
    """The fields of docs/interfaces.md: what a server needs to load and trust the adapter."""
    return {
        "job_id": spec.job_id,
        "tenant": spec.tenant,
        "base_model": spec.base_model,
        "base_weights_hash": fingerprint["base_weights_hash"],
        "template_hash": fingerprint["template_hash"],
        "eot_token_ids": eot_token_ids,
        "method": spec.method,
        "full_finetune": spec.full_finetune,
        "lora": None if spec.full_finetune else {
            "r": spec.lora_r, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout,
            "target_modules": target_modules, "layers": spec.lora_layers},
        "init_adapter": spec.init_adapter,
        "data_hashes": data_hashes,
        "hyperparameters": hyperparameters.as_dict(),
        "seed": spec.seed,
        "versions": versions(),
        "metrics": metrics,
        "step": step,
    }


def lora_settings(folder: Path) -> dict[str, Any]:
    """TrainSpec fields that give a model the shape of the LoRA adapter saved in ``folder``."""
    config = json.loads((folder / "adapter_config.json").read_text())
    targets, layers = config["target_modules"], config.get("layers_to_transform")
    return {"lora_r": int(config["r"]), "lora_alpha": config["lora_alpha"],
            "target_modules": (targets,) if isinstance(targets, str) else tuple(targets),
            # PEFT saves the adapted layers' indices; they are always the model's last ones.
            "lora_layers": len(layers) if isinstance(layers, list) else None}


def export_adapter(storage: Any, local_dir: Path, prefix: str, manifest: dict[str, Any]) -> None:
    """Upload the weight files of ``local_dir`` under ``prefix``, then commit ``manifest.json``."""
    if storage.exists(f"{prefix}/{MANIFEST}"):
        storage.delete(f"{prefix}/{MANIFEST}")  # a re-export (after a resume) uncommits first
    for path in sorted(local_dir.iterdir()):
        # Weights and configs only (PEFT also writes a model-card README.md).
        if path.is_file() and path.suffix in (".safetensors", ".json") and path.name != MANIFEST:
            storage.upload_file(path, f"{prefix}/{path.name}")
    storage.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    log.info("adapter committed at %s", prefix)


def export_model(storage: Any, model: torch.nn.Module, prefix: str,
                 manifest: dict[str, Any]) -> None:
    """Save ``model``'s trainable weights to a temporary folder and export them."""
    with tempfile.TemporaryDirectory(prefix="tuneserve-adapter-") as tmp:
        save_weights(model, Path(tmp))
        export_adapter(storage, Path(tmp), prefix, manifest)
