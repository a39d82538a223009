"""From a tokenised split to the micro-batches one rank computes at one optimizer step.

The plan is a pure function of (seed, epoch, step), so every rank derives its shard without
talking to the others, and a resumed run continues at exactly the same example:

* ``epoch_order``: the examples of one epoch, each file's examples repeated by its weight
  (fractional parts sampled afresh each epoch, in a fixed count), shuffled with ``seed + epoch``.
* ``global_batch``: step ``b`` of the epoch takes ``order[b*B:(b+1)*B]`` (the last batch may be
  shorter); rank ``r`` of ``W`` takes every ``W``-th example of it, starting at ``r``. A rank may
  get no example at the tail; it still joins the gradient all-reduce (with zeros).
* ``micro_batches``: packed rows (several examples per row, position ids restarting at 0 for
  each, so they do not attend to each other) or padded rows of ``micro_batch_size`` examples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from training.losses.cross_entropy import IGNORE_INDEX
from training.spec import examples_per_epoch

Example = tuple[list[int], list[int]]
"""``(input_ids, labels)`` of one tokenised example."""


def epoch_order(sources: Sequence[int], weights: Sequence[float], seed: int,
                epoch: int) -> list[int]:
    """Indices of the examples seen in ``epoch``, in training order.

    ``sources[i]`` is the file index of example ``i`` and ``weights[f]`` that file's weight.
    The length does not depend on the epoch, so the number of steps is known up front.
    """
    rng = random.Random(f"{seed}:{epoch}")
    by_source: dict[int, list[int]] = {}
    for index, source in enumerate(sources):
        by_source.setdefault(source, []).append(index)
    order: list[int] = []
    for source, indices in sorted(by_source.items()):
        whole, fraction = divmod(weights[source], 1.0)
        order += indices * int(whole)
        order += rng.sample(indices, round(fraction * len(indices)))
    rng.shuffle(order)
    return order


def epoch_length(sources: Sequence[int], weights: Sequence[float]) -> int:
    counts: dict[int, int] = {}
    for source in sources:
        counts[source] = counts.get(source, 0) + 1
    return sum(examples_per_epoch(n, weights[s]) for s, n in counts.items())


def steps_per_epoch(n_seen: int, batch_size: int) -> int:
    return max(1, math.ceil(n_seen / batch_size))


def rank_share(order: Sequence[int], step_in_epoch: int, batch_size: int, rank: int,
               world_size: int) -> list[int]:
    """The example indices rank ``rank`` computes at step ``step_in_epoch`` of the epoch."""
    batch = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
    return list(batch[rank::world_size])


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: group example positions into rows of at most ``capacity`` tokens.

    An example longer than ``capacity`` gets a row of its own. Fewer, fuller rows mean fewer
    forward passes per step; nothing is padded, so a fuller row wastes nothing either.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[position]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(position)
                room[r] -= n
                break
        else:
            rows.append([position])
            room.append(capacity - n)
    return rows


def shared_prefix_length(examples: Sequence[Example]) -> int:
    """Leading tokens that every example of a row shares and that carry no loss.

    Chat data mostly starts the same way: the template's default system prompt, often a fixed
    instruction. Such a prefix needs computing once per row (``collate_packed``). It stops
    before the first supervised token and before any label that the prefix's last token would
    predict, and leaves every example at least one token of its own.
    """
    if len(examples) < 2:
        return 0
    first = examples[0][0]
    limit = min(len(ids) for ids, _ in examples) - 1
    length = 0
    while length < limit and all(ids[length] == first[length] and labels[length + 1] == IGNORE_INDEX
                                 for ids, labels in examples):
        length += 1
    return length


def trained_length(labels: Sequence[int]) -> int:
    """The tokens of an example that its loss depends on: through its last supervised one.

    What follows (a chat template's newline after the final end-of-turn marker) predicts no
    trained token, and no token before it attends to it: a row without it gives the same loss
    and gradients, and every layer computes that many positions fewer (one of a sort example's
    ~50 outside the shared prefix)."""
    for index in range(len(labels) - 1, -1, -1):
        if labels[index] != IGNORE_INDEX:
            return index + 1
    return len(labels)


def collate_packed(examples: Sequence[Example], share_prefix: bool = False
                   ) -> dict[str, torch.Tensor]:
    """One row (B=1) of several examples back to back, with position ids restarting at 0.

    No attention mask is passed: transformers (≥ 4.54, incl. 5.x) detects the restarts in
    ``position_ids`` and builds the block-diagonal causal mask for SDPA/eager, and
    ``cu_seq_lens_q`` (the segments' cumulative lengths) lets ``training.model.attention.PACKED``
    attend within each example without that mask. The first label of each example is ignored:
    it would be "predicted" from the previous example's last token. Each example ends at its
    last supervised token (``trained_length``).

    ``share_prefix`` (only with ``PACKED`` attention): the tokens all examples start with
    (``shared_prefix_length``) come once, and each example continues from it
    (``segment_parents``: the example's segment attends to the prefix's and to itself, its
    positions continuing the prefix's). Attention sees exactly what it sees unshared, so the loss
    and the gradients are the same; the prefix's work is done once instead of once per example.
    """
    return collate_groups([examples], share_prefix)[0]


def collate_groups(groups: Sequence[Sequence[Example]], share_prefix: bool
                   ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``collate_packed`` over several groups, each sharing its own prefix (a DPO pair's chosen
    and rejected answers share their prompt). Also returns, per token, which example (counted
    over all groups in order) it belongs to, or -1 for a shared prefix."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    owners: list[int] = []
    bounds, parents = [0], []
    example = 0
    for group in groups:
        prefix = shared_prefix_length(group) if share_prefix else 0
        parent = -1
        if prefix:
            input_ids += group[0][0][:prefix]
            labels += [IGNORE_INDEX] * prefix
            positions += range(prefix)
            owners += [-1] * prefix
            bounds.append(bounds[-1] + prefix)
            parent = len(parents)
            parents.append(-1)
        for ids, labs in group:
            keep = trained_length(labs)
            ids, labs = ids[:keep], labs[:keep]
            input_ids += ids[prefix:]
            labels += [IGNORE_INDEX, *labs[prefix + 1:]]
            positions += range(prefix, len(ids))
            owners += [example] * (len(ids) - prefix)
            bounds.append(bounds[-1] + len(ids) - prefix)
            parents.append(parent)
            example += 1
    batch = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions]),
             "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32)}
    if any(p >= 0 for p in parents):
        batch["segment_parents"] = torch.tensor(parents)
    return batch, owners


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input ids with ``pad_id``, labels with IGNORE_INDEX."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def micro_batches(examples: Sequence[Example], *, packing: bool, pack_length: int,
                  micro_batch_size: int, pad_id: int, share_prefix: bool = False
                  ) -> list[dict[str, torch.Tensor]]:
    """Split one rank's share of a global batch into the micro-batches it accumulates."""
    if not examples:
        return []
    if packing:
        rows = pack_rows([len(ids) for ids, _ in examples], pack_length)
        return [collate_packed([examples[i] for i in row], share_prefix) for row in rows]
    # Sorting by length before chunking keeps padding small; the loss is a sum, so the order
    # of examples inside a global batch does not change it.
    ordered = sorted(examples, key=lambda e: len(e[0]))
    return [collate_padded(ordered[i:i + micro_batch_size], pad_id)
            for i in range(0, len(ordered), micro_batch_size)]
