"""Every id, model name and storage key, built and parsed in one place.

- Ids: ``file-<24 hex>``, ``ftjob-<24 hex>``; a checkpoint ``ftckpt-<24 hex>-<step:08d>``; an
  event ``ftevent-<created_ns:020d>-<seq:06d>``.
- Model names as callers write them: base ids, and ``ft:<base>:<suffix>:<job_id>`` for a tuned
  model, ``…:ckpt-step-<N>`` for one of its checkpoints. The base is always a base model: a job
  tuned from a tuned model names that model's base, so names never nest (``ft:ft:…``).
- Adapter ids (the multiplexed model id in Serve, the folder under ``adapters/``):
  ``<job_id>/final`` and ``<job_id>/ckpt-step-<N>``.
- Storage keys (docs/interfaces.md, "Storage"), built from validated ids only.

Torch-free on purpose: the API replica parses names without loading any model code.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from service.core.errors import NotFound
from service.core.settings import Settings
from service.core.storage import join_key

BUILTIN_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL_ID = "tuneserve/tiny-llama"

# -- ids -------------------------------------------------------------------------------------

FILE_ID_FORM = r"file-[0-9a-f]{24}"
JOB_ID_FORM = r"ftjob-[0-9a-f]{24}"
"""Regular expressions of an id, to use inside a larger one."""
FILE_ID_PATTERN = rf"^{FILE_ID_FORM}$"
JOB_ID_PATTERN = rf"^{JOB_ID_FORM}$"
"""Whole-string patterns (for ``re`` and FastAPI's ``Query(pattern=…)``)."""
FILE_ID = re.compile(FILE_ID_PATTERN)
JOB_ID = re.compile(JOB_ID_PATTERN)

TUNED_PREFIX = "ft:"
FINAL = "final"
_CKPT = re.compile(r"^ckpt-step-(\d+)$")
ADAPTER_ID = re.compile(rf"^{JOB_ID_FORM}/(final|ckpt-step-\d+)$")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def checkpoint_id(job_id: str, step: int) -> str:
    """``ftckpt-<the job id's hex>-<step:08d>``: the id of a job's checkpoint object."""
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-{step:08d}"


# -- model names -----------------------------------------------------------------------------


def base_model_ids(settings: Settings) -> list[str]:
    builtin = ([BUILTIN_MODEL_ID] if settings.builtin_models else []) + (
        [TINY_MODEL_ID] if settings.tiny_model else [])
    return builtin + [m for m in settings.models if m not in builtin]


def deployment_name(base_model: str) -> str:
    """The Serve deployment serving a base model: ``Chat-<last path part, lower-case>``."""
    slug = re.sub(r"[^a-z0-9.-]+", "-", base_model.rsplit("/", 1)[-1].lower()).strip("-")
    return f"Chat-{slug}"


def adapter_folder(step: int | None = None) -> str:
    """``final``, or ``ckpt-step-<step>`` for a checkpoint."""
    return FINAL if step is None else f"ckpt-step-{step}"


def checkpoint_step(folder: str) -> int | None:
    """The step of an adapter folder named ``ckpt-step-<N>``; None for any other name."""
    match = _CKPT.match(folder)
    return int(match.group(1)) if match else None


def adapter_id(job_id: str, step: int | None = None) -> str:
    """``<job_id>/final`` or ``<job_id>/ckpt-step-<step>``."""
    return f"{job_id}/{adapter_folder(step)}"


@dataclass(frozen=True)
class TunedModel:
    base_model: str
    suffix: str
    job_id: str
    step: int | None = None
    """The checkpoint's step, or None for the final adapter."""

    @property
    def name(self) -> str:
        name = f"{TUNED_PREFIX}{self.base_model}:{self.suffix}:{self.job_id}"
        return name if self.step is None else f"{name}:{adapter_folder(self.step)}"

    @property
    def adapter_id(self) -> str:
        """The adapter's folder under ``adapters/`` (its multiplexed model id in Serve)."""
        return adapter_id(self.job_id, self.step)

    @property
    def final(self) -> TunedModel:
        """The job's final model (this one without a checkpoint step)."""
        return TunedModel(self.base_model, self.suffix, self.job_id)


def is_tuned_model(name: str) -> bool:
    return name.startswith(TUNED_PREFIX)


def parse_tuned_model(name: str) -> TunedModel | None:
    """Parse ``ft:…``; None for a name that is not a tuned-model name at all.

    Raises:
        NotFound: ``name`` starts with ``ft:`` but is not a well-formed tuned-model name.
    """
    if not is_tuned_model(name):
        return None
    # A base id may hold ``/`` but never ``:``, so the parts are fixed by position.
    parts = name.split(":")
    step = None
    if len(parts) == 5 and (step := checkpoint_step(parts[4])) is not None:
        parts = parts[:4]
    if len(parts) != 4 or not JOB_ID.match(parts[3]) or not parts[1]:
        raise NotFound(f"The model {name!r} does not exist.", param="model",
                       code="model_not_found")
    return TunedModel(base_model=parts[1], suffix=parts[2], job_id=parts[3], step=step)


def base_model_of(model: str) -> str:
    """The base model under ``model``: itself, or the base a tuned model names."""
    tuned = parse_tuned_model(model)
    return tuned.base_model if tuned else model


def tuned_model(model: str, suffix: str | None, job_id: str,
                step: int | None = None) -> TunedModel:
    """What job ``job_id`` on ``model`` produces: its final model, or its checkpoint ``step``.

    A job tuned from a tuned model names that model's base, as its adapter does.
    """
    return TunedModel(base_model_of(model), suffix or "", job_id, step)


# -- storage keys ----------------------------------------------------------------------------

JOBS_PREFIX = "jobs/"
JOB_RECORD = "job.json"
ADAPTER_MANIFEST = "manifest.json"
"""Written last in an adapter folder: a folder with a manifest is complete."""
REF_LOGPS_PREFIX = "cache/ref-logps/"


def file_content_key(file_id: str) -> str:
    """``files/<file_id>/content``: the uploaded bytes."""
    return join_key("files", file_id, "content")


def file_record_key(file_id: str) -> str:
    """``files/<file_id>/object.json``: the file's record."""
    return join_key("files", file_id, "object.json")


def file_prefix(file_id: str) -> str:
    """``files/<file_id>/``: everything of one file."""
    return join_key("files", file_id) + "/"


def file_index_prefix(tenant: str) -> str:
    """``file-index/<tenant>/``: one tenant's files, in upload order."""
    return join_key("file-index", tenant) + "/"


def file_index_key(tenant: str, created_ns: int, file_id: str) -> str:
    """``file-index/<tenant>/<created_ns:020d>-<file_id>``, an empty marker."""
    return join_key("file-index", tenant, f"{created_ns:020d}-{file_id}")


def file_id_from_index_key(key: str) -> str:
    """The file id ``file_index_key`` put in ``key``."""
    return key.rsplit("/", 1)[-1].split("-", 1)[1]


def job_key(job_id: str) -> str:
    """``jobs/<job_id>/job.json``: the job record."""
    return join_key("jobs", job_id, JOB_RECORD)


def is_job_key(key: str) -> bool:
    """Whether ``key`` (from a listing of ``jobs/``) is a job record."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "jobs" and parts[2] == JOB_RECORD


def events_prefix(job_id: str) -> str:
    """``jobs/<job_id>/events/``, listed in time order."""
    return join_key("jobs", job_id, "events") + "/"


def event_key(job_id: str, created_ns: int, seq: int) -> str:
    """``jobs/<job_id>/events/<created_ns:020d>-<seq:06d>.json``."""
    return f"{events_prefix(job_id)}{created_ns:020d}-{seq:06d}.json"


def event_id_from_key(key: str) -> str:
    """``ftevent-<created_ns>-<seq>``: the key's stem, so a cursor ``after=<id>`` is a key prefix."""
    return "ftevent-" + key.rsplit("/", 1)[-1].removesuffix(".json")


def event_created_ns(key: str) -> int:
    """The creation time ``event_key`` put in ``key`` (ns)."""
    return int(key.rsplit("/", 1)[-1].split("-", 1)[0])


def run_key(job_id: str) -> str:
    """``jobs/<job_id>/run``: Ray Train's ``storage_path`` for the job's run."""
    return join_key("jobs", job_id, "run")


def split_prefix(job_id: str, split: str) -> str:
    """``jobs/<job_id>/data/<split>``: a tokenised split (a ``datasets`` folder)."""
    return join_key("jobs", job_id, "data", split)


def job_adapters_prefix(job_id: str) -> str:
    """``adapters/<job_id>/``: the job's final adapter and its checkpoints."""
    return join_key("adapters", job_id) + "/"


def adapter_prefix(job_id: str, step: int | None = None) -> str:
    """``adapters/<job_id>/final`` or ``adapters/<job_id>/ckpt-step-<step>``."""
    return join_key("adapters", job_id, adapter_folder(step))


def adapter_key(adapter: str, *rest: str) -> str:
    """``adapters/<adapter id>[/<rest>]``, e.g. ``adapter_key(id, ADAPTER_MANIFEST)``."""
    return join_key("adapters", adapter, *rest)


def ref_logps_key(digest: str) -> str:
    """``cache/ref-logps/<digest>.safetensors``: a split's DPO reference log-probs."""
    return join_key(REF_LOGPS_PREFIX + f"{digest}.safetensors")


def model_prefix(slug: str) -> str:
    """``models/<slug>/``: a converted base model."""
    return join_key("models", slug) + "/"


def file_expiry_prefix() -> str:
    """``file-expiry/``: one marker per expiring file, in expiry order."""
    return "file-expiry/"


def file_expiry_key(expires_at: int, file_id: str) -> str:
    """``file-expiry/<expires_at:012d>-<file_id>``, an empty marker (Unix seconds)."""
    return join_key("file-expiry", f"{expires_at:012d}-{file_id}")


def parse_file_expiry_key(key: str) -> tuple[int, str]:
    """``(expires_at, file_id)`` of a ``file_expiry_key``."""
    at, _, file_id = key.rsplit("/", 1)[-1].partition("-")
    return int(at), file_id


WEBHOOK_EVENT_ID = re.compile(r"^evt_[0-9a-f]{32}$")


def webhook_delivery_key(event_id: str, endpoint: str) -> str:
    """``webhooks/deliveries/<event_id>/<endpoint>.json``: one event's delivery to one endpoint
    (``endpoint``: a digest of its URL), written before it is first sent."""
    return join_key("webhooks", "deliveries", event_id, f"{endpoint}.json")


def webhook_pending_prefix() -> str:
    """``webhooks/pending/``: a marker per delivery not yet delivered or given up."""
    return "webhooks/pending/"


def webhook_pending_key(event_id: str, endpoint: str) -> str:
    """``webhooks/pending/<event_id>.<endpoint>``, an empty marker."""
    return join_key("webhooks", "pending", f"{event_id}.{endpoint}")


def parse_webhook_pending_key(key: str) -> tuple[str, str]:
    """``(event_id, endpoint)`` of a ``webhook_pending_key``."""
    event_id, _, endpoint = key.rsplit("/", 1)[-1].partition(".")
    return event_id, endpoint


# -- evals (issue 37) ------------------------------------------------------------------------

EVAL_ID = re.compile(r"^eval_[0-9a-f]{24}$")
EVAL_RUN_ID = re.compile(r"^evalrun_[0-9a-f]{24}$")
OUTPUT_ITEM_ID = re.compile(r"^outputitem_([0-9a-f]{24})_(\d{8})$")
EVAL_RECORD = "eval.json"
EVAL_RUN_RECORD = "run.json"


def new_eval_id() -> str:
    return f"eval_{secrets.token_hex(12)}"


def new_eval_run_id() -> str:
    return f"evalrun_{secrets.token_hex(12)}"


def output_item_id(run_id: str, index: int) -> str:
    """``outputitem_<the run id's hex>_<index:08d>``: the run's item ``index`` (from 0)."""
    return f"outputitem_{run_id.removeprefix('evalrun_')}_{index:08d}"


def eval_key(eval_id: str) -> str:
    """``evals/<eval_id>/eval.json``: the eval's record."""
    return join_key("evals", eval_id, EVAL_RECORD)


def eval_index_key(tenant: str, created_ns: int, eval_id: str) -> str:
    """``eval-index/<tenant>/<created_ns:020d>-<eval_id>``, an empty marker."""
    return join_key("eval-index", tenant, f"{created_ns:020d}-{eval_id}")


def eval_index_prefix(tenant: str) -> str:
    return join_key("eval-index", tenant) + "/"


def evals_prefix() -> str:
    """``evals/``: every eval, its runs and their items."""
    return join_key("evals") + "/"


def eval_runs_prefix(eval_id: str) -> str:
    """``evals/<eval_id>/runs/``: every run of an eval."""
    return join_key("evals", eval_id, "runs") + "/"


def eval_run_key(eval_id: str, run_id: str) -> str:
    """``evals/<eval_id>/runs/<run_id>/run.json``: the run's record."""
    return join_key("evals", eval_id, "runs", run_id, EVAL_RUN_RECORD)


def eval_items_prefix(eval_id: str, run_id: str) -> str:
    """``evals/<eval_id>/runs/<run_id>/items/``: the graded items, in chunks."""
    return join_key("evals", eval_id, "runs", run_id, "items") + "/"


def eval_items_key(eval_id: str, run_id: str, first: int) -> str:
    """``…/items/<first index:08d>.jsonl``: a chunk of output items starting at ``first``."""
    return f"{eval_items_prefix(eval_id, run_id)}{first:08d}.jsonl"


def eval_baseline_key(eval_id: str, digest: str) -> str:
    """``cache/eval-before/<eval_id>/<digest>.json``: the "before" run of a job's eval on a
    model, reused by later jobs; ``digest``: a hex sha256 of the model and data source."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return join_key("cache", "eval-before", eval_id, f"{digest}.json")


# -- data generation (Self-Instruct, issue 39) --------------------------------------------------

DATAGEN_JOB_ID = re.compile(r"^dgjob-[0-9a-f]{24}$")


def new_datagen_job_id() -> str:
    return f"dgjob-{secrets.token_hex(12)}"


def datagen_job_key(job_id: str) -> str:
    """``datagen/<job_id>/job.json``: a data-generation job's record."""
    return join_key("datagen", job_id, "job.json")


def datagen_events_prefix(job_id: str) -> str:
    """``datagen/<job_id>/events/``: its events, in key (= time) order."""
    return join_key("datagen", job_id, "events") + "/"


def datagen_event_key(job_id: str, created_ns: int, seq: int) -> str:
    """``…/events/<created_ns:020d>-<seq:06d>.json``."""
    return f"{datagen_events_prefix(job_id)}{created_ns:020d}-{seq:06d}.json"


def datagen_index_key(tenant: str, created_ns: int, job_id: str) -> str:
    """``datagen-index/<tenant>/<created_ns:020d>-<job_id>``, an empty marker."""
    return join_key("datagen-index", tenant, f"{created_ns:020d}-{job_id}")


def datagen_index_prefix(tenant: str) -> str:
    return join_key("datagen-index", tenant) + "/"
