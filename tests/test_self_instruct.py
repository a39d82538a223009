"""Self-Instruct data generation (``/v1/data_generation/jobs``, ``tuneserve data self-instruct``).

The filters on hand-made candidates (no model); bad input on an in-process app with two tenants;
a job cancelled mid-way there (the in-process path: the job runs beside the app); and one job
end to end on the shared ``tuneserve up`` (a detached driver actor calling the chat deployment),
started and followed by the CLI, with the tiny model as the generator. SmolLM2 on the real seed
tasks is ``bench/quality/self_instruct.py``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import pytest
from rouge_score import rouge_scorer

from service.cli.main import main as cli
from service.core import limits
from service.datagen import prompts, seeds
from service.datagen.filters import REASONS, FilterSettings, Pool, instance_ok, screen
from tests.helpers import api, in_process_app
from training.model.registry import TINY_MODEL_ID as TINY

SEED_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "self_instruct_seed_tasks.tail.jsonl"
POOL = ["Give three tips for staying healthy.",
        "Translate the following sentence into French.",
        "Classify the sentiment of the tweet as positive or negative."]


# -- the filters, on hand-made candidates ------------------------------------------------------


@pytest.mark.parametrize("candidate, reason", [
    ("Sort them.", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image of a sunset over the sea.", "keyword"),
    ("Plot the monthly sales of the company as a bar chart.", "keyword"),
    ("Go to the website and summarise the news for me.", "keyword"),
    ("Write a program that prints the first ten primes.", "keyword"),
    ("- List five countries in South America.", "punctuation_start"),
    ("Écrivez un poème sur la mer et le vent.", "non_english_start"),
    ("give three tips for  staying healthy.", "duplicate"),
    ("Give three useful tips for staying healthy.", "rouge_l"),
    ("Explain why the sky is blue to a five-year-old.", None),
    ("Given a list of numbers, return the largest one.", None),
])
def test_each_filter_removes_what_it_should(candidate, reason):
    assert screen(candidate, Pool(POOL), FilterSettings()) == reason
    assert reason is None or reason in REASONS


def test_rouge_l_dedup_refuses_a_near_copy_of_a_pool_instruction():
    near = "Translate the following sentences into French."
    reference = rouge_scorer.RougeScorer(["rougeL"]).score(POOL[1], near)["rougeL"].fmeasure
    pool = Pool(POOL)
    assert pool.max_rouge_l(near) == pytest.approx(reference) and reference >= 0.7
    assert screen(near, pool, FilterSettings()) == "rouge_l"
    # Stricter or looser by the threshold the caller sets.
    assert screen(near, Pool(POOL, threshold=0.95), FilterSettings(rouge_l_threshold=0.95)) \
        is None
    # A kept instruction joins the pool: its own near-copy is refused next.
    fresh = "Summarise the paragraph in one sentence for a busy reader."
    assert screen(fresh, pool, FilterSettings()) is None
    pool.add(fresh)
    assert screen("Summarise the paragraph in one short sentence for a busy reader.", pool,
                  FilterSettings()) == "rouge_l"


def test_instances_and_replies_are_read_as_the_prompts_ask():
    assert not instance_ok({"input": "", "output": "  "}, FilterSettings())
    assert not instance_ok({"input": "same", "output": "same"}, FilterSettings())
    assert not instance_ok({"input": "", "output": "x" * 2001}, FilterSettings())
    assert instance_ok({"input": "2 + 2", "output": "4"}, FilterSettings())
    assert prompts.parse_instructions("Name a fruit.\nTask 10: Sort the list.\nInput: 3 1 2\n"
                                      "Task 11: Explain gravity.") == [
        "Name a fruit.", "Sort the list.", "Explain gravity."]
    assert prompts.parse_instances("Example 1\nInput: 3 1 2\nOutput: 1 2 3\nExample 2\n"
                                   "Input: b a\nOutput: a b", classification=False) == [
        {"input": "3 1 2", "output": "1 2 3"}, {"input": "b a", "output": "a b"}]
    assert prompts.parse_instances("Class label: Positive\nInput: I love it.\n"
                                   "Class label: Negative\nInput: Awful.", classification=True) == [
        {"input": "I love it.", "output": "Positive"}, {"input": "Awful.", "output": "Negative"}]
    asked = prompts.instruction_prompt(POOL)[0]["content"]
    assert asked.startswith("Come up with a series of tasks:") and asked.endswith("Task 4:")


def test_seed_files_in_self_instructs_layout_and_others():
    data = SEED_FILE.read_bytes()
    tasks, sha = seeds.load(data)
    assert len(tasks) == 40 and sha == hashlib.sha256(data).hexdigest()
    assert all(t.instances for t in tasks) and any(t.is_classification for t in tasks)
    chat = b'{"messages": [{"role": "user", "content": "Name a colour."}, ' \
           b'{"role": "assistant", "content": "Blue."}]}\n'
    assert [t.instruction for t in seeds.load(chat)[0]] == ["Name a colour."]


# -- the API, in process -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with in_process_app(tmp_path_factory.mktemp("storage")) as app:
        yield app


def upload(client: httpx.Client, data: bytes, name: str = "seeds.jsonl") -> str:
    response = client.post("/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def refused(response: httpx.Response, status: int, param: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_bad_input_is_refused_naming_the_field(app_url):
    url, tuned, _ = app_url
    alice, bob = api(url), api(url, "key-bob")
    seed_id = upload(alice, SEED_FILE.read_bytes())
    # Valid as a training file, but no task has an instruction to show the generator.
    unusable = upload(alice, b'{"text": "Just some text, no instruction."}\n', "text.jsonl")
    ok = {"seed_file": seed_id, "model": TINY, "count": 2}
    refused(alice.post("/data_generation/jobs", json={**ok, "seed_file": unusable}), 400,
            "seed_file")
    refused(alice.post("/data_generation/jobs", json={**ok, "seed_file": "file-" + "0" * 24}),
            404, "seed_file")
    refused(bob.post("/data_generation/jobs", json=ok), 404, "seed_file")  # alice's file
    for count in (0, limits.MAX_DATAGEN_COUNT + 1):
        refused(alice.post("/data_generation/jobs", json={**ok, "count": count}), 400, "count")
    refused(alice.post("/data_generation/jobs", json={**ok, "model": "gpt-9"}), 404, "model")
    bob_seeds = upload(bob, SEED_FILE.read_bytes())
    refused(bob.post("/data_generation/jobs", json={**ok, "seed_file": bob_seeds,
                                                     "model": tuned}), 404, "model")
    refused(alice.post("/data_generation/jobs", json={**ok, "sampling": {"max_tokens": 65}}),
            400, "sampling.max_tokens")
    refused(alice.post("/data_generation/jobs", json={**ok, "filters": {"grader": {
        "type": "python", "name": "p", "source": "def grade(s, i): return 1"}}}), 400,
        "filters.grader.type")
    judge = {"type": "score_model", "name": "judge", "model": tuned, "range": [0, 1],
             "input": [{"role": "user", "content": "Rate: {{item.output}}"}]}
    refused(bob.post("/data_generation/jobs", json={**ok, "seed_file": bob_seeds, "filters": {
        "grader": judge}}), 404, "filters.grader.model")  # alice's model as bob's judge
    refused(alice.post("/data_generation/jobs", json={**ok, "filters": {"grader": {
        **judge, "model": TINY, "input": [{"role": "user", "content": "{{item.answer}}"}]}}}),
        400, "filters.grader.input.0.content")  # not a field of a candidate
    refused(alice.post("/data_generation/jobs", json={**ok, "filters": {"min_words": 9,
                                                                         "max_words": 3}}),
            400, "filters.max_words")
    refused(alice.get("/data_generation/jobs/dgjob-" + "0" * 24), 404, "job_id")


def test_a_job_in_process_is_cancelled_and_writes_no_file(app_url):
    url, *_ = app_url
    alice, bob = api(url), api(url, "key-bob")
    seed_id = upload(alice, SEED_FILE.read_bytes())
    files_before = {f["id"] for f in alice.get("/files").json()["data"]}
    job = alice.post("/data_generation/jobs", json={
        "seed_file": seed_id, "model": TINY, "count": 500, "prompts_per_round": 2,
        "sampling": {"max_tokens": 32}}).json()
    assert job["status"] == "queued" and job["seed_tasks"] == 40
    refused(bob.get(f"/data_generation/jobs/{job['id']}"), 404, "job_id")
    deadline = time.monotonic() + 60
    while not alice.get(f"/data_generation/jobs/{job['id']}/events").json()["data"]:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    cancelled = alice.post(f"/data_generation/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    refused(alice.post(f"/data_generation/jobs/{job['id']}/cancel"), 409, "job_id")
    time.sleep(2)  # the round in flight ends; nothing is written after the cancel
    assert alice.get(f"/data_generation/jobs/{job['id']}").json()["result_file"] is None
    assert {f["id"] for f in alice.get("/files").json()["data"]} == files_before
    assert [j["id"] for j in alice.get("/data_generation/jobs").json()["data"]][0] == job["id"]


# -- end to end under Serve, through the CLI ---------------------------------------------------


def test_self_instruct_end_to_end_through_the_cli(shared_service, capsys, monkeypatch):
    """``tuneserve data self-instruct`` uploads the seed tasks, starts the job (a driver actor
    calling the tiny model's chat deployment in batches) and follows it to a new training
    file that says how it was made, and that a fine-tuning job accepts."""
    monkeypatch.setenv("TUNESERVE_BASE_URL", f"{shared_service.url}/v1")
    code = cli(["data", "self-instruct", str(SEED_FILE), "--model", TINY, "--count", "4",
                "--max-tokens", "48", "--prompts-per-round", "8",
                # The tiny model's greedy answer is blank lines: sample its instances.
                "--instance-temperature", "1", "--follow"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "round 1: examples" in out and "candidates" in out, out
    client = api(shared_service.url)
    job = client.get("/data_generation/jobs").json()["data"][0]
    assert job["status"] == "succeeded" and job["examples"] == 4, job
    assert f"{job['examples']} examples in {job['result_file']}" in out

    record = client.get(f"/files/{job['result_file']}").json()
    assert record["purpose"] == "fine-tune" and record["description"]["examples"] == 4
    made = record["description"]["generation"]
    assert made["generator"] == TINY and made["method"] == "self_instruct"
    assert made["seed_sha256"] == hashlib.sha256(SEED_FILE.read_bytes()).hexdigest()
    assert made["settings"]["filters"]["rouge_l_threshold"] == 0.7
    assert made["settings"]["sampling"]["max_tokens"] == 48
    assert set(made["removed"]) == set(REASONS) and made["removed"] == job["removed"]
    assert made["candidates"] >= 4 + sum(made["removed"].values()) - made["removed"][
        "no_instances"] - made["removed"]["quality"]
    lines = client.get(f"/files/{job['result_file']}/content").text.splitlines()
    assert len(lines) == 4
    for line in lines:
        roles = [m["role"] for m in json.loads(line)["messages"]]
        assert roles == ["user", "assistant"]

    events = client.get(f"/data_generation/jobs/{job['id']}/events").json()["data"]
    rounds = [e for e in events if e["type"] == "metrics"]
    assert rounds and rounds[-1]["data"]["examples"] == 4
    assert set(rounds[-1]["data"]["removed"]) == set(REASONS)

    # Ready for a job as it is.
    ft = client.post("/fine_tuning/jobs", json={"model": TINY, "training_file":
                                                 job["result_file"]})
    assert ft.status_code == 200, ft.text
    client.post(f"/fine_tuning/jobs/{ft.json()['id']}/cancel")
