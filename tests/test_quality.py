"""Before and after (issue 11): the task data, the ``tuneserve eval`` command and the demo.

The data tests are pure Python. The end-to-end test runs the demo, scaled down to the tiny model,
through the shared ``tuneserve up``: evaluate the base model, upload, train, follow, evaluate the
tuned model, write the table. The figures it reaches are not asserted (the tiny model is random);
the full ones come from ``bench/quality/demo.py`` and are in ``bench/results/quality.md``.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys

import pytest

from service.cli import eval_tasks
from service.cli.evaluate import Answer, summarize, wilson_interval
from tests.helpers import REPO, Service

sys.path.insert(0, str(REPO / "bench" / "quality"))
import demo
import make_data

from training.data.formats import iter_normalised

TINY = "tuneserve/tiny-llama"


def prompts(rows: list[dict]) -> set[str]:
    return {row["messages"][0]["content"] for row in rows}


@pytest.mark.parametrize("task", sorted(eval_tasks.TASKS))
def test_data_is_deterministic_for_a_seed(task, tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        make_data.main(["--out", str(out), "--task", task, "--n-train", "300",
                        "--n-heldout", "50", "--preferences"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 6
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = make_data.datasets(task, 300, 50, seed=1)
    assert other[f"{task}-train.chat.jsonl"] != make_data.datasets(task, 300, 50)[
        f"{task}-train.chat.jsonl"]


@pytest.mark.parametrize("task", sorted(eval_tasks.TASKS))
def test_train_and_heldout_never_share_a_prompt(task):
    files = make_data.datasets(task, 3000, 200)
    train = prompts(files[f"{task}-train.chat.jsonl"])
    held = prompts(files[f"{task}-heldout.chat.jsonl"])
    assert len(train) == 3000 and len(held) == 200  # no duplicates inside a split either
    assert not train & held
    # Nor with any larger held-out set `tuneserve eval --n N` may ask for.
    pool = {e.prompt for e in eval_tasks.heldout(task, eval_tasks.HELDOUT_POOL)}
    assert not train & pool
    # A longer held-out set starts with the shorter one: --n 50 scores a prefix of --n 200.
    assert [e.prompt for e in eval_tasks.heldout(task, 50)] == \
        [e.prompt for e in eval_tasks.heldout(task, 200)][:50]


def test_sort_examples_follow_the_task():
    for example in eval_tasks.train("sort", 500):
        assert example.instruction.startswith(eval_tasks.SORT_PREFIX)
        values = ast.literal_eval(example.instruction.removeprefix(eval_tasks.SORT_PREFIX))
        assert 4 <= len(values) <= 7 and all(0 <= v <= 99 for v in values)
        assert example.output == str(sorted(values))  # Python list notation, exactly


def test_extract_answers_are_json_objects_with_the_named_fields():
    for example in eval_tasks.train("extract", 200):
        fields = json.loads(example.output)
        assert set(fields) == {"name", "age", "city", "occupation"}
        assert isinstance(fields["age"], int) and str(fields["age"]) in example.input
        assert fields["name"] in example.input and fields["city"] in example.input


@pytest.mark.parametrize("task", sorted(eval_tasks.TASKS))
def test_alpaca_and_chat_files_hold_the_same_conversations(task):
    files = make_data.datasets(task, 50, 10)
    for split in ("train", "heldout"):
        chat, alpaca = ([e for _, e in iter_normalised(io.BytesIO(
            make_data.to_jsonl(files[f"{task}-{split}.{kind}.jsonl"]).encode()))]
            for kind in ("chat", "alpaca"))
        assert len(chat) == len(files[f"{task}-{split}.chat.jsonl"])
        assert [e["messages"] for e in chat] == [e["messages"] for e in alpaca]


def test_scoring():
    assert eval_tasks.is_correct("sort", " [1, 3, 13]\n", "[1, 3, 13]")
    assert not eval_tasks.is_correct("sort", "[1,3,13]", "[1, 3, 13]")
    assert not eval_tasks.is_correct("sort", "1. 3\n2. 13", "[3, 13]")
    reference = '{"name": "Ana Silva", "age": 30, "city": "Lima", "occupation": "chef"}'
    reordered = '{"age":30,"name":"Ana Silva","occupation":"chef","city":"Lima"}'
    assert eval_tasks.is_correct("extract", reordered, reference)
    assert not eval_tasks.is_correct("extract", reordered.replace("30", '"30"'), reference)
    answers = [Answer("p", "[1, 2]", "[1, 2]", "stop", 6, True, True),
               Answer("p", "[1, 2]", "Sure! 1. ...", "length", 96, False, False)]
    report = summarize("m", "sort", answers, 1.0)
    assert (report["exact_match"], report["valid_json"], report["end_of_turn"]) == (0.5, 0.5, 0.5)
    assert report["mean_completion_tokens"] == 51.0
    assert report["exact_match_ci95"] == list(wilson_interval(1, 2))


def test_exact_match_interval_is_wilsons():
    # Textbook values: 0 of 10 gives z²/(n + z²) = 0.2775 as the upper bound; the interval
    # narrows with n around the same share.
    assert wilson_interval(0, 10) == (0.0, 0.2775)
    assert wilson_interval(10, 10) == (0.7225, 1.0)
    low200, high200 = wilson_interval(184, 200)
    low1000, high1000 = wilson_interval(920, 1000)
    assert low200 < low1000 < 0.92 < high1000 < high200
    assert (low1000, high1000) == (0.9015, 0.9353)


def test_eval_names_a_bad_file_line(tmp_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = subprocess.run([sys.executable, "-m", "service.cli.main", "eval", "m", "--task", "sort",
                           "--file", str(bad)], check=False, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{bad}:1:" in done.stderr and "reference answer last" in done.stderr


def run_demo(service: Service, results, *extra: str) -> int:
    return demo.main(["--model", TINY, "--n-train", "64", "--batch-size", "8", "--n-eval", "8",
                      "--max-tokens", "16", "--base-url", f"{service.url}/v1", "--results", str(results), "--quiet",
                      *extra])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_tiny_model(shared_service, tmp_path):
    service = shared_service
    results = tmp_path / "results"
    assert run_demo(service, results) == 0
    result = json.loads((results / "quality.json").read_text())
    tuned_model = result["rows"]["tuned"]["model"]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "eval", tuned_model, "--task", "sort", "--n", "4",
         "--max-tokens", "8", "--json", "--base-url", f"{service.url}/v1"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert set(result["rows"]) == {"base", "tuned"}
    for row in result["rows"].values():
        assert row["n"] == 8
        for key in ("exact_match", "valid_json", "end_of_turn"):
            assert 0 <= row[key] <= 1
        low, high = row["exact_match_ci95"]
        assert low <= row["exact_match"] <= high and high - low > 0.2  # n=8 is a wide interval
    job = result["jobs"]["sft"]
    assert tuned_model == job["fine_tuned_model"] and tuned_model.startswith(f"ft:{TINY}:sort:")
    assert job["seconds"] > 0 and job["hyperparameters"]["n_epochs"] == 1
    assert job["total_steps"] == 8 and job["hyperparameters"]["batch_size"] == 8  # 64 / 8
    assert job["lora"]["r"] == demo.DEFAULTS["lora_r"]
    table = (results / "quality.md").read_text()
    assert "| tuned (" in table and "bench/quality/demo.py --model tuneserve/tiny-llama" in table
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == tuned_model and report["n"] == len(report["answers"]) == 4
    # 8 tokens cannot hold a 4–7 number list from a random model: every answer hit the cap.
    assert report["end_of_turn"] == 0 and {a["finish_reason"] for a in report["answers"]} == \
        {"length"}


@pytest.mark.slow
def test_dpo_demo_runs_sft_then_dpo_and_reports_preference_accuracy(shared_service, tmp_path):
    results = tmp_path / "results"
    assert run_demo(shared_service, results, "--dpo", "--dpo-n-train", "16") == 0
    result = json.loads((results / "quality-dpo.json").read_text())
    assert list(result["rows"]) == ["base", "sft", "sft+dpo"]
    sft, dpo = result["jobs"]["sft"], result["jobs"]["dpo"]
    # The DPO job continues from the SFT model: same base, its own job id.
    assert result["rows"]["sft"]["model"] == sft["fine_tuned_model"]
    assert dpo["fine_tuned_model"].startswith(f"ft:{TINY}:sort-dpo:{dpo['id']}")
    assert 0 <= result["heldout_preference_accuracy"] <= 1
    assert 0 <= result["heldout_preference_accuracy_before"] <= 1
    assert "Held-out preference accuracy" in (results / "quality-dpo.md").read_text()
