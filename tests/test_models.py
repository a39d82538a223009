"""The model registry: the built-in SmolLM2 offline, the tiny test model, overrides, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from service.core.errors import InvalidRequest, NotFound
from service.core.storage import open_storage
from service.core.storage.config import StorageConfig
from tests.helpers import REPO
from training.model import registry as models
from training.model.chat import end_of_turn_ids, render_prompt
from training.model.registry import (
    BUILTIN_MODEL_ID,
    TINY_MODEL_ID,
    base_model_ids,
    load_model,
    load_tokenizer,
    model_fingerprint,
    model_slug,
    resolve_model,
)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def use_cache(monkeypatch, path) -> None:
    """Point the local model cache somewhere fresh: a new machine, as far as models go."""
    monkeypatch.setenv("TUNESERVE_MODEL_CACHE", str(path))


def no_gguf_access(monkeypatch) -> None:
    def refuse():
        raise AssertionError("the GGUF file was opened again")

    monkeypatch.setattr(models, "gguf_path", refuse)


@pytest.fixture
def big_tmp(tmp_path):
    """A temporary directory removed right after the test (three copies of 517 MB weights)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_builtin_model_converts_once_then_loads_from_cache(big_tmp, monkeypatch):
    tmp_path = big_tmp
    storage = open_storage(StorageConfig(uri=str(tmp_path / "storage")))
    use_cache(monkeypatch, tmp_path / "node-a")
    conversions = models.gguf_conversions[BUILTIN_MODEL_ID]

    started = time.monotonic()
    model_dir = resolve_model(BUILTIN_MODEL_ID, storage)
    first_load = time.monotonic() - started
    assert models.gguf_conversions[BUILTIN_MODEL_ID] == conversions + 1

    # A plain Hugging Face model now: safetensors, no GGUF quantization config left behind.
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert sorted(p.name for p in model_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(model_dir.glob("*.gguf"))
    assert storage.exists(f"models/{model_slug(BUILTIN_MODEL_ID)}/tuneserve-model.json")

    # It is SmolLM2-Instruct: it answers, and stops at its end-of-turn token.
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    prompt = torch.tensor([render_prompt(tokenizer, [{"role": "user", "content": "What is 2+2?"}])])
    out = model.generate(prompt, max_new_tokens=12, do_sample=False,
                         eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "4" in answer, answer

    # Second load on the same machine, then on another machine sharing the storage: no GGUF read.
    no_gguf_access(monkeypatch)
    started = time.monotonic()
    assert resolve_model(BUILTIN_MODEL_ID, storage) == model_dir
    load_model(model_dir)
    cached_load = time.monotonic() - started

    use_cache(monkeypatch, tmp_path / "node-b")
    started = time.monotonic()
    other = resolve_model(BUILTIN_MODEL_ID, storage)
    from_storage = time.monotonic() - started
    assert other != model_dir
    assert model_fingerprint(other) == model_fingerprint(model_dir)
    assert models.gguf_conversions[BUILTIN_MODEL_ID] == conversions + 1

    print(f"\nbuilt-in model: first load (dequantize + save) {first_load:.1f} s, cached resolve + "
          f"load_model {cached_load:.2f} s, fetch from storage on a new node {from_storage:.1f} s")
    assert cached_load < 5


def test_tiny_model_is_deterministic_and_shared_through_s3(tmp_path, monkeypatch, s3_storage_config):
    storage = open_storage(s3_storage_config)
    slug = model_slug(TINY_MODEL_ID)
    use_cache(monkeypatch, tmp_path / "node-a")
    builds = models.model_builds[TINY_MODEL_ID]
    built = resolve_model(TINY_MODEL_ID, storage)
    assert models.model_builds[TINY_MODEL_ID] == builds + 1
    assert storage.exists(f"models/{slug}/model.safetensors")

    # Another node: fetched from S3, not built.
    use_cache(monkeypatch, tmp_path / "node-b")
    fetched = resolve_model(TINY_MODEL_ID, storage)
    assert models.model_builds[TINY_MODEL_ID] == builds + 1
    assert sha256(fetched / "model.safetensors") == sha256(built / "model.safetensors")

    # Two processes (think: two Ray workers) racing on a fresh cache, without storage: one builds,
    # the other waits for it; the bytes equal the first build's (fixed seed, same bytes).
    script = ("import json; from training.model import registry as models; "
              "p = models.resolve_model(models.TINY_MODEL_ID); "
              "print(json.dumps([str(p), models.model_builds[models.TINY_MODEL_ID]]))")
    env = {**os.environ, "TUNESERVE_MODEL_CACHE": str(tmp_path / "node-c")}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0].decode().strip().splitlines()[-1])
               for p in procs]
    assert results[0][0] == results[1][0]
    assert sorted(n for _, n in results) == [0, 1]
    rebuilt = tmp_path / "node-c" / slug
    assert sha256(rebuilt / "model.safetensors") == sha256(built / "model.safetensors")

    # A copy built before storage was configured is published once storage is there.
    late = open_storage(StorageConfig(uri=f"{s3_storage_config.uri}-late",
                                      endpoint_url=s3_storage_config.endpoint_url))
    use_cache(monkeypatch, tmp_path / "node-c")
    assert resolve_model(TINY_MODEL_ID, late) == rebuilt
    assert late.exists(f"models/{slug}/tuneserve-model.json")

    # The model itself: tiny, the SmolLM2 tokenizer and template, a sane forward pass.
    model, tokenizer = load_model(fetched), load_tokenizer(fetched)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer)) and torch.isfinite(logits).all()

    # An S3 prefix holding a Hugging Face model works as a base model too.
    uri = f"{s3_storage_config.uri}/models/{slug}"
    from_s3 = resolve_model("team/tiny", storage, overrides={"team/tiny": uri})
    assert sha256(from_s3 / "model.safetensors") == sha256(built / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_dir():
    return resolve_model(TINY_MODEL_ID)


def plain_copy(src, dst):
    """A user's own model directory: the files of a Hugging Face model, none of ours."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tuneserve-*"))
    return dst


def test_tiny_model_can_end_a_turn(tiny_dir):
    """The end-of-turn token's logit depends on the input, so a tuned tiny model can learn to end
    its answers. (It is also the pad token; Llama's zeroed padding row in the tied embeddings once
    held that logit at 0 for every input, and no tiny-model answer ever ended.)"""
    tokenizer = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir)
    eot = end_of_turn_ids(tokenizer)[0]
    assert model.get_input_embeddings().weight[eot].abs().sum() > 0
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}])
               for text in ("Hi", "Sort this list: [3, 1, 2]", "What is 2 + 2?")]
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0, -1, eot].item() for ids in prompts]
    assert len(set(logits)) == len(logits) and all(x != 0 for x in logits), logits


def test_pickle_only_directory_is_refused(tmp_path, tiny_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    for call in (lambda: resolve_model(str(pickled)),
                 lambda: resolve_model("me/pickled", overrides={"me/pickled": str(pickled)}),
                 lambda: load_model(pickled)):
        with pytest.raises(InvalidRequest, match=r"only pickle weights \(pytorch_model.bin\)") as info:
            call()
        assert info.value.param == "model"


def test_unknown_models_are_not_found(tmp_path):
    with pytest.raises(NotFound, match="known base models: HuggingFaceTB/SmolLM2-135M-Instruct"):
        resolve_model("no-such-model")
    with pytest.raises(NotFound, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))


def test_override_directory_and_its_fingerprint(tmp_path, tiny_dir):
    mine = plain_copy(tiny_dir, tmp_path / "mine")
    assert resolve_model("me/mine", overrides={"me/mine": str(mine)}) == mine
    first = model_fingerprint(mine)
    assert first == model_fingerprint(tiny_dir)  # same weights, same tokenizer
    assert (mine / "tuneserve-fingerprint.json").is_file()  # hashed once, then read back

    # Weights changed in place (same size): the cached hash must not be reused.
    weights = mine / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(mine)
    assert changed["base_weights_hash"] != first["base_weights_hash"]
    assert changed["template_hash"] == first["template_hash"]


def test_base_model_ids():
    assert base_model_ids() == [BUILTIN_MODEL_ID, TINY_MODEL_ID]
    assert base_model_ids({"org/a": "/x", TINY_MODEL_ID: "/y"}) == [BUILTIN_MODEL_ID, TINY_MODEL_ID, "org/a"]
    assert base_model_ids({"org/a": "/x"}, builtin=False) == ["org/a"]
