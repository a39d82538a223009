"""The graders (training/graders): each type and operation on worked examples, against the
metric library's value or one computed by hand; the spec's example graders; refusals.

Pure and fast: no Ray, no model. Model graders get a judge here that answers fixed text, which
is what the ``Judge`` protocol hands a grader (the served judge is in tests/test_evals.py).
"""

from __future__ import annotations

import asyncio

import pytest

from training.graders import GraderInvalid, JudgeAnswer, Sample, TemplateError, grade, parse

ITEM = {"label": "the cat sat on the mat", "meta": {"tags": ["a", "b"], "n": 3}}


def score(grader: dict, output: str, item: dict | None = None, judge=None):
    return asyncio.run(grade(parse(grader), ITEM if item is None else item, Sample(output), judge))


def similarity(metric: str, output: str, reference: str) -> float:
    return score({"type": "text_similarity", "name": "s", "input": "{{sample.output_text}}",
                  "reference": "{{item.r}}", "evaluation_metric": metric}, output,
                 {"r": reference}).score


@pytest.mark.parametrize(("operation", "output", "expected"), [
    ("eq", "the cat sat on the mat", 1.0), ("eq", "the cat sat on the mat ", 0.0),
    ("ne", "a dog", 1.0), ("ne", "the cat sat on the mat", 0.0),
    ("like", "so: the cat sat on the mat!", 1.0), ("like", "THE CAT SAT ON THE MAT", 0.0),
    ("ilike", "THE CAT SAT ON THE MAT", 1.0), ("ilike", "the cat sat", 0.0),
])
def test_string_check_operations(operation, output, expected):
    result = score({"type": "string_check", "name": "c", "input": "{{sample.output_text}}",
                    "reference": "{{item.label}}", "operation": operation}, output)
    assert (result.score, result.passed) == (expected, expected == 1.0)


def test_fuzzy_match_is_the_normalised_indel_similarity():
    # kitten/sitting: longest common subsequence "ittn" (4), so 6 + 7 - 2·4 = 5 edits of 13.
    assert similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(1 - 5 / 13)


def test_bleu_is_sacrebleus_sentence_bleu():
    import sacrebleu

    out, ref = "the cat is on the mat today", "the cat sat on the mat today"
    assert similarity("bleu", out, ref) == pytest.approx(
        sacrebleu.sentence_bleu(out, [ref]).score / 100)
    assert similarity("bleu", ref, ref) == pytest.approx(1.0)


def test_gleu_by_hand():
    # n-grams 1..4 of "a b c" and "a b d": 6 each, shared {a, b, ab}: min(3/6, 3/6).
    assert similarity("gleu", "a b c", "a b d") == pytest.approx(0.5)


@pytest.mark.parametrize(("metric", "expected"), [
    # "the cat is on the mat" vs "the cat sat on the mat", 6 tokens each:
    ("rouge_1", 5 / 6),  # unigrams shared: the ×2, cat, on, mat
    ("rouge_2", 3 / 5),  # bigrams shared: the cat, on the, the mat
    ("rouge_3", 1 / 4),  # trigrams shared: on the mat
    ("rouge_4", 0.0), ("rouge_5", 0.0),
    ("rouge_l", 5 / 6),  # longest common subsequence: the cat on the mat
])
def test_rouge_by_hand(metric, expected):
    assert similarity(metric, "the cat is on the mat", ITEM["label"]) == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_metrics_needing_downloads_are_refused_with_the_reason(metric):
    with pytest.raises(GraderInvalid) as refused:
        parse({"type": "text_similarity", "name": "s", "input": "a", "reference": "b",
               "evaluation_metric": metric})
    assert refused.value.param == "grader.evaluation_metric"
    assert "download" in str(refused.value)


def test_text_similarity_passes_at_its_threshold():
    grader = {"type": "text_similarity", "name": "s", "input": "{{sample.output_text}}",
              "reference": "{{item.label}}", "evaluation_metric": "rouge_1"}
    assert score({**grader, "pass_threshold": 0.8}, "the cat is on the mat").passed
    assert not score({**grader, "pass_threshold": 0.9}, "the cat is on the mat").passed


def test_templates_walk_items_and_the_samples_json():
    grader = {"type": "string_check", "name": "c", "input": "{{ sample.output_json.tags[1] }}",
              "reference": "{{item.meta.tags.1}}", "operation": "eq"}
    assert score(grader, '{"tags": ["x", "b"]}').score == 1.0
    # Non-strings are inserted as JSON.
    grader = {**grader, "input": "{{sample.output_text}}", "reference": "{{item.meta}}"}
    assert score(grader, '{"tags": ["a", "b"], "n": 3}').score == 1.0


def test_a_template_naming_a_missing_field_says_which():
    grader = {"type": "string_check", "name": "c", "input": "{{sample.output_text}}",
              "reference": "{{item.meta.answer}}", "operation": "eq"}
    with pytest.raises(TemplateError, match="item.meta.answer"):
        score(grader, "x")
    with pytest.raises(TemplateError, match="output_json"):  # the answer is not JSON
        score({**grader, "input": "{{sample.output_json.a}}", "reference": "x"}, "not json")
    with pytest.raises(GraderInvalid) as refused:
        parse({**grader, "input": "{{answer.text}}"})
    assert refused.value.param == "grader.input"


class FixedJudge:
    def __init__(self, text: str):
        self.text, self.calls = text, []

    async def __call__(self, model, messages, params, response_format=None):
        self.calls.append((model, messages, params, response_format))
        return JudgeAnswer(self.text, prompt_tokens=10, completion_tokens=2)


SCORE_MODEL = {"type": "score_model", "name": "judge", "model": "tuneserve/tiny-llama",
               "input": [{"role": "user", "content": "Reference: {{item.label}}\n"
                          "Answer: {{sample.output_text}}\nScore 0 to 10."}],
               "range": [0, 10], "pass_threshold": 7}


@pytest.mark.parametrize(("answer", "expected", "passed", "parse_error"), [
    ("8", 8.0, True, False), ('{"result": 6.5}', 6.5, False, False),
    ("I would say 7.5 out of 10", 7.5, True, False),
    ("42", 0.0, False, True), ("no idea", 0.0, False, True),
])
def test_score_model_reads_the_judges_number_in_range(answer, expected, passed, parse_error):
    judge = FixedJudge(answer)
    result = score(SCORE_MODEL, "a cat on a mat", judge=judge)
    assert (result.score, result.passed) == (expected, passed)
    assert result.errors["model_grader_parse_error"] is parse_error
    model, messages, params, response_format = judge.calls[0]
    assert model == "tuneserve/tiny-llama" and response_format is None  # the judge's own words
    assert messages == [{"role": "user", "content": f"Reference: {ITEM['label']}\n"
                                                    "Answer: a cat on a mat\nScore 0 to 10."}]
    assert params.temperature == 0.0  # a judge is greedy unless told otherwise
    assert result.usage["tuneserve/tiny-llama"]["total_tokens"] == 12


@pytest.mark.parametrize(("answer", "label_score", "parse_error"), [
    ("positive", 1.0, False), ("Negative.", 0.0, False),
    ("It is neutral, not positive", 0.0, False), ("unsure", 0.0, True),
    ('"positive"', 1.0, False),  # what the constrained judge writes: a JSON string
])
def test_label_model_maps_the_judges_label(answer, label_score, parse_error):
    grader = {"type": "label_model", "name": "sentiment", "model": "m",
              "input": [{"role": "developer", "content": "Classify: {{item.label}}"}],
              "labels": ["positive", "neutral", "negative"], "passing_labels": ["positive"]}
    judge = FixedJudge(answer)
    result = score(grader, "x", judge=judge)
    assert (result.score, result.errors["model_grader_parse_error"]) == (label_score, parse_error)
    assert judge.calls[0][1][0]["role"] == "system"  # developer is the system message
    # The judge is held to the labels by a JSON schema (the engine's constrained decoding).
    assert judge.calls[0][3] == {"type": "json_schema", "schema": {
        "type": "string", "enum": ["positive", "neutral", "negative"]}}


def test_label_model_passing_labels_must_be_labels():
    with pytest.raises(GraderInvalid, match="subset"):
        parse({"type": "label_model", "name": "l", "model": "m", "labels": ["a"],
               "passing_labels": ["b"], "input": [{"role": "user", "content": "x"}]})


def test_multi_computes_its_formula_over_named_sub_graders():
    grader = {"type": "multi", "name": "m", "calculate_output": "0.25 * fuzzy + 0.75 * max(exact, 0)",
              "graders": {"fuzzy": {"type": "text_similarity", "name": "f",
                                    "input": "{{sample.output_text}}", "reference": "sitting",
                                    "evaluation_metric": "fuzzy_match"},
                          "exact": {"type": "string_check", "name": "e", "operation": "eq",
                                    "input": "{{sample.output_text}}", "reference": "kitten"}}}
    result = score(grader, "kitten")
    assert result.score == pytest.approx(0.25 * (1 - 5 / 13) + 0.75)
    assert result.sub_scores == pytest.approx({"fuzzy": 1 - 5 / 13, "exact": 1.0})
    for formula, why in [("fuzzy + __import__('os')", "may call only"),
                         ("fuzzy.real", "Attribute"), ("nope * 2", "names 'nope'")]:
        with pytest.raises(GraderInvalid, match=why) as refused:
            parse({**grader, "calculate_output": formula})
        assert refused.value.param == "grader.calculate_output"
    assert score({**grader, "calculate_output": "9 ** 9 ** 9"}, "x").errors[
        "formula_parse_error"]  # overflows at once instead of computing for minutes


def test_python_graders_are_refused_with_the_reason():
    with pytest.raises(GraderInvalid, match="sandbox") as refused:
        parse({"type": "python", "name": "p", "source": "def grade(sample, item): return 1.0"})
    assert refused.value.param == "grader.type"


def test_unknown_grader_type_names_the_field():
    with pytest.raises(GraderInvalid) as refused:
        parse({"type": "regex_check", "name": "x"})
    assert refused.value.param == "grader.type" and "regex_check" in str(refused.value)


# The x-oaiMeta examples of the spec's Grader* schemas, as JSON (the spec writes them in
# Python-ish notation with trailing commas).
SPEC_EXAMPLES = {
    "string_check": {"type": "string_check", "name": "Example string check grader",
                     "input": "{{sample.output_text}}", "reference": "{{item.label}}",
                     "operation": "eq"},
    "text_similarity": {"type": "text_similarity", "name": "Example text similarity grader",
                        "input": "{{sample.output_text}}", "reference": "{{item.label}}",
                        "evaluation_metric": "fuzzy_match"},
    "label_model": {"name": "First label grader", "type": "label_model",
                    "model": "gpt-4o-2024-08-06",
                    "input": [{"type": "message", "role": "system",
                               "content": {"type": "input_text", "text": "Classify the "
                                           "sentiment of the following statement as one of "
                                           "positive, neutral, or negative"}},
                              {"type": "message", "role": "user",
                               "content": {"type": "input_text",
                                           "text": "Statement: {{item.response}}"}}],
                    "passing_labels": ["positive"],
                    "labels": ["positive", "neutral", "negative"]},
    "score_model": {"type": "score_model", "name": "Example score model grader",
                    "input": [{"role": "user", "content": [{"type": "input_text", "text":
                               "Score how close the reference answer is to the model answer. "
                               "Score 1.0 if they are the same and 0.0 if they are different."
                               " Return just a floating point score\n\n Reference answer: "
                               "{{item.label}}\n\n Model answer: {{sample.output_text}}"}]}],
                    "model": "gpt-5-mini",
                    "sampling_params": {"temperature": 1, "top_p": 1, "seed": 42,
                                        "max_completions_tokens": 32768,
                                        "reasoning_effort": "medium"}},
    "multi": {"type": "multi", "name": "example multi grader",
              "graders": [{"type": "text_similarity", "name": "example text similarity grader",
                           "input": "The graded text", "reference": "The reference text",
                           "evaluation_metric": "fuzzy_match"},
                          {"type": "string_check", "name": "Example string check grader",
                           "input": "{{sample.output_text}}", "reference": "{{item.label}}",
                           "operation": "eq"}],
              # The spec's formula ends in a stray ")"; see the test below.
              "calculate_output": "0.5 * text_similarity_score +  0.5 * string_check_score"},
}


@pytest.mark.parametrize("name", sorted(SPEC_EXAMPLES))
def test_the_specs_example_graders_validate(name):
    assert parse(SPEC_EXAMPLES[name]).type == name


def test_the_specs_quirks_are_refused_by_name():
    with pytest.raises(GraderInvalid, match="does not parse") as refused:
        parse({**SPEC_EXAMPLES["multi"], "calculate_output":
               "0.5 * text_similarity_score +  0.5 * string_check_score)"})
    assert refused.value.param == "grader.calculate_output"
    with_image = SPEC_EXAMPLES["score_model"]["input"][0]["content"] + [
        {"type": "input_image", "image_url": "https://example.com/reference.png",
         "file_id": None, "detail": "auto"}]
    with pytest.raises(GraderInvalid, match="text only") as refused:
        parse({**SPEC_EXAMPLES["score_model"], "input": [{"role": "user", "content": with_image}]})
    assert refused.value.param == "grader.input.0.content.1"
