"""Which weights train: a LoRA adapter on each linear layer of the family (PEFT), or all."""

from __future__ import annotations

import logging
import weakref

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
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
        share_input_casts(peft_model, frozen_dtype)
    return peft_model


def share_input_casts(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Under autocast, cast each adapted layer's input to ``dtype`` once for all its readers.

    q, k and v (or gate and up) read the same fp32 normed hidden state. Autocast casts it to
    bf16 separately for every matmul, and PEFT first casts it to the adapter's fp32 for each
    LoRA branch: ~9 bf16 copies per layer, each kept for backward. One cast, shared by the base
    layers and the LoRA branches, keeps one copy (a quarter less saved activation on SmolLM2)
    and computes exactly the same products.
    """
    casts: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def cast_once(module: torch.nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        if x.dtype == dtype or not torch.is_autocast_enabled(x.device.type):
            return None
        hit = casts.get(id(x))
        if hit is None or hit[0]() is not x:
            for key in [k for k, (ref, _) in casts.items() if ref() is None]:
                del casts[key]
            hit = casts[id(x)] = (weakref.ref(x), x.to(dtype))
        return (hit[1], *args[1:])

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # autocast runs the LoRA matmuls in bf16
            module.register_forward_pre_hook(cast_once)
