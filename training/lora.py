"""Which weights train: a LoRA adapter on each linear layer of the family (PEFT), or all."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from training.config import TrainSpec

log = logging.getLogger(__name__)

# "All linear layers" per model family, spelled out so the manifest records what was adapted.
# The output projection (lm_head) is left out on purpose: it is tied to the embeddings in most
# small models and adapting it adds a vocab-sized matmul to every step.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def default_target_modules(model: PreTrainedModel) -> tuple[str, ...]:
    """The family's linear layers; for a family not in the table, every linear layer's name
    found inside the decoder (what PEFT's "all-linear" would pick)."""
    family = model.config.model_type
    if family in TARGET_MODULES:
        return TARGET_MODULES[family]
    head = model.get_output_embeddings()
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and module is not head})
    log.info("model family %r not in the table; adapting linear layers %s", family, names)
    return tuple(names)


def apply_adapter(model: PreTrainedModel, spec: TrainSpec,
                  frozen_dtype: torch.dtype | None = None) -> PreTrainedModel | PeftModel:
    """Make only the trainable weights require grad; return the model to train.

    LoRA: wrap in a PEFT ``LoraModel`` on ``spec.target_modules`` (default: the family's linear
    layers); adapter weights stay fp32. ``frozen_dtype`` (bf16 under bf16 autocast) stores the
    frozen *linear* weights in that dtype: autocast would cast them to bf16 for every matmul
    anyway, so this halves their memory without changing a single result. Embeddings and norms
    stay fp32 so the residual stream is exactly that of fp32 weights under autocast.
    Full fine-tuning: every weight trains, in the dtype it was loaded in.
    """
    if spec.full_finetune:
        model.requires_grad_(True)
        return model
    targets = spec.target_modules or default_target_modules(model)
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    head = model.get_output_embeddings()  # often tied to the input embeddings: keep it fp32
    peft_model = get_peft_model(model, config)
    if frozen_dtype is not None:
        for module in peft_model.modules():
            if (isinstance(module, torch.nn.Linear) and module is not head
                    and not module.weight.requires_grad):
                module.to(frozen_dtype)
    return peft_model
