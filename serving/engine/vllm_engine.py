"""vLLM as a chat engine, behind the same surface as ours (``serving.engine.native.Engine``).

vLLM runs in a process of its own (``vllm_worker``, in the Python that has vLLM: its torch and
transformers pins clash with ours). This side keeps everything the API relies on: the chat
template and tokenizer of training (prompts go over as token ids), the token budget and its
errors, the adapter manifest check, capacity, and our ``Generation``/``Chunk`` stream. Adapters
become vLLM LoRA requests; vLLM's CPU-side LoRA cache (``max_cpu_loras``) is as large as the
replica's adapter LRU, so an adapter our LRU holds is one vLLM holds.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from service.core import limits
from serving.adapters import (
    CONFIG_FILE,
    MANIFEST_FILE,
    AdapterIncompatible,
    _check_files,
    _scaling,
    check_manifest,
)
from serving.engine.generation import END, Chunk, Generation
from serving.engine.native import AdapterNotLoaded, at_capacity, token_budget
from serving.engine.sampling import SamplingParams, TokenBytes

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
START_TIMEOUT_S = 900
RUN_BY_PATH = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


class VllmEngine:
    """Generates for one base model through a vLLM engine process."""

    def __init__(self, model_dir: Path, tokenizer: Any, *, python: str, base_model: str,
                 fingerprint: dict[str, str], eot_ids: list[int], max_context: int,
                 vocab_size: int, device: str = "cpu", dtype: str = "float32",
                 max_batch: int = 16, max_pending: int = 64, max_adapters: int = 4,
                 default_max_tokens: int = limits.MAX_TOKENS, kv_cache_gib: int = 1):
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.fingerprint = fingerprint
        self.eot_ids = list(eot_ids)
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.max_pending = max_pending
        self.default_max_tokens = default_max_tokens
        self.token_bytes = TokenBytes(tokenizer)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[str, tuple[Generation, int]] = {}
        self._replies: dict[str, Future[None]] = {}
        self._in_flight = 0
        self._adapters: dict[str, dict[str, Any]] = {}  # id -> {"lora", "users", "retired"}
        self._closed = False
        self._device = device
        config = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_context,
                  "max_num_seqs": max_batch, "max_loras": max(1, min(max_adapters, max_batch)),
                  "max_cpu_loras": max(1, max_adapters), "max_lora_rank": limits.MAX_LORA_RANK,
                  "enforce_eager": device == "cpu"}
        env = dict(os.environ)
        if device == "cpu":
            # The engine core in this process: one fewer process (and copy of the model) on a
            # small CPU machine; vLLM's CPU KV cache is sized in GiB.
            env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # -I: none of this process's PYTHONPATH; by path, so no module of ours is imported.
        self._proc = subprocess.Popen(
            [python, "-I", "-c", RUN_BY_PATH, str(WORKER), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self._ready: Future[None] = Future()
        self._reader = threading.Thread(target=self._read, name=f"vllm-{base_model}",
                                        daemon=True)
        self._reader.start()
        try:
            self._ready.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_base_model(cls, base_model: str, storage: Any = None, *, python: str,
                       overrides: dict[str, str] | None = None, **kwargs: Any) -> VllmEngine:
        """Resolve ``base_model`` with the registry training uses and start vLLM on it."""
        from training.model import chat, registry

        path = registry.resolve_model(base_model, storage, overrides)
        tokenizer = registry.load_tokenizer(path)
        config = json.loads((path / "config.json").read_text())
        return cls(path, tokenizer, python=python, base_model=base_model,
                   fingerprint=registry.model_fingerprint(path),
                   eot_ids=chat.end_of_turn_ids(tokenizer),
                   max_context=int(config["max_position_embeddings"]),
                   vocab_size=int(config["vocab_size"]), **kwargs)

    # -- the process ----------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            op = message["op"]
            if op == "ready":
                self._ready.set_result(None)
            elif op == "fatal":
                self._ready.set_exception(RuntimeError(f"vLLM did not start: {message['message']}"))
            elif op == "reply":
                future = self._replies.pop(message["id"], None)
                if future is not None:
                    error = message.get("error")
                    if error:
                        future.set_exception(AdapterIncompatible(f"vLLM cannot load it: {error}"))
                    else:
                        future.set_result(None)
            elif op in ("out", "error"):
                self._on_output(message)
        # The process ended: fail whatever waits on it.
        error = RuntimeError(f"the vLLM engine process exited ({self._proc.wait()})")
        if not self._ready.done():
            self._ready.set_exception(error)
        with self._lock:
            streams, self._streams = self._streams, {}
        for generation, _ in streams.values():
            generation._put(error)
            generation._put(END)

    def _on_output(self, message: dict[str, Any]) -> None:
        rid = message["id"]
        with self._lock:
            entry = self._streams.get(rid)
        if entry is None:
            return
        generation, index = entry
        if message["op"] == "error":
            self._end(rid, generation, RuntimeError(message["message"]))
            return
        logprobs = None if message["logprobs"] is None else [
            self._logprob_entry(*e) for e in message["logprobs"]]
        finish = message["finish"]
        if finish is not None:
            self._end(rid, generation, Chunk(message["text"], "length" if finish == "length"
                                             else "stop", generation.prompt_tokens,
                                             message["tokens"], index=index, logprobs=logprobs))
        elif generation.cancelled:
            self._send({"op": "abort", "id": rid})
            self._end(rid, generation, None)
        elif message["text"] or logprobs:
            generation._put(Chunk(message["text"], index=index, logprobs=logprobs))

    def _end(self, rid: str, generation: Generation, last: Chunk | BaseException | None) -> None:
        with self._lock:
            if self._streams.pop(rid, None) is None:
                return
            self._in_flight -= 1
            adapter_id = rid.split("|", 1)[1] or None
            self._release(adapter_id)
        if last is not None:
            generation._put(last)
        generation._put(END)

    def _logprob_entry(self, token: int, logprob: float, top: list[list[Any]]) -> dict:
        entry = self.token_bytes.entry(token, logprob)
        entry["top_logprobs"] = [self.token_bytes.entry(t, lp) for t, lp in top]
        return entry

    # -- adapters -------------------------------------------------------------------------

    def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Check the adapter folder as our engine does, then have vLLM load it (blocking)."""
        files = {p.name for p in path.iterdir()}
        _check_files(adapter_id, files)
        check_manifest(json.loads((path / MANIFEST_FILE).read_text()),
                       base_model=self.base_model, fingerprint=self.fingerprint)
        _scaling(adapter_id, json.loads((path / CONFIG_FILE).read_text()))
        with self._lock:
            known = self._adapters.get(adapter_id)
            if known is not None:
                known["retired"] = False
                return
            lora = {"name": adapter_id, "id": next(self._ids), "path": str(path)}
        rid = f"lora-{lora['id']}"
        future: Future[None] = Future()
        self._replies[rid] = future
        self._send({"op": "add_lora", "id": rid, "lora": lora})
        future.result(timeout=300)
        with self._lock:
            self._adapters[adapter_id] = {"lora": lora, "users": 0, "retired": False}

    def remove_adapter(self, adapter_id: str) -> bool:
        """Unload an adapter; requests already using it finish first."""
        with self._lock:
            known = self._adapters.get(adapter_id)
            if known is None:
                return False
            known["retired"] = True
            if known["users"] == 0:
                self._drop(adapter_id)
            return True

    def _release(self, adapter_id: str | None) -> None:
        known = self._adapters.get(adapter_id) if adapter_id else None
        if known is not None:
            known["users"] -= 1
            if known["retired"] and known["users"] == 0:
                self._drop(adapter_id)

    def _drop(self, adapter_id: str) -> None:  # under self._lock
        lora = self._adapters.pop(adapter_id)["lora"]
        if not self._closed:
            self._proc.stdin.write(json.dumps({"op": "remove_lora", "lora_id": lora["id"]}) + "\n")
            self._proc.stdin.flush()

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return [a for a, s in self._adapters.items() if not s["retired"]]

    # -- requests -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._proc.poll() is None and not self._closed

    @property
    def load(self) -> tuple[int, int]:
        """(requests in flight, 0): vLLM keeps its own queue."""
        with self._lock:
            return self._in_flight, 0

    def submit(self, prompt: list[int], params: SamplingParams,
               adapter_id: str | None = None, n: int = 1) -> Generation:
        """Queue a request; the same contract (and errors) as ``native.Engine.submit``."""
        budget = token_budget(len(prompt), params.max_tokens, self.max_context,
                              self.default_max_tokens)
        sampling = {"max_tokens": budget, "temperature": params.temperature,
                    "top_p": params.top_p, "stop": list(params.stop),
                    "stop_token_ids": [] if params.ignore_eot else self.eot_ids,
                    "ignore_eos": params.ignore_eot, "logprobs": params.logprobs,
                    "frequency_penalty": params.frequency_penalty,
                    "presence_penalty": params.presence_penalty,
                    "logit_bias": [list(b) for b in params.logit_bias] or None,
                    "grammar": params.grammar}
        generation = Generation(prompt_tokens=len(prompt), choices=n)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._in_flight + n > self.max_pending:
                raise at_capacity(self.base_model, self.max_pending)
            lora = None
            if adapter_id is not None:
                known = self._adapters.get(adapter_id)
                if known is None or known["retired"]:
                    raise AdapterNotLoaded(adapter_id)
                known["users"] += n
                lora = known["lora"]
            first = next(self._ids)
            rids = [f"{first}.{i}|{adapter_id or ''}" for i in range(n)]
            for i, rid in enumerate(rids):
                self._streams[rid] = (generation, i)
            self._in_flight += n
        # Choice i samples with seed + i, as in our engine.
        for i, rid in enumerate(rids):
            seed = None if params.seed is None else params.seed + i
            self._send({"op": "generate", "id": rid, "prompt": prompt, "lora": lora,
                        "params": sampling | {"seed": seed}})
        return generation

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self._proc.stdin.close()
            # On a CPU (engine core in the worker) vLLM's shutdown is tens of seconds of nothing
            # worth waiting for; on a GPU its engine-core process must be let go first.
            self._proc.wait(timeout=5 if self._device == "cpu" else 60)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()

