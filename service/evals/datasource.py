"""The ``completions`` data source: what a run samples, over which items.

Items come from an uploaded JSONL file (``source.type: file_id``, purpose ``evals``) or inline
(``file_content``). A line is either ``{"item": {…}}`` (OpenAI's form, optionally with a
``sample``) or the item object itself. Every item is checked against the eval's
``item_schema`` when the run is created, so a file that does not fit is a 400 naming its line
and field, never a failed run.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.errors import InvalidRequest
from training.graders import templates
from training.graders.specs import Message


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileIdSource(_Shape):
    type: Literal["file_id"]
    id: str


class ContentRow(_Shape):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileContentSource(_Shape):
    type: Literal["file_content"]
    content: list[ContentRow] = Field(min_length=1)


class TemplateMessages(_Shape):
    type: Literal["template"]
    template: list[Message] = Field(min_length=1)


class ItemReference(_Shape):
    type: Literal["item_reference"]
    item_reference: str


class SamplingParams(_Shape):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: str | None = None
    """Accepted for compatibility; our models do not reason in a separate channel."""


class CompletionsSource(_Shape):
    type: Literal["completions"]
    model: str = Field(min_length=1)
    source: FileIdSource | FileContentSource = Field(discriminator="type")
    input_messages: TemplateMessages | ItemReference = Field(discriminator="type")
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)


def parse_lines(data: bytes, param: str) -> list[dict[str, Any]]:
    """The items of a JSONL file; a 400 naming the first line that is not one."""
    rows = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"Line {number} of the data source is not JSON: {exc}.",
                                 param=param, code="invalid_item") from None
        if not isinstance(row, dict):
            raise InvalidRequest(f"Line {number} of the data source is not a JSON object.",
                                 param=param, code="invalid_item")
        rows.append(row["item"] if set(row) <= {"item", "sample"} and
                    isinstance(row.get("item"), dict) else row)
    if not rows:
        raise InvalidRequest("The data source holds no items.", param=param, code="no_items")
    return rows


def check_items(items: list[dict[str, Any]], item_schema: dict[str, Any], param: str) -> None:
    """Every item against the eval's ``item_schema`` (JSON Schema); a 400 naming the first
    item and field that do not fit."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(item_schema)
    for number, item in enumerate(items, 1):
        error = next(iter(validator.iter_errors(item)), None)
        if error is not None:
            path = [str(p) for p in error.absolute_path]
            if error.validator == "required" and isinstance(error.instance, dict):
                path += [next(p for p in error.validator_value if p not in error.instance)]
            field = ".".join(path) or "(the item)"
            raise InvalidRequest(f"Item {number} does not match the eval's item_schema at "
                                 f"{field}: {error.message}.", param=f"{param}.item.{field}"
                                 if path else param, code="item_schema_mismatch")


def prompt(source: CompletionsSource, item: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages for one item (templates resolved against ``item``)."""
    space = {"item": item}
    if isinstance(source.input_messages, ItemReference):
        messages = templates.lookup(source.input_messages.item_reference, space)
        if not isinstance(messages, list):
            raise templates.TemplateError(f"{source.input_messages.item_reference} is not a "
                                          "list of messages.",
                                          source.input_messages.item_reference)
        from pydantic import ValidationError

        try:
            return [_plain(Message.model_validate(m), {}) for m in messages]
        except ValidationError as exc:
            raise templates.TemplateError(f"{source.input_messages.item_reference} holds a "
                                          f"message that is not one: {exc.errors()[0]['msg']}",
                                          source.input_messages.item_reference) from None
    return [_plain(m, space) for m in source.input_messages.template]


def _plain(message: Message, space: dict[str, Any]) -> dict[str, str]:
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": templates.render(message.text(), space)}
