"""For people, end to end: the ``tuneserve`` CLI, the dashboard in headless Chromium, ``/metrics``
and the logs, against one ``tuneserve up`` (local storage, API keys on) training the tiny model.

The tests share one service and one job (module fixtures); the last test stops the service and
greps everything it and its Ray wrote for the API key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, Service, scrape_metrics

pytestmark = pytest.mark.slow

TINY = "tuneserve/tiny-llama"
API_KEY = "sk-e2e-0f3a9c1d77b24e58"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


def chat_file(n: int) -> str:
    rows = [{"messages": [{"role": "user", "content": f"Repeat the word number {i}."},
                          {"role": "assistant", "content": f"word {i % 7}"}]} for i in range(n)]
    return "\n".join(json.dumps(r) for r in rows) + "\n"


@pytest.fixture(scope="module")
def ray_tmp():
    # A private Ray temp dir (short: Ray's socket paths must stay under 107 characters), so the
    # log grep reads this service's Ray logs and no one else's.
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory, ray_tmp):
    # Not the shared service: this one has API keys on and a private Ray temp dir, and the last
    # test stops it to grep all it logged.
    storage = tmp_path_factory.mktemp("people") / "storage"
    env = {"TUNESERVE_API_KEYS": f"{API_KEY}:alice", "TUNESERVE_CPUS_PER_WORKER": "1",
           "RAY_TMPDIR": str(ray_tmp)}
    svc = Service(str(storage), env=env).start()
    yield svc
    svc.stop()


def cli(service: Service, *args: str, stdin: str | None = None, timeout: float = 300,
        key: str = API_KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNESERVE_BASE_URL": f"{service.url}/v1", "TUNESERVE_API_KEY": key}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.run([sys.executable, "-m", "service.cli.main", *args], check=False, cwd=REPO,
                          env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def scrape(service: Service) -> dict[str, float]:
    return scrape_metrics(service.url, API_KEY)


@pytest.fixture(scope="module")
def metrics_before(service):
    return scrape(service)


@pytest.fixture(scope="module")
def trained(service, metrics_before, tmp_path_factory):
    """validate → upload → create → follow, through the CLI, as a user would."""
    data = tmp_path_factory.mktemp("data")
    good, bad = data / "train.jsonl", data / "bad.jsonl"
    good.write_text(chat_file(32))
    bad.write_text(chat_file(2) + "{not json\n" + json.dumps({"messages": [
        {"role": "user", "content": "no answer"}]}) + "\n")
    runs = {"validate_bad": cli(service, "files", "validate", str(bad)),
            "validate": cli(service, "files", "validate", str(good)),
            "upload": cli(service, "files", "upload", str(good))}
    file_id = runs["upload"].stdout.split()[0]
    runs["create"] = cli(service, "jobs", "create", "--model", TINY, "--training-file", file_id,
                         "--n-epochs", "2", "--batch-size", "8", "--suffix", "people",
                         "--seed", "5", "--json")
    job = json.loads(runs["create"].stdout)
    runs["follow"] = cli(service, "jobs", "follow", job["id"], timeout=600)
    return {"file_id": file_id, "job_id": job["id"], "runs": runs,
            "model": f"ft:{TINY}:people:{job['id']}"}


def test_cli_validates_uploads_creates_and_follows_a_job_to_success(service, trained):
    runs = trained["runs"]
    bad = runs["validate_bad"]
    assert bad.returncode == 1
    assert re.search(r"bad\.jsonl:3: invalid_json", bad.stdout), bad.stdout
    assert re.search(r"bad\.jsonl:4: no_assistant_turn", bad.stdout), bad.stdout
    assert runs["validate"].returncode == 0 and "32 examples" in runs["validate"].stdout
    assert runs["upload"].returncode == 0, runs["upload"].stderr
    assert trained["file_id"].startswith("file-") and "32 examples" in runs["upload"].stdout

    follow = runs["follow"]
    assert follow.returncode == 0, follow.stdout + follow.stderr
    steps = [int(m) for m in re.findall(r"^step (\d+)/8 ", follow.stdout, re.MULTILINE)]
    assert steps == list(range(1, 9)), follow.stdout  # the view shows the steps advancing
    assert re.search(r"^step 8/8 \[#{20}\] 100%\s+loss \d+\.\d{4}\s+acc \d\.\d{3}", follow.stdout,
                     re.MULTILINE), follow.stdout
    assert "Fine-tuning job started" in follow.stdout
    assert follow.stdout.rstrip().endswith(f"succeeded; model {trained['model']}")

    listed = cli(service, "jobs", "list")
    assert re.search(rf"{trained['job_id']}\s+succeeded\s+{TINY}", listed.stdout), listed.stdout
    got = json.loads(cli(service, "jobs", "get", trained["job_id"], "--json").stdout)
    assert got["status"] == "succeeded" and got["fine_tuned_model"] == trained["model"]
    assert trained["model"] in cli(service, "models", "list").stdout


def test_cli_chat_answers_one_shot_and_in_a_conversation(service, trained):
    one = cli(service, "chat", trained["model"], "-m", "Repeat the word number 3.",
              "--max-tokens", "8", "--seed", "1")
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip(), "the streamed answer should be printed"
    talk = cli(service, "chat", TINY, "--max-tokens", "4", stdin="hello\nand again\n/exit\n")
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout.count("\n") >= 2 and talk.stdout.strip(), talk.stdout  # two answers


def test_cli_errors_are_one_clear_line(service, trained):
    missing = cli(service, "jobs", "get", "ftjob-" + "0" * 24)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "No fine-tuning job" in missing.stderr
    assert "Traceback" not in missing.stderr
    wrong_key = cli(service, "jobs", "list", key="sk-wrong-key")
    assert wrong_key.returncode == 1 and "Incorrect API key" in wrong_key.stderr
    assert wrong_key.stderr.count("\n") == 1
    finished = cli(service, "jobs", "cancel", trained["job_id"])
    assert finished.returncode == 1 and "already succeeded" in finished.stderr


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("Debian's chromium and chromium-driver are needed: run `make browser`")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1200,1500")
    driver = webdriver.Chrome(service=DriverService(executable_path=shutil.which("chromedriver")),
                              options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_shows_the_job_its_loss_curve_and_answers_in_chat(service, trained, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(f"{service.url}/ui")
    assert browser.current_url.endswith("/ui/login"), "the dashboard needs the API key"
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "login").click()
    # A click returns before the next page has loaded: wait for what the test looks for.
    wait = WebDriverWait(browser, 30)
    row = wait.until(lambda b: b.find_element(
        By.CSS_SELECTOR, f'tr.job[data-job-id="{trained["job_id"]}"]'))
    assert row.get_attribute("data-status") == "succeeded"
    cookie = browser.get_cookie("tuneserve_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    row.find_element(By.TAG_NAME, "a").click()
    events = httpx.get(f"{service.url}/v1/fine_tuning/jobs/{trained['job_id']}/events",
                       params={"limit": 1000},
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    reported = {e["data"]["step"] for e in events["data"] if e["type"] == "metrics"}
    points = wait.until(lambda b: b.find_elements(
        By.CSS_SELECTOR, 'svg[data-chart="loss"] circle.point[data-series="train_loss"]'))
    assert len(reported) == 8 and len(points) == len(reported)
    assert sorted(int(p.get_attribute("data-step")) for p in points) == sorted(reported)
    assert browser.find_elements(By.CSS_SELECTOR, 'svg[data-chart="accuracy"] circle.point')
    assert len(browser.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) >= 1
    browser.save_screenshot(str(ARTIFACTS / "dashboard-job.png"))

    browser.find_element(By.ID, "try-chat").click()
    wait.until(lambda b: b.find_element(By.ID, "send"))
    assert browser.find_element(By.ID, "model-tuned").get_attribute("value") == trained["model"]
    assert browser.find_element(By.ID, "model-base").get_attribute("value") == TINY
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("8")
    browser.find_element(By.ID, "prompt").send_keys("Repeat the word number 3.")
    browser.find_element(By.ID, "send").click()
    answers = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "pre.answer"))
    WebDriverWait(browser, 120).until(
        lambda _: all(a.get_attribute("data-done") == "1" for a in answers))
    browser.save_screenshot(str(ARTIFACTS / "dashboard-chat.png"))
    for answer in answers:
        assert answer.text.strip(), "each model should answer"
        assert "error" not in answer.get_attribute("class"), answer.text


def test_metrics_parse_and_move_after_a_job_and_a_chat(service, trained, metrics_before):
    after = scrape(service)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - metrics_before.get(name, 0.0)

    assert moved('tuneserve_jobs{status="succeeded"}') == 1
    assert moved("tuneserve_training_steps_total{}") == 8
    assert moved("tuneserve_trained_tokens_total{}") > 0
    assert moved('tuneserve_upload_bytes_total{outcome="accepted"}') >= len(chat_file(32))
    assert moved('tuneserve_chat_requests_total{model_type="tuned",outcome="ok"}') >= 1
    assert moved('tuneserve_chat_requests_total{model_type="base",outcome="ok"}') >= 1
    assert moved('tuneserve_chat_tokens_total{kind="completion",model_type="tuned"}') >= 1
    assert moved('tuneserve_chat_request_duration_seconds_count{model_type="tuned"}') >= 1
    assert moved("tuneserve_adapter_load_seconds_count{}") >= 1  # the tuned chat hot-loaded
    assert max(v for k, v in after.items() if k.startswith("tuneserve_adapters_loaded{")) >= 1
    assert moved('tuneserve_http_requests_total{method="POST",route="/v1/fine_tuning/jobs",'
                 'status="200"}') >= 1


def test_the_api_key_is_never_logged(service, trained, ray_tmp):
    """Last: stops the service so every log is flushed, then greps all of them."""
    # A few more ways a key could leak: a wrong key, a key in a header the API does not read.
    httpx.get(f"{service.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"})
    httpx.get(f"{service.url}/v1/models", headers={"X-Api-Key": API_KEY,
                                                   "Authorization": f"Bearer {API_KEY}"})
    assert service.stop() == 0
    files = [service.log_path] + [p for p in ray_tmp.rglob("*") if p.is_file()]
    assert len(files) > 20, "Ray's session logs should be there to grep"
    leaks = [str(p) for p in files if API_KEY.encode() in p.read_bytes()]
    assert not leaks, f"the API key is in {leaks}"
    # The grep read the right logs: the service's own JSON lines, with the tenant, are there.
    texts = "\n".join(p.read_text(errors="replace") for p in files if p.suffix in (".err", ".log"))
    assert '"logger": "tuneserve.access"' in texts and '"tenant": "alice"' in texts
    # Lines the training workers and the job's driver wrote name the job. The model cache
    # (training.model.registry) is shared with serving, whose replicas build a base model outside any job.
    training = [json.loads(line[line.index("{"):]) for line in texts.splitlines()
                if '"logger": "training.' in line and "{" in line
                and '"logger": "training.model.registry"' not in line]
    assert training
    unnamed = [line for line in training if line.get("job_id") != trained["job_id"]]
    assert not unnamed, unnamed[:3]
