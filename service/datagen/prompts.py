"""The Self-Instruct prompts, and how the generator's answers are read back.

The wording follows the paper's templates (Wang et al., 2023, Tables 5–8): "Come up with a
series of tasks" with eight numbered instructions for new instructions; a yes/no question with
a few worked examples for "is it classification?"; instances input-first for ordinary tasks
("Example 1 / Input / Output") and output-first for classification ("Class label / Input"), so
that a classifier's inputs are not all of one label. The paper prompted a base GPT-3 to continue
the text; a served chat model gets the same text as the user's message, and its reply is read
leniently (a reply that restarts the numbering, or answers a task directly, still counts).
Where the paper's templates carry hand-written demonstrations, these use seed tasks instead.
"""

from __future__ import annotations

import re

from service.datagen.seeds import SeedTask

CLASSIFICATION_EXAMPLES = (
    ("Given my personality and the job, tell me if I would be suitable.", True),
    ("Give me an example of a time when you had to use your sense of humor.", False),
    ("Replace the placeholders in the given text with appropriate named entities.", False),
    ("Fact checking - tell me if the statement is true, false, or unknown, based on your "
     "knowledge and common sense.", True),
    ("Return the SSN number for the person.", False),
    ("Detect if the Reddit thread contains hate speech.", True),
)
"""Some of the paper's own "is it classification?" demonstrations (Table 6)."""

_LINES = re.IGNORECASE | re.MULTILINE
_TASK = re.compile(r"^\s*(?:\**\s*task\s*\d+\s*\**\s*[:.)-]|\d+\s*[.)])\s*", _LINES)
_STOP = re.compile(r"\n\s*(?:input|output|example\s*\d*|answer|solution)\s*:", re.IGNORECASE)


def instruction_prompt(instructions: list[str]) -> list[dict[str, str]]:
    """Eight (or fewer) instructions, numbered, and the next number left open."""
    lines = ["Come up with a series of tasks:", ""]
    lines += [f"Task {i}: {' '.join(text.split())}" for i, text in enumerate(instructions, 1)]
    lines.append(f"Task {len(instructions) + 1}:")
    return [{"role": "user", "content": "\n".join(lines)}]


def parse_instructions(reply: str, limit: int = 16) -> list[str]:
    """The instructions of a reply: its text split at ``Task N:`` or ``N.`` at a line start;
    each piece cut at an ``Input:``/``Output:`` line (an instance is not part of it)."""
    pieces = _TASK.split("\n" + reply.strip())
    found = []
    for piece in pieces:
        piece = _STOP.split(piece, maxsplit=1)[0]
        text = " ".join(piece.split()).strip(" *")
        if text:
            found.append(text)
    return found[:limit]


def classification_prompt(instruction: str) -> list[dict[str, str]]:
    lines = ["Can the following task be regarded as a classification task with finite output "
             "labels?", ""]
    for task, is_classification in CLASSIFICATION_EXAMPLES:
        lines += [f"Task: {task}", f"Is it classification? {'Yes' if is_classification else 'No'}",
                  ""]
    lines += [f"Task: {' '.join(instruction.split())}", "Is it classification?"]
    return [{"role": "user", "content": "\n".join(lines)}]


def parse_classification(reply: str) -> bool:
    return reply.strip().lower().lstrip("*: ").startswith("yes")


def _demo_input_first(task: SeedTask) -> list[str]:
    lines = [f"Task: {task.instruction}"]
    for i, instance in enumerate(task.instances[:2], 1):
        lines += [f"Example {i}", f"Input: {instance['input']}" if instance["input"]
                  else "Input: (none)", f"Output: {instance['output']}"]
    return lines + [""]


def _demo_output_first(task: SeedTask) -> list[str]:
    lines = [f"Task: {task.instruction}"]
    for instance in task.instances[:2]:
        lines += [f"Class label: {instance['output']}", f"Input: {instance['input']}"
                  if instance["input"] else "Input: (none)"]
    return lines + [""]


def instance_prompt(instruction: str, classification: bool,
                    demos: list[SeedTask]) -> list[dict[str, str]]:
    """Output-first for a classification task, input-first otherwise; ``demos``: seed tasks
    (with instances) shown as worked examples."""
    if classification:
        lines = ["Given the classification task definition and the class labels, generate an "
                 "input that corresponds to each of the class labels. If the task doesn't "
                 "require input, just generate the correct class label.", ""]
        for demo in demos:
            lines += _demo_output_first(demo)
    else:
        lines = ["Come up with examples for the following tasks. Try to generate multiple "
                 "examples when possible. If the task doesn't require additional input, you "
                 "can generate the output directly.", ""]
        for demo in demos:
            lines += _demo_input_first(demo)
    lines.append(f"Task: {' '.join(instruction.split())}")
    return [{"role": "user", "content": "\n".join(lines)}]


_FIELD = re.compile(r"^\s*\**\s*(input|output|class label)\s*\**\s*:\s*", _LINES)
_EXAMPLE = re.compile(r"^\s*\**\s*example\s*\d*\s*\**\s*:?\s*$", _LINES)


def _clean(text: str) -> str:
    text = text.strip()
    return "" if text.lower() in ("(none)", "none", "n/a", "") else text


def parse_instances(reply: str, classification: bool) -> list[dict[str, str]]:
    """``[{"input", "output"}]`` from a reply in the prompt's layout. A reply without the
    layout's labels is one instance with no input (the paper allows tasks without input)."""
    if not _FIELD.search(reply):
        text = _clean(reply)
        return [{"input": "", "output": text}] if text else []
    instances: list[dict[str, str]] = []
    current: dict[str, str] = {}
    parts = _FIELD.split(reply)
    for label, value in zip(parts[1::2], parts[2::2], strict=True):
        label = "output" if label.lower() in ("output", "class label") else "input"
        value = _clean(_EXAMPLE.split(value, maxsplit=1)[0])
        if label in current:  # a new instance starts
            instances.append(current)
            current = {}
        current[label] = value
        # An instance ends with its second field: the input output-first, the output input-first.
        ends = "input" if classification else "output"
        if label == ends and (not classification or "output" in current):
            instances.append(current)
            current = {}
    if "output" in current:
        instances.append(current)
    return [{"input": i.get("input", ""), "output": i["output"]} for i in instances
            if i.get("output")]


def example(instruction: str, instance: dict[str, str]) -> dict:
    """One training example in OpenAI's chat format (the input below the instruction, as
    Self-Instruct's own fine-tuning data joins them)."""
    user = f"{instruction}\n\n{instance['input']}" if instance["input"].strip() else instruction
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": instance["output"]}]}
