"""The Self-Instruct filters: which generated instructions and instances join the pool.

As the paper (Wang et al., 2023, §2.3) and its code (``bootstrap_instructions.py``,
``prepare_for_finetuning.py``) filter: an instruction is dropped when it is too short or too
long, names something a text model cannot do (images, graphs, files, …), starts with punctuation
or a non-English character, repeats a pool instruction exactly, or has a ROUGE-L F-measure of
0.7 or more with any instruction already in the pool (seeds included). An instance is dropped
when its output is empty, repeats its input, or is too long; an instruction left with no
instance is dropped. ROUGE-L is Google's ``rouge-score`` (the implementation the paper's code
used), its tokenizer run once per pool instruction rather than once per comparison.

Every rejection is counted under the filter's name (``REASONS``), for the job's events and the
result file's description.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

from rouge_score import rouge_scorer, tokenizers

BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
             "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
             "diagram")
"""The paper's keywords for tasks a language model cannot carry out (and, as its code, any
instruction starting "Write a program")."""

REASONS = ("unparsable", "too_short", "too_long", "keyword", "punctuation_start",
           "non_english_start", "duplicate", "rouge_l", "no_instances", "quality")
"""Every filter, in the order they are tried (the first that rejects is counted)."""


@dataclass(frozen=True)
class FilterSettings:
    rouge_l_threshold: float = 0.7
    """A candidate whose ROUGE-L with any pool instruction is at least this is a near-copy."""
    min_words: int = 4
    """The paper drops instructions of three words or fewer."""
    max_words: int = 150
    max_output_chars: int = 2000
    """An instance output longer than this is dropped (the paper caps outputs too)."""


def words(text: str) -> int:
    return len(text.split())


def instruction_problem(text: str, settings: FilterSettings) -> str | None:
    """The first cheap filter ``text`` fails (a name from ``REASONS``), or None."""
    text = text.strip()
    if not text:
        return "unparsable"
    count = words(text)
    if count < settings.min_words:
        return "too_short"
    if count > settings.max_words:
        return "too_long"
    lowered = text.lower()
    if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in BLOCKLIST):
        return "keyword"
    if lowered.startswith("write a program"):  # the paper's code drops these too: their
        return "keyword"                        # outputs cannot be checked
    if text[0] in string.punctuation:
        return "punctuation_start"
    if not text[0].isascii():
        return "non_english_start"
    return None


class Pool:
    """The instructions so far (seeds and kept ones), with their ROUGE tokens, for dedup."""

    def __init__(self, instructions: list[str], threshold: float = 0.7):
        self.threshold = threshold
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._exact: set[str] = set()
        self._tokens: list[list[str]] = []
        self.instructions: list[str] = []
        for text in instructions:
            self.add(text)

    def __len__(self) -> int:
        return len(self.instructions)

    @staticmethod
    def _key(text: str) -> str:
        return " ".join(text.lower().split())

    def add(self, text: str) -> None:
        self.instructions.append(text)
        self._exact.add(self._key(text))
        self._tokens.append(self._tokenizer.tokenize(text))

    def is_duplicate(self, text: str) -> bool:
        """Exactly a pool instruction (case and spacing aside)."""
        return self._key(text) in self._exact

    def max_rouge_l(self, text: str) -> float:
        """The highest ROUGE-L F-measure of ``text`` with any pool instruction."""
        tokens = self._tokenizer.tokenize(text)
        best = 0.0
        for other in self._tokens:
            # rouge-score's own LCS scoring, on tokens made once per pool instruction.
            score = rouge_scorer._score_lcs(other, tokens).fmeasure
            if score > best:
                best = score
                if best >= self.threshold:
                    break  # rejected already: no need for the exact maximum
        return best

    def near_copy(self, text: str) -> bool:
        return self.max_rouge_l(text) >= self.threshold


def instance_ok(instance: dict[str, str], settings: FilterSettings) -> bool:
    output = instance.get("output", "").strip()
    if not output or len(output) > settings.max_output_chars:
        return False
    return output != instance.get("input", "").strip()


@dataclass
class Tally:
    """How many candidates each filter removed, and how many were kept."""

    removed: Counter[str] = field(default_factory=Counter)
    kept: int = 0
    candidates: int = 0

    def reject(self, reason: str) -> None:
        self.removed[reason] += 1

    def counts(self) -> dict[str, int]:
        return {reason: self.removed[reason] for reason in REASONS}


def screen(text: str, pool: Pool, settings: FilterSettings) -> str | None:
    """Why ``text`` may not join ``pool`` (a name from ``REASONS``), or None if it may.
    The exact and ROUGE-L checks come last: they read the whole pool."""
    problem = instruction_problem(text, settings)
    if problem is not None:
        return problem
    if pool.is_duplicate(text):
        return "duplicate"
    if pool.near_copy(text):
        return "rouge_l"
    return None
