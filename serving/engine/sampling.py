"""Per-request sampling settings, token sampling, incremental detokenising, and stop-string
detection on decoded text."""

from __future__ import annotations

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


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> int:
    """One token from ``logits`` [vocab] (any float dtype) under ``params``."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scaled = logits.float() / params.temperature
    if not torch.isfinite(scaled).all():  # a temperature so small the logits overflow: greedy
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
