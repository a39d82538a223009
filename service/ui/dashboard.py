"""The dashboard at ``/ui``: server-rendered pages for people, behind the same API keys.

A browser cannot send an ``Authorization`` header on a page load, so ``/ui/login`` takes the key
in a form and keeps it in an HttpOnly, SameSite=Strict cookie (``service.api.auth.COOKIE``) that
``get_tenant`` accepts like the header; the chat box's requests carry ``X-Tuneserve-UI: 1``,
which ``get_tenant`` requires of cookie-signed POSTs (no cross-site form can set it). Pages are
sent with a strict Content-Security-Policy: the one inline script runs by nonce.
"""

from __future__ import annotations

import datetime as dt
import secrets
from html import escape
from typing import Any
from urllib.parse import parse_qs

import jinja2
from markupsafe import Markup
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from service.ui import charts
from service.ui.evals import eval_view
from service.api.auth import COOKIE, get_tenant, tenant_for_key
from service.ui.templates import TEMPLATES
from service.core.errors import NotFound, Unauthorized
from service.jobs.store import ACTIVE, JobRecord, JobStore
from service.api.routes.fine_tuning import read_checkpoints, read_events
from service.core.names import base_model_ids, parse_tuned_model
from service.jobs.progress import latest_metrics, metric_series

router = APIRouter(prefix="/ui", include_in_schema=False)

_env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True,
                          undefined=jinja2.StrictUndefined)

MAX_JOBS = 50
MAX_EVENTS = 200
REFRESH_S = 5
"""A page of an unfinished job reloads itself this often."""

LABELS = {"train_loss": "train loss", "valid_loss": "valid loss",
          "train_mean_token_accuracy": "train acc", "valid_mean_token_accuracy": "valid acc",
          "reward_mean": "mean reward", "valid_score": "held-out score",
          "full_valid_score": "final held-out score"}


# --- log in and out -------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request) -> Response:
    if not request.app.state.settings.api_keys:
        return RedirectResponse("/ui", status_code=303)
    return _render(request, "login", title="Log in", tenant=None, error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    key = (form.get("api_key") or [""])[0].strip()
    try:
        tenant_for_key(request.app.state.settings, f"Bearer {key}")
    except Unauthorized:
        return _render(request, "login", status=401, title="Log in", tenant=None,
                       error="That API key is not valid.")
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- pages ----------------------------------------------------------------------------------


@router.get("")
async def jobs_page(request: Request) -> Response:
    tenant = _tenant(request)
    if tenant is None:
        return _to_login()
    rows = await run_in_threadpool(_job_rows, request, tenant)
    refresh = REFRESH_S if any(r["job"].status in ACTIVE for r in rows) else None
    return _render(request, "jobs", title="Jobs", tenant=tenant, jobs=rows, refresh=refresh)


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    tenant = _tenant(request)
    if tenant is None:
        return _to_login()
    try:
        page = await run_in_threadpool(_job_view, request, job_id, tenant)
    except NotFound as exc:
        return HTMLResponse(f"<p>{escape(exc.message)}</p>", status_code=404)
    return _render(request, "job", title=job_id, tenant=tenant, **page)


@router.get("/chat")
async def chat_page(request: Request, model: str | None = None) -> Response:
    tenant = _tenant(request)
    if tenant is None:
        return _to_login()
    settings = request.app.state.settings
    jobs = await run_in_threadpool(JobStore(request.app.state.storage).list, tenant)
    tuned = [j.fine_tuned_model for j in jobs if j.status == "succeeded" and j.fine_tuned_model]
    bases = base_model_ids(settings)
    models = tuned + bases
    left = model if model in models else (tuned[0] if tuned else (bases[0] if bases else ""))
    right = _base_of(left) if _base_of(left) in bases else (bases[0] if bases else "")
    return _render(request, "chat", title="Chat", tenant=tenant, models=models, left=left,
                   right=right)


# --- helpers --------------------------------------------------------------------------------


def _tenant(request: Request) -> str | None:
    try:
        return get_tenant(request)
    except Unauthorized:
        return None


def _to_login() -> Response:
    return RedirectResponse("/ui/login", status_code=303)


def _render(request: Request, template: str, *, status: int = 200, **context: Any) -> Response:
    nonce = secrets.token_urlsafe(16)
    context.setdefault("refresh", None)
    logged_in = COOKIE in request.cookies and bool(request.app.state.settings.api_keys)
    html = _env.get_template(template).render(nonce=nonce, logged_in=logged_in, **context)
    return HTMLResponse(html, status_code=status, headers={
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            f"script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"),
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store"})


def _job_rows(request: Request, tenant: str) -> list[dict[str, Any]]:
    storage = request.app.state.storage
    rows = []
    for job in JobStore(storage).list(tenant)[:MAX_JOBS]:
        step, total = _progress(job, latest_metrics(storage, job.id)
                                if job.status not in ("validating_files", "queued") else None)
        rows.append({"job": job, "step": step, "total": total, "created": _time(job.created_at)})
    return rows


def _progress(job: JobRecord, latest: dict | None) -> tuple[int, int | None]:
    if not latest:
        return 0, None
    total = latest.get("total_steps")
    step = latest.get("step", 0)
    if job.status == "succeeded" and total:
        step = total
    return step, total


def _job_view(request: Request, job_id: str, tenant: str) -> dict[str, Any]:
    storage = request.app.state.storage
    job = JobStore(storage).get(job_id, tenant)
    events = read_events(storage, job.id)
    series = metric_series(events)
    latest = next((e.get("data") for e in reversed(events) if e.get("type") == "metrics"), None)
    step, total = _progress(job, latest)
    method = job.method.get("type", "supervised")
    hp = (job.method.get(method) or {}).get("hyperparameters") or job.hyperparameters
    return {
        "job": job, "step": step, "total": total, "created": _time(job.created_at),
        "finished": _time(job.finished_at) if job.finished_at else None,
        "hyperparameters": hp, "charts": _charts(series),
        "checkpoints": read_checkpoints(storage, job),
        "events": [{**e, "time": _time(e["created_at"])} for e in reversed(events[-MAX_EVENTS:])],
        "refresh": REFRESH_S if job.status in ACTIVE else None, "fmt": _fmt,
        "evaluation": eval_view(storage, events, tenant),
    }


def _charts(series: charts.Series) -> list[str]:
    """Loss; token accuracy (and DPO reward accuracy); DPO reward margin — against step."""
    def pick(*names: str, containing: str | None = None) -> charts.Series:
        chosen = {n: series[n] for n in names if n in series}
        if containing:
            chosen.update({n: p for n, p in series.items() if containing in n})
        return chosen

    labels = {**LABELS, **{n: n.replace("rewards/", "reward ") for n in series if "rewards/" in n}}
    drawn = [
        charts.line_chart("loss", "Loss", pick("train_loss", "valid_loss"), labels),
        charts.line_chart("accuracy", "Accuracy",
                          pick("train_mean_token_accuracy", "valid_mean_token_accuracy",
                               containing="rewards/accuracies"), labels),
        charts.line_chart("margin", "Reward margin (DPO)", pick(containing="rewards/margins"),
                          labels),
        charts.line_chart("reward", "Reward (reinforcement): mean of the rollouts, held-out score",
                          pick("reward_mean", "valid_score", "full_valid_score"), labels),
    ]
    return [Markup(c) for c in drawn if c]


def _base_of(model: str) -> str:
    try:
        tuned = parse_tuned_model(model)
    except NotFound:
        return model
    return tuned.base_model if tuned else model


def _time(unix: int) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
