"""A toy preference set: concise correct answers preferred over rambling ones.

Deterministic for a seed. Every line is ``{"prompt": [messages], "chosen": str, "rejected": str}``
(the ``chosen_rejected`` format); the chosen response is the bare answer, the rejected one says
the same answer wrapped in filler. Prompts are short questions of a few kinds (sums, capitals,
opposites, colours), some with a system message and some after an earlier exchange (multi-turn).
The train and held-out sets never share a prompt: every distinct prompt goes to one side only.

    python bench/data/make_preferences.py --out DIR [--train 256] [--heldout 64] [--seed 0]

writes ``DIR/train.jsonl`` and ``DIR/heldout.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Canada": "Ottawa", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
    "happy": "sad", "open": "closed", "full": "empty", "hard": "soft", "old": "new",
    "wet": "dry", "loud": "quiet", "rich": "poor", "strong": "weak", "long": "short",
}
COLOURS = {
    "grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown",
}
OPENINGS = [
    "Well, that is a really interesting question, and I want to take my time with it.",
    "Okay, so let me think about this carefully before I give you an answer.",
    "Great question! There are a few things worth considering here before answering.",
    "Hmm, let me walk through my reasoning step by step so that it is all clear.",
]
MIDDLES = [
    "After thinking it over for a while, I believe the answer is {answer},",
    "If I remember correctly, and I am fairly sure I do, it should be {answer},",
    "Putting all of that together, what I come up with is {answer},",
]
CLOSINGS = [
    "although you may want to double-check that somewhere else just to be safe.",
    "but please let me know if you would like me to explain any of it in more detail.",
    "and I hope this long explanation was helpful to you in some way or another.",
]
SYSTEM = "You are a helpful assistant."


def questions(rng: random.Random) -> list[tuple[str, str]]:
    """Every distinct (question, answer) of the set, in a seeded order."""
    found = [(f"What is {a} + {b}?", str(a + b)) for a in range(2, 30) for b in range(2, 30)]
    found += [(f"What is the capital of {c}?", city) for c, city in CAPITALS.items()]
    found += [(f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES.items()]
    found += [(f"What colour is {thing}?", colour) for thing, colour in COLOURS.items()]
    rng.shuffle(found)
    return found


def rambling(answer: str, rng: random.Random) -> str:
    return " ".join([rng.choice(OPENINGS), rng.choice(MIDDLES).format(answer=answer),
                     rng.choice(CLOSINGS)])


def prompt(question: str, rng: random.Random) -> list[dict[str, str]]:
    """The question alone, after a system message, or after an earlier exchange."""
    kind = rng.random()
    if kind < 0.2:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if kind < 0.35:
        return [{"role": "user", "content": "Hi! Can I ask you something?"},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": question}]
    return [{"role": "user", "content": question}]


def pair(question: str, answer: str, rng: random.Random) -> dict:
    return {"prompt": prompt(question, rng), "chosen": f"{answer}.",
            "rejected": rambling(answer, rng)}


def make_preferences(n_train: int = 256, n_heldout: int = 64, seed: int = 0
                     ) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` pairs; no question appears in both."""
    rng = random.Random(seed)
    pool = questions(rng)
    if n_train + n_heldout > len(pool):
        raise ValueError(f"at most {len(pool)} distinct questions, asked for {n_train + n_heldout}")
    heldout = [pair(q, a, rng) for q, a in pool[:n_heldout]]
    train = [pair(q, a, rng) for q, a in pool[n_heldout:n_heldout + n_train]]
    return train, heldout


def to_jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, heldout = make_preferences(args.train, args.heldout, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.jsonl").write_bytes(to_jsonl(train))
    (args.out / "heldout.jsonl").write_bytes(to_jsonl(heldout))


if __name__ == "__main__":
    main()
