"""Constrained decoding: the answer follows a JSON schema (or is any JSON object) token by token.

llguidance compiles a JSON schema into a grammar and, for each row, computes which tokens may
come next as a bitmask over the vocabulary (a few microseconds to a millisecond; it never
blocks on a large vocabulary), which we apply to that row's logits before sampling. Rows of one
batch carry their own matcher, so constrained and free rows decode together in one forward pass.
When the grammar is complete only the end-of-turn token is allowed, so the answer ends there.
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf
import torch

from service.core.errors import InvalidRequest

SCHEMA_PARAM = "response_format.json_schema.schema"
_COMPILE = {"whitespace_flexible": False}
"""Compact JSON: no runs of whitespace for a weak model to wander into."""


def json_schema_grammar(schema: dict[str, Any], param: str = SCHEMA_PARAM) -> str:
    """The grammar of JSON values valid under ``schema``; ``InvalidRequest`` naming ``param``
    when it cannot be compiled (bad or unsupported JSON Schema)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPILE)
    except ValueError as exc:
        raise InvalidRequest(f"{param} is not a JSON schema: {exc}", param=param) from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise InvalidRequest(f"{param} cannot be enforced: {error.strip()}", param=param)
    return grammar


def json_object_grammar() -> str:
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    return json_schema_grammar({"type": "object"})


class Grammars:
    """One engine's matchers: its tokenizer in llguidance's form (built on first use, ~0.3 s)
    and the per-step masks of a batch's constrained rows."""

    def __init__(self, tokenizer: Any, end_of_turn: int):
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def matcher(self, grammar: str, param: str = SCHEMA_PARAM) -> llguidance.LLMatcher:
        with self._lock:
            if self._ll is None:
                # Its "end of sequence" is the template's end of turn: the token that ends an
                # answer here, allowed exactly when the grammar is complete.
                self._ll = llguidance.hf.from_tokenizer(self.tokenizer,
                                                        eos_token=self.end_of_turn)
        matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{param} cannot be enforced: {matcher.get_error()}",
                                 param=param)
        return matcher

    def mask(self, logits: torch.Tensor,
             matchers: list[tuple[int, llguidance.LLMatcher]]) -> None:
        """Set to -inf, in place, the logits [B, V] each (row, matcher) does not allow."""
        assert self._ll is not None  # a matcher exists
        vocab = min(self._ll.vocab_size, logits.shape[1])
        words = (self._ll.vocab_size + 31) // 32
        bits = torch.full((len(matchers), words), -1, dtype=torch.int32)
        for i, (_, matcher) in enumerate(matchers):
            row = bits[i]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
        rows = torch.tensor([r for r, _ in matchers])
        # Model vocabularies padded past the tokenizer's have no text: never allowed.
        logits[rows, vocab:] = float("-inf")
        logits[rows, :vocab] = logits[rows, :vocab].masked_fill(~allowed, float("-inf"))
