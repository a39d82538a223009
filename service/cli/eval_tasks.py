"""The tasks ``tuneserve eval`` scores, and the seeded examples of each.

Two tasks a base chat model does not follow out of the box:

* ``sort``: "Sort this list in ascending order: [...]" over 4 to 7 integers drawn uniformly
  from 0 to 99; the answer is the sorted list, exactly, in Python list notation.
* ``extract``: a sentence about a person; the answer is one JSON object with the keys
  ``name``, ``age`` (an integer), ``city`` and ``occupation``.

Examples are a pure function of (task, seed, split). The held-out set is the first ``n`` prompts
of its own seeded stream (so ``--n 50`` is a prefix of ``--n 200``); the training set comes from
another stream and skips every prompt of the held-out *pool* (``HELDOUT_POOL`` prompts), so no
held-out set of any size up to the pool shares a prompt with any training set.

Pure Python: used by the CLI (service side) and by ``bench/quality/make_data.py``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

HELDOUT_POOL = 1000
"""Held-out prompts reserved per (task, seed); a training set never uses any of them."""

SORT_PREFIX = "Sort this list in ascending order: "
EXTRACT_INSTRUCTION = (
    'Extract the person\'s name, age, city and occupation from the sentence. Answer with JSON '
    'only, using the keys "name", "age", "city" and "occupation".')

FIRST_NAMES = ("Maria", "James", "Aiko", "Omar", "Sofia", "Liam", "Priya", "Lukas", "Chen",
               "Fatima", "Diego", "Anna", "Kwame", "Elena", "Noah", "Yuki", "Ines", "Mateo",
               "Hannah", "Ravi", "Zoe", "Pavel", "Amara", "Felix", "Leila", "Tomas", "Nadia",
               "Oscar", "Mei", "Jonas")
LAST_NAMES = ("Lopez", "Smith", "Tanaka", "Haddad", "Rossi", "Murphy", "Patel", "Weber", "Wang",
              "Khan", "Garcia", "Novak", "Mensah", "Petrova", "Brown", "Sato", "Silva", "Fernandez",
              "Schmidt", "Iyer", "Martin", "Ivanov", "Okafor", "Berg", "Rahimi", "Kowalski",
              "Haddou", "Lindqvist", "Chen", "Dubois")
CITIES = ("Lisbon", "Tokyo", "Cairo", "Berlin", "Toronto", "Mumbai", "Lagos", "Madrid", "Oslo",
          "Seoul", "Lima", "Dublin", "Vienna", "Nairobi", "Chicago", "Prague", "Manila",
          "Helsinki", "Athens", "Bogota", "Warsaw", "Kyoto", "Accra", "Zurich", "Denver")
OCCUPATIONS = ("nurse", "teacher", "carpenter", "pilot", "chef", "lawyer", "architect",
               "baker", "engineer", "librarian", "dentist", "journalist", "plumber",
               "photographer", "pharmacist", "farmer", "electrician", "musician", "translator",
               "accountant")
SENTENCES = (
    "{name} is a {age}-year-old {occupation} from {city}.",
    "Meet {name}: {age} years old, works as a {occupation} in {city}.",
    "{name}, aged {age}, has been a {occupation} in {city} for years.",
    "In {city}, {name} ({age}) works as a {occupation}.",
    "After moving to {city}, {name} became a {occupation} at the age of {age}.",
    "The {occupation} {name} is {age} and lives in {city}.",
)


@dataclass(frozen=True)
class Example:
    """One task instance: ``instruction`` (+ ``input``) is the prompt, ``output`` the answer."""

    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        """The user message, joined as the alpaca format joins instruction and input."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    def alpaca(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}

    def chat(self) -> dict[str, list[dict[str, str]]]:
        return {"messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.output}]}


def sort_example(rng: random.Random) -> Example:
    values = [rng.randint(0, 99) for _ in range(rng.randint(4, 7))]
    return Example(f"{SORT_PREFIX}{values}", "", str(sorted(values)))


def extract_example(rng: random.Random) -> Example:
    fields = {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
              "age": rng.randint(18, 80), "city": rng.choice(CITIES),
              "occupation": rng.choice(OCCUPATIONS)}
    sentence = rng.choice(SENTENCES).format(**fields)
    return Example(EXTRACT_INSTRUCTION, sentence, json.dumps(fields))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "sort": sort_example, "extract": extract_example}


def _unique(task: str, seed: int, stream: str, skip: frozenset[str] = frozenset()
            ) -> Iterator[Example]:
    """Distinct prompts of one seeded stream, leaving out those in ``skip``."""
    make = TASKS[task]
    rng = random.Random(f"{task}:{seed}:{stream}")
    seen = set(skip)
    while True:
        example = make(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            yield example


def heldout(task: str, n: int, seed: int = 0) -> list[Example]:
    """The first ``n`` held-out examples (``n`` ≤ ``HELDOUT_POOL``)."""
    if not 0 <= n <= HELDOUT_POOL:
        raise ValueError(f"n must be in 0..{HELDOUT_POOL}, not {n}")
    stream = _unique(task, seed, "heldout")
    return [next(stream) for _ in range(n)]


def train(task: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` training examples, none with a prompt of the held-out pool."""
    pool = frozenset(e.prompt for e in heldout(task, HELDOUT_POOL, seed))
    stream = _unique(task, seed, "train", skip=pool)
    return [next(stream) for _ in range(n)]


# -- scoring ---------------------------------------------------------------------------------


def parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def is_correct(task: str, answer: str, reference: str) -> bool:
    """Sort: the exact text (surrounding whitespace aside). Extract: the same JSON object
    (key order and spacing aside) — what a caller parsing the answer relies on."""
    if task == "extract":
        ok, value = parse_json(answer.strip())
        return ok and value == json.loads(reference)
    return answer.strip() == reference.strip()
