"""The graders' shapes, as OpenAI's spec defines them (``Grader*``, ``EvalGrader*``).

One pydantic model per grader type, picked by ``type``; unknown fields and types are refused
with the field named. ``pass_threshold`` is the Evals API's addition (``EvalGrader*``): it is
accepted on every scoring grader so one shape serves the grader endpoints and eval criteria.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Shape):
    type: Literal["input_text", "output_text"] = "input_text"
    text: str


class InputImage(_Shape):
    """Accepted by the shape so that ``validate`` can refuse it by name: our models read text."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


Part = Annotated[InputText | InputImage, Field(discriminator="type")]


class Message(_Shape):
    """``EvalItem`` / ``EasyInputMessage``: a chat message whose text may hold templates."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Part | list[Part]

    def parts(self) -> list[InputText | InputImage]:
        if isinstance(self.content, str):
            return [InputText(text=self.content)]
        return [self.content] if not isinstance(self.content, list) else self.content

    def text(self) -> str:
        return "".join(p.text for p in self.parts() if isinstance(p, InputText))


class _Grader(_Shape):
    name: str = Field(min_length=1, max_length=256)


class StringCheck(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


SIMILARITY_METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2",
                      "rouge_3", "rouge_4", "rouge_5", "rouge_l")


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal[SIMILARITY_METRICS]  # type: ignore[valid-type]
    pass_threshold: float | None = None


class SamplingParams(_Shape):
    seed: int | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_completions_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The Evals API's spelling of the same cap."""
    reasoning_effort: str | None = None
    """Accepted for compatibility; our models do not reason in a separate channel."""

    def token_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_completions_tokens


class ScoreModel(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    sampling_params: SamplingParams | None = None
    range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    pass_threshold: float | None = None

    @model_validator(mode="after")
    def _range_ordered(self) -> ScoreModel:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, not {self.range}")
        return self

    def bounds(self) -> tuple[float, float]:
        low, high = self.range or (0.0, 1.0)
        return float(low), float(high)


class LabelModel(_Grader):
    type: Literal["label_model"]
    model: str = Field(min_length=1)
    input: list[Message] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _passing_are_labels(self) -> LabelModel:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels must be a subset of labels; {unknown} are not "
                             "labels")
        return self


class Python(_Grader):
    type: Literal["python"]
    source: str
    image_tag: str | None = None
    pass_threshold: float | None = None


class Multi(_Grader):
    type: Literal["multi"] = "multi"
    graders: dict[str, SubGrader] | list[SubGrader] | SubGrader
    calculate_output: str = Field(min_length=1, max_length=2000)
    pass_threshold: float | None = None

    def named(self) -> dict[str, Any]:
        """The sub-graders by the variable the formula calls them (see ``multi.variables``)."""
        from training.graders.multi import variables

        return variables(self.graders)


SubGrader = Annotated[StringCheck | TextSimilarity | Python | ScoreModel | LabelModel,
                      Field(discriminator="type")]
Grader = Annotated[StringCheck | TextSimilarity | Python | ScoreModel | LabelModel | Multi,
                   Field(discriminator="type")]
"""Any grader; ``label_model`` is an eval criterion in the spec, allowed here everywhere."""
Multi.model_rebuild()

MODEL_GRADERS = ("score_model", "label_model")
