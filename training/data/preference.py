"""Preference files in storage → tokenised (chosen, rejected) pairs → stacked micro-batches.

The same steps as SFT data (``training.data.examples``), for pairs:
1. read and normalise the files (``data.read_examples``; every line is
   ``{"prompt": [messages], "chosen": str, "rejected": str}``);
2. tokenise each pair with the chat template, labels on the final response and its end-of-turn
   marker only (``chat.tokenize_preference``, the SFT mask); pairs whose mask cannot be derived
   or whose responses do not fit ``max_length`` are dropped, counted and reported;
3. rank 0 stores the split under ``jobs/<job_id>/data/<split>/`` (``stats.json`` last), the
   other ranks load it.

``micro_batches`` puts the chosen and the rejected sequences of several pairs in one batch, so
that one forward pass scores both: stacked as padded rows (chosen rows first, then rejected) or
packed several to a row. Either way ``sequence_ids`` says which sequence each token belongs to:
chosen of pair i is sequence i, rejected of pair i is sequence m + i (m pairs in the batch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk

from service.core.errors import InvalidRequest
from training.model import chat
from training.data import packing
from training.data.examples import SplitStats, read_examples

Example = packing.Example


@dataclass(frozen=True)
class Pair:
    index: int
    """Position in its split: keys the pair's reference log-probs."""
    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None
    """Reference log-probs (chosen, rejected), once computed (``training.recipes.reference``)."""

    @property
    def n_tokens(self) -> int:
        return len(self.chosen[0]) + len(self.rejected[0])


def fingerprint(file_ids: list[str], template_hash: str, max_length: int) -> str:
    text = json.dumps(["dpo", file_ids, template_hash, max_length, 1])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenize_pairs(tokenizer: Any, examples: list[tuple[int, dict]], max_length: int,
                   file_id: str, stats: SplitStats) -> Iterator[tuple[Example, Example]]:
    """Yield ``(chosen, rejected)`` token/label lists per usable pair; count the dropped ones."""
    for line, example in examples:
        stats.n_lines += 1
        if "chosen" not in example:
            stats.n_rejected += 1
            stats.note(file_id, line, "rejected: a conversation, not a preference pair")
            continue
        pair = stats.tokenized(file_id, line, lambda: chat.tokenize_preference(
            tokenizer, example["prompt"], example["chosen"], example["rejected"], max_length))
        if pair is None:
            continue
        sides = tuple((list(t.input_ids), list(t.labels)) for t in pair)
        stats.n_examples += 1
        for ids, labels in sides:
            stats.n_tokens += len(ids)
            stats.n_supervised += sum(1 for y in labels[1:] if y != chat.IGNORE_INDEX)
        yield sides  # type: ignore[misc]


def build_split(storage: Any, tokenizer: Any, file_ids: list[str], max_length: int,
                template_hash: str) -> tuple[Dataset, SplitStats]:
    """Read and tokenise the pairs of one split (column ``source`` = index into ``file_ids``)."""
    stats = SplitStats(fingerprint=fingerprint(file_ids, template_hash, max_length),
                       file_hashes={})
    columns: dict[str, list] = {name: [] for name in (
        "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "source")}
    for source, file_id in enumerate(file_ids):
        examples, digest = read_examples(storage, file_id, stats)
        stats.file_hashes[file_id] = digest
        for chosen, rejected in tokenize_pairs(tokenizer, examples, max_length, file_id, stats):
            columns["chosen_input_ids"].append(chosen[0])
            columns["chosen_labels"].append(chosen[1])
            columns["rejected_input_ids"].append(rejected[0])
            columns["rejected_labels"].append(rejected[1])
            columns["source"].append(source)
    if stats.n_examples == 0:
        detail = "; ".join(stats.problems[:5]) or "the files hold no preference pairs"
        raise InvalidRequest(f"no trainable preference pair left in {', '.join(file_ids)}: "
                             f"{detail}", param="training_file", code="invalid_training_file")
    return Dataset.from_dict(columns), stats


def load_pairs(storage: Any, prefix: str, local_dir: Path) -> tuple[list[Pair], list[int]]:
    """Download a stored split into ``local_dir``; return its pairs and their sources."""
    storage.download_prefix(prefix, str(local_dir))
    columns = load_from_disk(str(local_dir)).to_dict()
    pairs = [Pair(i, (ci, cl), (ri, rl)) for i, (ci, cl, ri, rl) in enumerate(zip(
        columns["chosen_input_ids"], columns["chosen_labels"], columns["rejected_input_ids"],
        columns["rejected_labels"], strict=True))]
    return pairs, columns["source"]


# -- batches ---------------------------------------------------------------------------------

def collate_stacked(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded rows: the m chosen sequences, then the m rejected ones (B = 2m)."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = packing.collate_padded(sequences, pad_id)
    rows = torch.arange(len(sequences)).unsqueeze(1).expand_as(batch["input_ids"])
    batch["sequence_ids"] = torch.where(batch["attention_mask"].bool(), rows, -1)
    return _with_pair_fields(batch, pairs)


def collate_packed(pairs: Sequence[Pair], share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One row (B = 1) holding each pair's chosen and rejected sequences back to back; position
    ids restart at 0 for each, so no sequence attends to another. ``share_prefix``: a pair's
    prompt is computed once and both answers attend to it (``packing.collate_groups``)."""
    batch, owners = packing.collate_groups([(p.chosen, p.rejected) for p in pairs], share_prefix)
    m = len(pairs)
    # Example 2i is pair i's chosen answer (sequence i), 2i+1 its rejected one (sequence m+i).
    sequence = [-1 if o < 0 else o // 2 + (o % 2) * m for o in owners]
    batch["sequence_ids"] = torch.tensor([sequence])
    return _with_pair_fields(batch, pairs)


def _with_pair_fields(batch: dict[str, torch.Tensor], pairs: Sequence[Pair]
                      ) -> dict[str, torch.Tensor]:
    """Add ``pair_index`` (m,) and, once known, ``reference_chosen``/``reference_rejected``."""
    batch["pair_index"] = torch.tensor([p.index for p in pairs])
    batch["tokens"] = torch.tensor(sum(p.n_tokens for p in pairs))  # the pairs' own, unpadded
    if all(p.reference is not None for p in pairs):
        batch["reference_chosen"] = torch.tensor([p.reference[0] for p in pairs])
        batch["reference_rejected"] = torch.tensor([p.reference[1] for p in pairs])
    return batch


def micro_batches(pairs: Sequence[Pair], *, packing_on: bool, pack_length: int,
                  micro_batch_size: int, pad_id: int, share_prefix: bool = False
                  ) -> list[dict[str, torch.Tensor]]:
    """Split one rank's pairs of a global batch into the micro-batches it accumulates.

    A pair is never split over micro-batches: its chosen and rejected log-probs are needed
    together by the loss. Packed rows take whole pairs up to ``pack_length`` tokens (a longer
    pair gets a row of its own); stacked batches take ``micro_batch_size`` pairs.
    """
    if not pairs:
        return []
    if packing_on:
        rows = packing.pack_rows([p.n_tokens for p in pairs], pack_length)
        return [collate_packed([pairs[i] for i in row], share_prefix) for row in rows]
    ordered = sorted(pairs, key=lambda p: p.n_tokens)  # less padding; the loss is a sum
    return [collate_stacked(ordered[i:i + micro_batch_size], pad_id)
            for i in range(0, len(ordered), micro_batch_size)]
