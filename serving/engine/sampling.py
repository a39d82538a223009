"""Per-request sampling settings, logit processing (bias, penalties), token sampling, log-probs,
incremental detokenising, and stop-string detection on decoded text."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """Completion tokens at most (``finish_reason="length"`` there); None: the engine's default
    cap, or what the context leaves."""
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int | None = None
    """Makes sampling reproducible for the same prompt, adapter and settings."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the matched stop string is not returned."""
    ignore_eot: bool = False
    """Keep going past the end-of-turn token (benchmarks use it for fixed-length answers)."""
    logprobs: int | None = None
    """None: no log-probs; k: each token's log-prob and the k most likely alternatives."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is already in the answer (OpenAI's)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit once if it is already in the answer."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits; ±100 bans or forces a token."""
    grammar: str | None = None
    """An llguidance grammar (``serving.engine.grammar``) the answer must follow."""

    @property
    def plain(self) -> bool:
        """Sampling from the raw logits, nothing to add or report."""
        return (self.logprobs is None and not self.frequency_penalty
                and not self.presence_penalty and not self.logit_bias and self.grammar is None)


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def adjust_logits(logits: torch.Tensor, params: SamplingParams, answer: list[int]) -> None:
    """Add ``params``' logit bias and penalties to ``logits`` [vocab] (float32) in place;
    ``answer`` is the tokens generated so far (OpenAI penalises the answer, not the prompt)."""
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        logits[torch.tensor(ids)] += torch.tensor(biases, dtype=logits.dtype)
    if answer and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(answer), minlength=logits.shape[0])[:logits.shape[0]]
        logits -= counts.to(logits.dtype) * params.frequency_penalty
        logits -= (counts > 0).to(logits.dtype) * params.presence_penalty


class TokenBytes:
    """A token id's bytes and text, for log-prob entries (OpenAI's ``token`` and ``bytes``).

    Byte-level BPE vocabularies (GPT-2's, SmolLM2's) spell each byte as one printable
    character; their tokens are mapped back through that table, so a token holding half a
    UTF-8 character gets its true bytes. Other tokens are decoded on their own.
    """

    def __init__(self, tokenizer: Any):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._special = set(getattr(tokenizer, "all_special_ids", ()))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one per engine, lives as long as it
    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id not in self._special and isinstance(piece, str) and piece and all(
                c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}


def logprob_entry(logprobs: torch.Tensor, token: int, k: int, names: TokenBytes) -> dict:
    """OpenAI's ``ChatCompletionTokenLogprob`` for ``token`` from ``logprobs`` [vocab]: its
    log-prob and the ``k`` most likely tokens (the same distribution it was sampled from)."""
    entry = names.entry(token, float(logprobs[token]))
    if k:
        values, ids = torch.topk(logprobs, k)
        # Tokens a grammar or a -100 bias rules out have no probability: fewer are listed.
        entry["top_logprobs"] = [names.entry(int(i), float(v))
                                 for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                                 if v != float("-inf")]
    else:
        entry["top_logprobs"] = []
    return entry


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> int:
    """One token from ``logits`` [vocab] (any float dtype) under ``params``."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.float() / params.temperature
    # A temperature so small the logits overflow to +inf: greedy. (-inf is a token a grammar or
    # a -100 bias ruled out: it just gets no probability.)
    if bool(torch.isposinf(scaled).any() or torch.isnan(scaled).any()):
        return int(torch.argmax(logits))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False  # a top_p below float32's smallest value rounds to 0 in the compare
        sorted_probs[outside] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class StopText:
    """Tracks the decoded answer and decides how much of it may be sent so far.

    Text that could still turn into a stop string, or that ends in half a UTF-8 character,
    is held back until the next token settles it.
    """

    stop: tuple[str, ...]
    sent: int = 0
    """Characters of the answer already handed out."""
    stopped: bool = field(default=False)

    def update(self, text: str, *, final: bool = False) -> str:
        """Given the whole answer decoded so far, return the new text that may be sent."""
        hit = self._first_stop(text)
        if hit is not None:
            self.stopped = True
            end = hit
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held_back(text)
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def _first_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        # A stop string can only start where it could overlap text not yet sent.
        start = max(0, self.sent - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return len(text) - len(text.rstrip("\ufffd"))
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


@dataclass
class IncrementalText:
    """A request's answer decoded token by token, each step decoding a few tokens, not all.

    Decoding the whole answer at every step costs O(length) per row (0.8 ms at 2,000 tokens
    here). As text-generation-inference does, decode the tokens since ``_prefix`` without and
    with the unsettled ones and append the difference: a few tokens of context keep what a
    tokenizer does at word starts right. New text ending in half a UTF-8 character waits for
    the next token.
    """

    tokenizer: Any
    text: str = ""
    """The answer decoded so far."""
    _prefix: int = 0
    _read: int = 0

    def update(self, tokens: list[int], *, final: bool = False) -> str:
        """Given every answer token so far, return the answer decoded so far."""
        decode = self.tokenizer.decode
        settled = decode(tokens[self._prefix:self._read], skip_special_tokens=True)
        window = decode(tokens[self._prefix:], skip_special_tokens=True)
        if len(window) > len(settled) and (final or not window.endswith("\ufffd")):
            self.text += window[len(settled):]
            self._prefix, self._read = self._read, len(tokens)
        return self.text
