"""OpenAI's graders, pure and torch-free: the eval runner, the grader endpoints and training's
rewards all score answers with this package (see ``grade``)."""

from training.graders.grade import GraderInvalid, Judge, JudgeAnswer, Result, grade, parse, validate
from training.graders.specs import Grader, SamplingParams
from training.graders.templates import Sample, TemplateError

__all__ = ["Grader", "GraderInvalid", "Judge", "JudgeAnswer", "Result", "Sample",
           "SamplingParams", "TemplateError", "grade", "parse", "validate"]
