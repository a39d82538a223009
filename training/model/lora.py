"""Which weights train: a LoRA adapter on each linear layer of the family (PEFT), or all."""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from training.spec import TrainSpec

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


def adapted_layers(model: PreTrainedModel, last: int | None) -> list[int] | None:
    """Indices of the last ``last`` decoder layers (PEFT's ``layers_to_transform``); None: all."""
    total = model.config.num_hidden_layers
    if last is None or last >= total:
        return None
    return list(range(total - last, total))


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
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
                        layers_to_transform=adapted_layers(model, spec.lora_layers))
    head = model.get_output_embeddings()  # often tied to the input embeddings: keep it fp32
    peft_model = get_peft_model(model, config)
    for module in peft_model.modules():
        if isinstance(module, LoraLinear):
            for name in module.lora_A:
                module.lora_variant.setdefault(name, AddmmLora())
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


class AddmmLora(LoraVariant):
    """Plain LoRA, ``result + s·B(A x)``, computed as ``addmm(result, s·(x Aᵀ), Bᵀ)``.

    PEFT's own path scales and adds at the layer's output width (``result + B(A x) * s``): two
    elementwise passes over a (tokens, out) tensor in the forward and one more in the backward,
    for each of a block's 7 adapted layers. Here the scaling multiplies the (tokens, r) product
    and the add rides in the matmul: same value, same gradients (checked against PEFT's path in
    ``tests/test_training_loss.py``), about a tenth less time per training step on CPU. It is a
    PEFT "variant" (their hook for DoRA and the like) so the adapter's weights, names and files
    stay PEFT's.
    """

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        a = module.lora_A[active_adapter].weight
        b = module.lora_B[active_adapter].weight
        xa = F.linear(module.lora_dropout[active_adapter](x), a) * module.scaling[active_adapter]
        out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]),
                          b.t())
        return out.view(result.shape)

    # Merging (not used in training, which saves the factors) is plain LoRA's.
    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor
                   ) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor
                ) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)
