"""``string_check`` and ``text_similarity``: deterministic scores of one text against another.

The similarity metrics come from the libraries that define them, never re-implemented:
``fuzzy_match`` is rapidfuzz's normalised Indel similarity (``fuzz.ratio``), ``bleu`` is
sacrebleu's sentence BLEU, ``gleu`` NLTK's sentence GLEU (whitespace tokens), ``rouge_N`` and
``rouge_l`` Google's rouge-score F-measure; all scaled to 0..1.

``meteor`` and ``cosine`` are refused (``UNSUPPORTED``): both need data that no package we can
pin ships (WordNet for METEOR; embedding weights for cosine), and the service never downloads
at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from training.graders.specs import StringCheck

UNSUPPORTED = {
    "meteor": "METEOR needs NLTK's WordNet data, which no well-kept PyPI package ships and this "
              "service does not download at run time; use rouge_l, bleu or fuzzy_match",
    "cosine": "cosine needs an embedding model; none ships inside a well-kept PyPI package "
              "(model2vec, fastembed and sentence-transformers download weights from a hub) "
              "and this service does not download at run time; use fuzzy_match or rouge_l",
}


def string_check(grader: StringCheck, text: str, reference: str) -> float:
    """1.0 or 0.0. ``like``: ``reference`` occurs in ``text``; ``ilike`` ignores case."""
    passed = {"eq": text == reference, "ne": text != reference,
              "like": reference in text,
              "ilike": reference.casefold() in text.casefold()}[grader.operation]
    return 1.0 if passed else 0.0


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100.0


def bleu(text: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(text, [reference]).score / 100.0


def gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    if not text.split() or not reference.split():
        return 0.0
    return float(sentence_gleu([reference.split()], text.split()))


@cache
def _rouge(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


def _rouge_metric(kind: str) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        return float(_rouge(kind).score(reference, text)[kind].fmeasure)

    return score


SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu, "rouge_l": _rouge_metric("rougeL"),
    **{f"rouge_{n}": _rouge_metric(f"rouge{n}") for n in range(1, 6)},
}


def text_similarity(metric: str, text: str, reference: str) -> float:
    return SIMILARITY[metric](text, reference)
