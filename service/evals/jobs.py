"""A job's eval (the ``eval`` extension): the same eval run before training on the model the job
starts from, and after it on the tuned model; both in the job's events and result files.

``{"eval": {"id": "eval_…", "data_source": {…}}}``: ``data_source`` is a ``completions``
source without ``model`` (the job supplies it); left out, the eval's newest run's source is
reused. The "before" run is cached per eval, model and data source
(``names.eval_baseline_key``): a second job from the same model reuses it instead of sampling
again.

Runs inside the job's driver (off the API replica), on the chat deployment of the Serve
application the job was created in. A failing eval never fails the job: it is a warning event.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from service.core.errors import InvalidRequest, NotFound
from service.evals.store import EvalStore


class JobEval(BaseModel):
    """The extension as a job request gives it."""

    model_config = ConfigDict(extra="forbid")
    id: str
    data_source: dict[str, Any] | None = None


def check(storage, tenant: str, spec: JobEval) -> dict[str, Any]:
    """What the job record keeps: the eval and a full data source (400/404 naming the field)."""
    store = EvalStore(storage)
    try:
        store.get(spec.id, tenant)
    except NotFound as exc:
        raise NotFound(exc.message, param="eval.id") from None
    source = spec.data_source
    if source is None:
        runs = store.list_runs(spec.id)
        if not runs:
            raise InvalidRequest(f"Eval {spec.id} has no run to take a data source from; give "
                                 "eval.data_source (a completions source without model).",
                                 param="eval.data_source", code="missing_data_source")
        source = runs[-1].data_source
    source = {**source, "type": "completions", "model": "-"}
    from pydantic import ValidationError

    from service.evals.datasource import CompletionsSource

    try:
        CompletionsSource.model_validate(source)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"Invalid eval.data_source: {first['msg']} at {loc}.",
                             param=f"eval.data_source.{loc}", code="invalid_data_source") \
            from None
    source.pop("model")
    return {"id": spec.id, "data_source": source, "app": serve_app_name()}


def serve_app_name() -> str | None:
    """The Serve application this API replica belongs to; None outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - not in a Serve replica (or no Ray at all)
        return None
