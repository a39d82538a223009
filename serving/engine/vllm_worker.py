"""The vLLM engine process: runs in the Python that has vLLM, driven by ``vllm_engine``.

vLLM pins torch and transformers that clash with ours, so it lives in its own venv and this
file is all of ours that runs there: standard library and vLLM only, started by path (not as
a package module) so nothing of ours is imported. It speaks JSON lines on stdin (requests) and
on the process's original stdout (outputs); vLLM's own logging goes to stderr.

Requests: ``generate`` (token ids in, the client rendered the chat template), ``abort``,
``add_lora`` (load it now, so a bad adapter fails its own request), ``remove_lora``, ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import traceback
from typing import Any


def main() -> None:
    config = json.loads(sys.argv[1])
    # Our protocol owns the real stdout; everything printed by vLLM goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    asyncio.run(Worker(config, out).run())


class Worker:
    def __init__(self, config: dict[str, Any], out: Any):
        self.config = config
        self.out = out
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.loras: dict[int, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")

    async def run(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        args = AsyncEngineArgs(
            model=c["model"], tokenizer=c["model"], dtype=c["dtype"], seed=c.get("seed", 0),
            max_model_len=c["max_model_len"], max_num_seqs=c["max_num_seqs"],
            enable_lora=True, max_loras=c["max_loras"], max_cpu_loras=c["max_cpu_loras"],
            max_lora_rank=c["max_lora_rank"], enable_prefix_caching=True,
            gpu_memory_utilization=c.get("gpu_memory_utilization", 0.85),
            structured_outputs_config={"backend": "guidance"},
            # Our engine reports log-probs of the logits after penalties, bias and grammar.
            logprobs_mode="processed_logprobs",
            enforce_eager=c.get("enforce_eager", False))
        try:
            self.engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            self.send({"op": "fatal", "message": f"{type(exc).__name__}: {exc}"})
            raise
        self.send({"op": "ready"})
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, None)  # the client went away

        threading.Thread(target=read_stdin, daemon=True).start()
        while (line := await lines.get()) is not None:
            message = json.loads(line)
            op = message["op"]
            if op == "stop":
                break
            if op == "generate":
                self.tasks[message["id"]] = asyncio.create_task(self.generate(message))
            elif op == "abort":
                await self.engine.abort(message["id"])
            elif op == "add_lora":
                asyncio.create_task(self.add_lora(message))
            elif op == "remove_lora":
                self.loras.pop(message["lora_id"], None)
                await self.engine.remove_lora(message["lora_id"])
        for task in self.tasks.values():
            task.cancel()
        self.engine.shutdown()

    def lora_request(self, lora: dict[str, Any] | None) -> Any:
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora["name"], lora["id"], lora["path"])

    async def add_lora(self, message: dict[str, Any]) -> None:
        try:
            await self.engine.add_lora(self.lora_request(message["lora"]))
            self.send({"op": "reply", "id": message["id"]})
        except Exception as exc:  # noqa: BLE001 - the client raises it in the caller
            self.send({"op": "reply", "id": message["id"], "error": f"{exc}"})

    async def generate(self, message: dict[str, Any]) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        rid, p = message["id"], message["params"]
        grammar = p.pop("grammar", None)
        bias = p.pop("logit_bias", None)
        params = SamplingParams(
            **p, output_kind=RequestOutputKind.DELTA,
            logit_bias={int(k): v for k, v in bias} if bias else None,
            structured_outputs=None if grammar is None else StructuredOutputsParams(
                grammar=_as_lark(grammar)))
        prompt = TokensPrompt(prompt_token_ids=message["prompt"])
        produced = 0
        try:
            async for output in self.engine.generate(prompt, params, rid,
                                                     lora_request=self.lora_request(
                                                         message.get("lora"))):
                piece = output.outputs[0]
                produced += len(piece.token_ids)
                self.send({"op": "out", "id": rid, "text": piece.text, "tokens": produced,
                           "finish": piece.finish_reason if output.finished else None,
                           "logprobs": _logprobs(piece, p.get("logprobs"))})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this request fails, the engine goes on
            traceback.print_exc()
            self.send({"op": "error", "id": rid, "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.tasks.pop(rid, None)


def _as_lark(grammar: str) -> str:
    """Our llguidance grammar (JSON, one JSON-schema or Lark grammar) in the Lark form vLLM's
    guidance back end takes; the schema keeps its ``x-guidance`` options (compact JSON)."""
    spec = json.loads(grammar)["grammars"]
    if len(spec) != 1:
        raise ValueError("only single grammars are supported")
    if spec[0].get("json_schema") is not None:
        return "start: %json " + json.dumps(spec[0]["json_schema"])
    return spec[0]["lark_grammar"]


def _logprobs(piece: Any, k: int | None) -> list[Any] | None:
    """Each new token's ``[id, logprob, [[id, logprob] × k most likely]]``; the client names
    the tokens (it has the tokenizer that matches ours byte for byte)."""
    if k is None or piece.logprobs is None:
        return None
    entries = []
    for token, ranked in zip(piece.token_ids, piece.logprobs, strict=False):
        top = sorted(((t, lp.logprob) for t, lp in ranked.items()
                      if lp.rank is not None and lp.rank <= k), key=lambda e: -e[1])[:k]
        entries.append([token, ranked[token].logprob, top])
    return entries


if __name__ == "__main__":
    main()
