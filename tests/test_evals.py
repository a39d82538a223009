"""The Evals API and the grader endpoints over HTTP, with the tiny model answering.

Most tests use one in-process app (LocalChatBackend: the run goes beside the app, the path a
test without Serve takes); ``test_a_run_goes_off_the_api_replica_under_serve`` runs one eval on
the shared ``tuneserve up``, where the run is a detached actor. The SmolLM2 sort comparison
(base 0 %, a sort adapter as ``tuneserve eval``) trains for ~9 minutes: it is ``heavy``.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from service.cli import eval_tasks
from service.cli.client import Client
from service.cli.evaluate import EXACT, ITEM_SCHEMA, Case, run_cases, summarize
from tests.helpers import api, in_process_app, scrape_metrics
from training.model.registry import TINY_MODEL_ID as TINY

SORT_EVAL = {"name": "sort", "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
             "testing_criteria": [EXACT]}


def completions(model: str, source: dict, max_tokens: int = 8) -> dict:
    return {"type": "completions", "model": model, "source": source,
            "input_messages": {"type": "template",
                               "template": [{"role": "user", "content": "{{item.prompt}}"}]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens}}


def inline(items: list[dict]) -> dict:
    return {"type": "file_content", "content": [{"item": i} for i in items]}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with in_process_app(tmp_path_factory.mktemp("storage")) as app:
        yield app


def finished(client: httpx.Client, eval_id: str, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/evals/{eval_id}/runs/{run_id}").json()
        if run["status"] in ("completed", "failed", "canceled"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} still {run['status']}")


def refused(response: httpx.Response, status: int, param: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error["message"]


def test_grader_endpoints_run_and_validate(app_url):
    url, *_ = app_url
    client = api(url)
    grader = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
              "reference": "{{item.label}}", "operation": "eq"}
    ran = client.post("/fine_tuning/alpha/graders/run",
                      json={"grader": grader, "item": {"label": "yes"}, "model_sample": "yes"})
    assert ran.status_code == 200 and ran.json()["reward"] == 1.0
    assert not any(v for v in ran.json()["metadata"]["errors"].values())
    assert client.post("/fine_tuning/alpha/graders/validate",
                       json={"grader": grader}).json() == {"grader": grader}
    message = refused(client.post("/fine_tuning/alpha/graders/run", json={
        "grader": grader, "item": {"name": "x"}, "model_sample": "x"}), 400, "item.label")
    assert "item.label" in message
    refused(client.post("/fine_tuning/alpha/graders/validate", json={
        "grader": {**grader, "type": "regex"}}), 400, "grader.type")
    assert "sandbox" in refused(client.post("/fine_tuning/alpha/graders/validate", json={
        "grader": {"type": "python", "name": "p", "source": "def grade(s, i): return 1"}}),
        400, "grader.type")


def test_a_served_judge_scores_in_range_and_its_requests_are_chat_requests(app_url):
    url, tuned, _ = app_url
    client = api(url)
    judge = {"type": "score_model", "name": "judge", "model": tuned, "range": [0, 10],
             "input": [{"role": "system", "content": "Answer with a number from 0 to 10."},
                       {"role": "user", "content": "Reference: {{item.label}}\n"
                                                   "Answer: {{sample.output_text}}"}],
             "sampling_params": {"max_completions_tokens": 4}}
    before = scrape_metrics(url, "key-alice")
    ran = client.post("/fine_tuning/alpha/graders/run", json={
        "grader": judge, "item": {"label": "[1, 2]"}, "model_sample": "[1, 2]"}).json()
    after = scrape_metrics(url, "key-alice")
    assert 0 <= ran["reward"] <= 10
    # The tiny model's answer is random text: a number in range, or a parse error at 0.
    assert ran["metadata"]["errors"]["model_grader_parse_error"] or ran["reward"] > 0
    usage = ran["model_grader_token_usage_per_model"][tuned]
    assert usage["invocation_count"] == 1 and 0 < usage["completion_tokens"] <= 4
    key = 'tuneserve_chat_requests_total{model_type="tuned",outcome="ok"}'
    assert after[key] == before.get(key, 0) + 1
    # Another tenant cannot judge with alice's model (nor learn that it exists).
    refused(api(url, "key-bob").post("/fine_tuning/alpha/graders/run", json={
        "grader": judge, "item": {"label": "x"}, "model_sample": "x"}), 404, "grader.model")


def test_a_label_judge_always_answers_with_one_of_its_labels(app_url):
    """The tiny model writes random text; held to the labels by constrained decoding, its
    verdict is still always one of them, never a parse error."""
    url, tuned, _ = app_url
    client = api(url)
    judge = {"type": "label_model", "name": "verdict", "model": tuned,
             "input": [{"role": "user", "content": "Is {{sample.output_text}} sorted?"}],
             "labels": ["yes", "no", "unsure"], "passing_labels": ["yes"]}
    for sample in ("[1, 2]", "[3, 1]", "banana"):
        ran = client.post("/fine_tuning/alpha/graders/run", json={
            "grader": judge, "item": {}, "model_sample": sample}).json()
        assert ran["metadata"]["errors"]["model_grader_parse_error"] is False, ran
        assert ran["reward"] in (0.0, 1.0) and ran["metadata"]["passed"] is (ran["reward"] == 1)


def test_eval_objects_are_crud_and_per_tenant(app_url):
    url, *_ = app_url
    alice, bob = api(url), api(url, "key-bob")
    created = alice.post("/evals", json={**SORT_EVAL, "metadata": {"team": "a"}}).json()
    assert created["object"] == "eval" and created["testing_criteria"] == [EXACT]
    assert alice.get(f"/evals/{created['id']}").json() == created
    assert created["id"] in [e["id"] for e in alice.get("/evals").json()["data"]]
    assert created["id"] not in [e["id"] for e in bob.get("/evals").json()["data"]]
    refused(bob.get(f"/evals/{created['id']}"), 404, "eval_id")
    renamed = alice.post(f"/evals/{created['id']}", json={"name": "sorting"}).json()
    assert renamed["name"] == "sorting" and renamed["metadata"] == {"team": "a"}
    assert alice.delete(f"/evals/{created['id']}").json() == {
        "object": "eval.deleted", "deleted": True, "eval_id": created["id"]}
    refused(alice.get(f"/evals/{created['id']}"), 404, "eval_id")
    # The official client reads these shapes.
    import openai

    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="key-alice", max_retries=0)
    made = sdk.evals.create(name="sdk", testing_criteria=[EXACT],
                            data_source_config=SORT_EVAL["data_source_config"])
    assert sdk.evals.retrieve(made.id).testing_criteria[0].type == "string_check"
    assert sdk.fine_tuning.alpha.graders.run(grader=EXACT, item={"reference": "a"},
                                             model_sample="a").reward == 1.0
    assert sdk.evals.delete(made.id).deleted


def test_a_run_grades_as_the_chat_path_does(app_url):
    """Half the references are a tuned model's own greedy answers (from chat completions),
    half the true sorted lists: the eval's pass rate must be what exact match over the chat
    path gives, item by item, and what ``tuneserve eval`` reports on the same items."""
    url, tuned, _ = app_url
    client, cli = api(url), Client(f"{url}/v1", "key-alice", timeout=120)
    held = eval_tasks.heldout("sort", 8, seed=5)

    def chat(prompt: str) -> str:
        reply = client.post("/chat/completions", json={
            "model": tuned, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}).json()
        return reply["choices"][0]["message"]["content"]
    items = [{"prompt": e.prompt, "reference": chat(e.prompt) if i % 2 else e.output}
             for i, e in enumerate(held)]
    eval_id = client.post("/evals", json=SORT_EVAL).json()["id"]
    lines = "".join(json.dumps({"item": item}) + "\n" for item in items).encode()
    file_id = client.post("/files", data={"purpose": "evals"},
                          files={"file": ("items.jsonl", lines)}).json()["id"]
    run = client.post(f"/evals/{eval_id}/runs", json={
        "data_source": completions(tuned, {"type": "file_id", "id": file_id})})
    assert run.status_code == 201 and run.json()["status"] == "queued"
    run = finished(client, eval_id, run.json()["id"])
    assert run["status"] == "completed", run
    assert run["result_counts"] == {"total": 8, "passed": 4, "failed": 4, "errored": 0}
    assert run["per_testing_criteria_results"] == [
        {"testing_criteria": "exact match", "passed": 4, "failed": 4}]
    assert run["per_model_usage"][0]["model_name"] == tuned
    assert run["per_model_usage"][0]["invocation_count"] == 8
    page = client.get(f"/evals/{eval_id}/runs/{run['id']}/output_items",
                      params={"limit": 100}).json()
    assert [o["status"] for o in page["data"]] == ["fail", "pass"] * 4
    assert [o["datasource_item"] for o in page["data"]] == items
    one = client.get(f"/evals/{eval_id}/runs/{run['id']}/output_items/{page['data'][1]['id']}")
    assert one.json()["sample"]["output"][0]["content"] == items[1]["reference"]
    passed = client.get(f"/evals/{eval_id}/runs/{run['id']}/output_items",
                        params={"status": "pass"}).json()["data"]
    assert [o["datasource_item_id"] for o in passed] == [1, 3, 5, 7]
    # `tuneserve eval` (its ready-made sort eval) on the same items: the same rate; the base
    # model on the true references: 0 %.
    cases = [Case(i["prompt"], i["reference"]) for i in items]
    assert summarize(tuned, "sort", run_cases(cli, tuned, "sort", cases, max_tokens=8),
                     1.0)["exact_match"] == 0.5
    truth = [Case(e.prompt, e.output) for e in held]
    assert summarize(TINY, "sort", run_cases(cli, TINY, "sort", truth, max_tokens=8),
                     1.0)["exact_match"] == 0.0
    assert len(client.get(f"/evals/{eval_id}/runs").json()["data"]) == 1  # the CLI: its own
    refused(client.post(f"/evals/{eval_id}/runs/{run['id']}"), 409, "run_id")  # finished


def test_bad_input_is_a_4xx_naming_the_field(app_url):
    url, tuned, _ = app_url
    alice, bob = api(url), api(url, "key-bob")
    refused(alice.post("/evals", json={**SORT_EVAL, "testing_criteria": [
        {**EXACT, "type": "regex_check"}]}), 400, "testing_criteria.0.type")
    assert "item.answer" in refused(alice.post("/evals", json={**SORT_EVAL, "testing_criteria": [
        {**EXACT, "reference": "{{item.answer}}"}]}), 400, "testing_criteria.0.reference")
    assert "download" in refused(alice.post("/evals", json={**SORT_EVAL, "testing_criteria": [
        {"type": "text_similarity", "name": "m", "input": "{{sample.output_text}}",
         "reference": "{{item.reference}}", "evaluation_metric": "meteor",
         "pass_threshold": 0.5}]}), 400, "testing_criteria.0.evaluation_metric")
    eval_id = bob.post("/evals", json=SORT_EVAL).json()["id"]
    good = [{"prompt": "Sort this list in ascending order: [2, 1]", "reference": "[1, 2]"}]
    refused(bob.post(f"/evals/{eval_id}/runs", json={
        "data_source": completions(tuned, inline(good))}), 404, "data_source.model")
    assert "reference" in refused(bob.post(f"/evals/{eval_id}/runs", json={
        "data_source": completions(TINY, inline([{"prompt": "x"}]))}), 400,
        "data_source.source.item.reference")
    assert "Item 1" in refused(bob.post(f"/evals/{eval_id}/runs", json={"data_source": {
        **completions(TINY, inline(good)), "input_messages": {"type": "template", "template": [
            {"role": "user", "content": "{{item.question}}"}]}}}), 400,
        "data_source.input_messages")
    refused(bob.post(f"/evals/{eval_id}/runs", json={"data_source": {
        **completions(TINY, inline(good)), "type": "responses"}}), 400, "data_source.type")
    refused(bob.post(f"/evals/{eval_id}/runs", json={"data_source": completions(
        TINY, {"type": "file_id", "id": "file-" + "0" * 24})}), 404, "data_source.source.id")


def test_a_run_goes_off_the_api_replica_under_serve(shared_service):
    """Under Serve the run is a detached actor calling the chat deployment: its judge's
    requests still reach the API's /metrics (from the run record)."""
    from tests.helpers import wait_until

    client = api(shared_service.url)
    judge = {"type": "score_model", "name": "judge", "model": TINY, "range": [0, 10],
             "input": [{"role": "user", "content": "Score 0-10: {{sample.output_text}}"}],
             "sampling_params": {"max_completions_tokens": 4}}
    eval_id = client.post("/evals", json={
        **SORT_EVAL, "testing_criteria": [EXACT, judge]}).json()["id"]
    items = [{"prompt": e.prompt, "reference": e.output}
             for e in eval_tasks.heldout("sort", 6, seed=7)]
    calls, done = "tuneserve_eval_judge_requests_total{}", 'tuneserve_eval_runs{status="completed"}'
    before = scrape_metrics(shared_service.url)
    run = client.post(f"/evals/{eval_id}/runs", json={
        "data_source": completions(TINY, inline(items), max_tokens=4)}).json()
    run = finished(client, eval_id, run["id"], timeout=180)
    assert run["status"] == "completed" and run["result_counts"]["total"] == 6
    assert run["result_counts"]["passed"] == 0  # the random tiny model sorts nothing
    usage = {u["model_name"]: u for u in run["per_model_usage"]}
    assert usage[TINY]["invocation_count"] == 6 + 6  # six samples, six judge calls
    after = wait_until(lambda: (m := scrape_metrics(shared_service.url))[done] > before.get(
        done, 0) and m, timeout=15, what="the run in /metrics")
    assert after[calls] - before.get(calls, 0) == 6
    tokens = 'tuneserve_eval_judge_tokens_total{kind="completion"}'
    assert 6 <= after[tokens] - before.get(tokens, 0) <= 6 * 4


def test_a_job_reports_its_eval_before_and_after_and_reuses_the_before(shared_service):
    from tests.helpers import sorting_lines, wait_until

    client = api(shared_service.url)
    eval_id = client.post("/evals", json=SORT_EVAL).json()["id"]
    items = [{"prompt": e.prompt, "reference": e.output}
             for e in eval_tasks.heldout("sort", 3, seed=9)]
    source = {k: v for k, v in completions(TINY, inline(items), max_tokens=4).items()
              if k not in ("type", "model")}
    file_id = client.post("/files", data={"purpose": "fine-tune"}, files={
        "file": ("train.jsonl", sorting_lines(8, seed=2))}).json()["id"]
    refused(client.post("/fine_tuning/jobs", json={
        "model": TINY, "training_file": file_id, "eval": {"id": "eval_" + "0" * 24}}),
        404, "eval.id")

    def job() -> dict:
        created = client.post("/fine_tuning/jobs", json={
            "model": TINY, "training_file": file_id, "suffix": "evald",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 8}}},
            "eval": {"id": eval_id, "data_source": source}})
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        done = wait_until(lambda: (j := client.get(f"/fine_tuning/jobs/{job_id}").json())[
            "status"] in ("succeeded", "failed", "cancelled") and j, 300, interval=1,
            what=f"job {job_id}")
        assert done["status"] == "succeeded", done

        def evals() -> dict:  # "after" runs once the tuned model is out, so it comes later
            events = client.get(f"/fine_tuning/jobs/{job_id}/events",
                                params={"limit": 1000}).json()["data"]
            found = {e["data"]["eval"]["phase"]: e["data"]["eval"] for e in events
                     if "eval" in (e.get("data") or {})}
            return found if set(found) == {"before", "after"} else None
        found = wait_until(evals, 120, interval=1, what=f"job {job_id}'s eval after training")
        done = client.get(f"/fine_tuning/jobs/{job_id}").json()
        return {**done, "evals": found}

    first = job()
    before, after = first["evals"]["before"], first["evals"]["after"]
    assert (before["model"], before["cached"]) == (TINY, False)
    assert after["model"] == first["fine_tuned_model"]
    for run in (before, after):
        assert run["status"] == "completed" and run["result_counts"]["total"] == 3
    report_id = first["result_files"][-1]
    report = json.loads(client.get(f"/files/{report_id}/content").content)
    assert report["before"]["run_id"] == before["run_id"]
    assert report["after"]["run_id"] == after["run_id"]
    page = httpx.get(f"{shared_service.url}/ui/jobs/{first['id']}",
                     headers={"Authorization": "Bearer local"}, timeout=30).text
    assert '<table id="eval">' in page, page[:3000]
    side_by_side = page[page.index('<table id="eval">'):]
    side_by_side = side_by_side[:side_by_side.index("</table>")]
    assert f"before: <code>{TINY}</code>" in side_by_side
    assert f"after: <code>{first['fine_tuned_model']}</code>" in side_by_side
    assert "exact match" in side_by_side and side_by_side.count("of 3") == 2
    second = job()
    assert second["evals"]["before"]["cached"] is True
    assert second["evals"]["before"]["run_id"] == before["run_id"]  # not sampled again
    assert second["evals"]["after"]["run_id"] != after["run_id"]
    runs = client.get(f"/evals/{eval_id}/runs", params={"limit": 100}).json()["data"]
    assert len(runs) == 3  # one before, two afters


def test_the_job_page_shows_before_after_and_the_items_that_changed(app_url):
    from service.ui.evals import eval_view

    url, tuned, storage = app_url
    client = api(url)
    eval_id = client.post("/evals", json=SORT_EVAL).json()["id"]
    prompts = [e.prompt for e in eval_tasks.heldout("sort", 3, seed=11)]
    answers = [client.post("/chat/completions", json={
        "model": tuned, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": p}]}).json()["choices"][0]["message"]["content"]
        for p in prompts]
    items = [{"prompt": p, "reference": a} for p, a in zip(prompts, answers, strict=True)]
    phases = {}
    for phase, model in (("before", TINY), ("after", tuned)):
        run = client.post(f"/evals/{eval_id}/runs", json={
            "data_source": completions(model, inline(items))}).json()
        run = finished(client, eval_id, run["id"])
        phases[phase] = {"phase": phase, "eval_id": eval_id, "run_id": run["id"],
                         "model": model, "pass_rate": 0.0, "cached": False,
                         "result_counts": run["result_counts"],
                         "per_testing_criteria_results": run["per_testing_criteria_results"]}
    view = eval_view(storage, [{"data": {"eval": p}} for p in phases.values()], "alice")
    assert view["criteria"] == [{"name": "exact match", "before": "0.0%", "after": "100.0%"}]
    assert [(r["id"], r["before"], r["after"]) for r in view["changed"]] == [
        (0, "fail", "pass"), (1, "fail", "pass"), (2, "fail", "pass")]
    assert [r["after_output"] for r in view["changed"]] == answers
    assert eval_view(storage, [{"data": {"eval": p}} for p in phases.values()], "bob")[
        "changed"] == []  # another tenant's runs are not read


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_sort_eval_on_smollm2_base_and_a_sort_adapter_matches_tuneserve_eval(tmp_path):
    """Heavy (~10 min: a SmolLM2 sort job as bench/quality trains it): a string_check eval of
    the held-out sort items gives the base model 0 % and the sort adapter the exact match that
    ``tuneserve eval`` (the demo's figure) reports on the same items.

    Two runs of the same items need not give the same greedy answers: the engine batches the
    run's requests as they arrive, and under bf16 autocast a different batch can flip a near
    tie. So the grader is checked against ``tuneserve eval`` on one run, item by item, and a
    second run only to within a few items."""
    from bench.quality import demo
    from service.core.names import BUILTIN_MODEL_ID
    from tests.helpers import Service

    n_eval, seed = 100, 0
    with Service(str(tmp_path / "storage"), env={"TUNESERVE_TINY_MODEL": "false"}) as service:
        results = tmp_path / "results"
        assert demo.main(["--n-eval", str(n_eval), "--seed", str(seed), "--quiet",
                          "--base-url", f"{service.url}/v1", "--results", str(results)]) == 0
        rows = json.loads((results / "quality.json").read_text())["rows"]
        client = api(service.url, "local")
        # The demo's exact match is tuneserve eval's: computed from the run's items by the CLI,
        # and equal to the string_check grader's pass rate on that same run.
        for name in ("base", "tuned"):
            row = rows[name]
            counts = client.get(f"/evals/{row['eval_id']}/runs/{row['run_id']}").json()[
                "result_counts"]
            assert counts["total"] == n_eval
            assert counts["passed"] / n_eval == row["pass_rate"] == row["exact_match"]
        assert rows["base"]["exact_match"] == 0.0 and rows["tuned"]["exact_match"] > 0.5
        assert rows["base"]["model"] == BUILTIN_MODEL_ID

        # A caller's own eval of the same items: the grader passes exactly the answers that
        # tuneserve eval's check calls correct.
        eval_id = client.post("/evals", json=SORT_EVAL).json()["id"]
        items = [{"prompt": e.prompt, "reference": e.output}
                 for e in eval_tasks.heldout("sort", n_eval, seed)]
        run = client.post(f"/evals/{eval_id}/runs", json={
            "data_source": completions(rows["tuned"]["model"], inline(items),
                                       max_tokens=64)}).json()
        run = finished(client, eval_id, run["id"], timeout=900)
        out = client.get(f"/evals/{eval_id}/runs/{run['id']}/output_items",
                         params={"limit": n_eval}).json()["data"]
        assert len(out) == n_eval
        assert {o["datasource_item_id"]: o["status"] == "pass" for o in out} == {
            o["datasource_item_id"]: eval_tasks.is_correct(
                "sort", o["sample"]["output"][0]["content"], o["datasource_item"]["reference"])
            for o in out}
        rate = run["result_counts"]["passed"] / n_eval
        assert abs(rate - rows["tuned"]["exact_match"]) <= 0.05, (rate, rows["tuned"])
