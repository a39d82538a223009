"""Adapters on a serving replica: fetch from storage, check against the base model, load, cache.

An adapter folder (``adapters/<job_id>/final/`` or ``…/ckpt-step-<N>/``) holds
``adapter_model.safetensors``, ``adapter_config.json`` (PEFT) and ``manifest.json``, written
last, so a folder with a manifest is complete; a full fine-tune's folder holds the whole model
(``config.json`` and its safetensors) instead of the PEFT files. Only safetensors are loaded:
pickled weights (``.bin``, ``.pt``) can run code on load and are refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.core import limits, names
from service.core.errors import InvalidRequest, NotFound

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
"""A full fine-tune's model config (beside its ``*.safetensors``)."""
MANIFEST_FILE = names.ADAPTER_MANIFEST
_PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class AdapterIncompatible(InvalidRequest):
    """The adapter was trained for another base model, template or an unsupported shape."""

    def __init__(self, message: str):
        super().__init__(message, param="model", code="adapter_incompatible")


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's factors for ``LoraLinear``: module path -> (A [r, in], B [out, r]), fp32,
    the LoRA scaling folded into B."""

    adapter_id: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    manifest: dict[str, Any]


def check_adapter_id(adapter_id: str) -> None:
    if not names.ADAPTER_ID.match(adapter_id):
        raise NotFound(f"The adapter {adapter_id!r} does not exist.", param="model",
                       code="model_not_found")


def fetch_adapter(storage: Any, adapter_id: str, cache_dir: Path) -> Path:
    """Copy an adapter folder from storage to ``cache_dir/<adapter_id>`` and return that path.

    Raises:
        NotFound: no complete adapter (no manifest) under that id.
        AdapterIncompatible: the folder holds pickled weights or no safetensors.
    """
    check_adapter_id(adapter_id)
    prefix = names.adapter_key(adapter_id)
    if not storage.exists(names.adapter_key(adapter_id, MANIFEST_FILE)):
        raise NotFound(f"The adapter {adapter_id!r} does not exist (or is still being written).",
                       param="model", code="model_not_found")
    files = {info.key.rsplit("/", 1)[-1] for info in storage.iter(prefix + "/")}
    wanted = _files_to_fetch(adapter_id, files)
    target = cache_dir / adapter_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
    try:
        for name in wanted:
            storage.download_file(names.adapter_key(adapter_id, name), str(staging / name))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _files_to_fetch(adapter_id: str, files: set[str]) -> list[str]:
    """The PEFT files and manifest of an adapter, or a full fine-tune's config, weights (one
    file or shards with their index) and manifest."""
    if CONFIG_FILE not in files and MODEL_CONFIG_FILE in files:
        _check_pickled(adapter_id, files)
        if not any(n.endswith(".safetensors") for n in files):
            raise AdapterIncompatible(f"The model {adapter_id!r} holds no safetensors weights.")
        return sorted(n for n in files if n.endswith((".safetensors", ".json")))
    _check_files(adapter_id, files)
    return [WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE]


def _check_pickled(adapter_id: str, files: set[str]) -> None:
    pickled = sorted(n for n in files if n.endswith(_PICKLED))
    if pickled:
        raise AdapterIncompatible(
            f"The adapter {adapter_id!r} holds pickled weights ({', '.join(pickled)}); "
            f"only safetensors are loaded. Re-save it with safetensors.")


def _check_files(adapter_id: str, files: set[str]) -> None:
    _check_pickled(adapter_id, files)
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if n not in files]
    if missing:
        raise AdapterIncompatible(f"The adapter {adapter_id!r} lacks {', '.join(missing)}.")


def check_manifest(manifest: Mapping[str, Any], *, base_model: str,
                   fingerprint: Mapping[str, str]) -> None:
    """Refuse an adapter that would produce garbage on this base model, or whose rank is above
    ``limits.MAX_LORA_RANK`` (which a job never trains: this guards adapters written by hand)."""
    name = manifest.get("job_id") or "adapter"
    if manifest.get("base_model") != base_model:
        raise AdapterIncompatible(
            f"The {name} was trained on {manifest.get('base_model')!r}, "
            f"but this deployment serves {base_model!r}.")
    for key in ("base_weights_hash", "template_hash"):
        if manifest.get(key) != fingerprint.get(key):
            what = "weights" if key == "base_weights_hash" else "chat template"
            raise AdapterIncompatible(
                f"The {name} was trained against different base {what} than the ones served "
                f"here ({key} {str(manifest.get(key))[:12]}… ≠ {str(fingerprint.get(key))[:12]}…); "
                "retrain it on the current base model.")
    rank = int((manifest.get("lora") or {}).get("r") or 0)
    if not manifest.get("full_finetune") and not 0 < rank <= limits.MAX_LORA_RANK:
        raise AdapterIncompatible(f"The {name} has LoRA rank {rank}; supported ranks are 1 to "
                                  f"{limits.MAX_LORA_RANK}.")


def read_adapter(path: Path, adapter_id: str, modules: Mapping[str, Any], *,
                 base_model: str, fingerprint: Mapping[str, str]) -> LoadedAdapter:
    """Check a local adapter folder against the base model and read its LoRA factors.

    ``modules`` maps PEFT module paths (``model.layers.0.self_attn.q_proj``) to objects with
    ``in_features`` and ``out_features`` (the engine's ``LoraLinear``s).
    """
    files = {p.name for p in path.iterdir()}
    _check_files(adapter_id, files)
    if MANIFEST_FILE not in files:
        raise NotFound(f"The adapter {adapter_id!r} does not exist.", param="model",
                       code="model_not_found")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    check_manifest(manifest, base_model=base_model, fingerprint=fingerprint)
    config = json.loads((path / CONFIG_FILE).read_text())
    scale = _scaling(adapter_id, config)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    factors = _pair_factors(adapter_id, tensors, modules)
    # One fused multiply: scaling B tensor by tensor costs ~80 µs per call under load.
    torch._foreach_mul_([b for _, b in factors.values()], scale)
    return LoadedAdapter(adapter_id=adapter_id, factors=factors, manifest=manifest)


def _scaling(adapter_id: str, config: Mapping[str, Any]) -> float:
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save")
                    if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={config.get('peft_type')}")
    if unsupported:
        raise AdapterIncompatible(f"The adapter {adapter_id!r} uses {', '.join(unsupported)}, "
                                  "which this server does not serve.")
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views into one buffer read in one go.

    ``safetensors.torch.load_file`` maps the file and faults it in page by page when first
    touched; one ``readinto`` and zero-copy views take a third of the time here (~20 MB r=16
    SmolLM2 adapter: ~7 ms against ~35 ms). The format is a little-endian u64 header size, a
    JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw data; nothing executes.
    """
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(data)
    size = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or 8 + size > len(data):
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError) as exc:  # a cut-short or corrupt copy
        raise AdapterIncompatible(f"{path.name} is not a complete safetensors file ({exc}); "
                                  "the adapter was written incompletely.") from None
    if not isinstance(header, dict):
        raise AdapterIncompatible(
            f"{path.name} is not a safetensors file: its header is not a JSON object.")
    start = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is None or not 0 <= begin <= end <= len(data) - start:
            raise AdapterIncompatible(f"{path.name}: tensor {name!r} has an unsupported dtype "
                                      f"{info['dtype']!r} or lies outside the file.")
        count = (end - begin) // dtype.itemsize
        if count != math.prod(info["shape"]) or count * dtype.itemsize != end - begin:
            raise AdapterIncompatible(f"{path.name}: tensor {name!r} has {end - begin} bytes "
                                      f"for shape {info['shape']}.")
        tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = tensor.view(info["shape"])
    return tensors


def _pair_factors(adapter_id: str, tensors: dict[str, torch.Tensor],
                  modules: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in stem:
                pairs.setdefault(stem.split(marker)[0], {})[part] = tensor
                break
        else:
            raise AdapterIncompatible(f"The adapter {adapter_id!r} holds {key!r}, which is not a "
                                      "LoRA A/B weight of a supported module.")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, pair in pairs.items():
        module = modules.get(path)
        if module is None or set(pair) != {"lora_A", "lora_B"}:
            raise AdapterIncompatible(f"The adapter {adapter_id!r} targets {path!r}, which this "
                                      "server cannot apply an adapter to.")
        a, b = pair["lora_A"], pair["lora_B"]  # PEFT: A [r, in], B [out, r]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features \
                or a.shape[0] != b.shape[1]:
            raise AdapterIncompatible(f"The adapter {adapter_id!r} has shapes {tuple(a.shape)} / "
                                      f"{tuple(b.shape)} for {path!r}, which do not fit the base "
                                      "model.")
        # Kept in PEFT's layout (F.linear takes it as is): no copies, which keeps loading fast.
        factors[path] = (a.float(), b.float())
    return factors


class AdapterCache:
    """An LRU of adapters loaded into an engine, for the in-process back end.

    (The Serve deployment uses ``@serve.multiplexed``, which keeps the same LRU per replica.)
    Concurrent requests for one adapter share one load.
    """

    def __init__(self, capacity: int, load: Callable[[str], None],
                 unload: Callable[[str], None]):
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._loading: dict[str, asyncio.Task[None]] = {}

    @property
    def loaded(self) -> list[str]:
        """Adapter ids from least to most recently used."""
        return list(self._loaded)

    async def get(self, adapter_id: str) -> float | None:
        """Make sure ``adapter_id`` is loaded, marking it most recently used.

        Returns the seconds the load took if this call started it (a hot-load), else None.
        """
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return None
        task = self._loading.get(adapter_id)
        if task is not None:  # another request is loading it: share that load
            await asyncio.shield(task)
            return None
        task = asyncio.create_task(self._fetch(adapter_id))
        self._loading[adapter_id] = task
        return await asyncio.shield(task)

    async def _fetch(self, adapter_id: str) -> float:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._load, adapter_id)
            seconds = time.perf_counter() - started
            self._loaded[adapter_id] = None
            while len(self._loaded) > self.capacity:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("evicting adapter %s (LRU)", evicted)
                self._unload(evicted)
            return seconds
        finally:
            self._loading.pop(adapter_id, None)

    def evict(self, adapter_id: str) -> bool:
        if adapter_id not in self._loaded:
            return False
        del self._loaded[adapter_id]
        self._unload(adapter_id)
        return True
