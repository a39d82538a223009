"""Checks a response body against the schema OpenAI's published spec gives for it.

The spec (``../shared/specs/openai-openapi.yaml``, OpenAPI 3.1) is loaded once per session and
every ``$ref`` resolves inside it (``referencing``); bodies are checked with ``jsonschema``'s
Draft 2020-12 validator, the dialect of OpenAPI 3.1. Two things of the spec's own making are
read the way OpenAI means them:

- ``nullable: true`` (OpenAPI 3.0 left in a 3.1 document, e.g. a stream chunk's ``usage``)
  allows null, as OpenAI's SDKs read it; Draft 2020-12 alone would ignore it.
- ``exclusiveMinimum: true`` beside ``minimum: 0`` (3.0 again, e.g. a job's
  ``learning_rate_multiplier``) means "greater than 0"; Draft 2020-12 would read ``true`` as
  the number 1.

One correction of the spec by itself: ``FineTuningJob.status`` gains ``paused``, which its
enum lacks though the spec's own ``POST /fine_tuning/jobs/{id}/pause`` example returns it.
- an error status the operation does not list is checked against ``ErrorResponse``, the body
  OpenAI documents for every error.

Use::

    from tests.openapi_contract import assert_response, assert_schema

    response = httpx.get(f"{url}/v1/files/{file_id}")
    assert_response("get", "/files/{file_id}", response)          # status and body
    assert_schema(chunk, "CreateChatCompletionStreamResponse")      # one streamed chunk
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import httpx
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.yaml"
"""``/work/shared/specs/…`` for the checkout at ``/work/main``."""
SPEC_URI = "urn:openai-openapi"
ERROR_SCHEMA = "ErrorResponse"


@functools.cache
def spec() -> dict[str, Any]:
    """The spec, parsed, with its OpenAPI 3.0 keywords in their 3.1 form (see above)."""
    with SPEC_PATH.open() as stream:
        document = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    status = document["components"]["schemas"]["FineTuningJob"]["properties"]["status"]
    status["enum"] = [*status["enum"], "paused"]
    return _as_31(document)


def _as_31(node: Any) -> Any:
    if isinstance(node, list):
        return [_as_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _as_31(value) for key, value in node.items()}
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), bool) and node.pop(exclusive) and bound in node:
            node[exclusive] = node.pop(bound)
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource(contents=spec(), specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@functools.cache
def _validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": SPEC_URI + pointer}, registry=_registry())


def response_pointer(method: str, path: str, status: int,
                     content_type: str = "application/json") -> str:
    """The JSON pointer of the spec's schema for this response; an unlisted error status gets
    ``ErrorResponse``. ``path`` is the spec's template without ``/v1`` (``/files/{file_id}``)."""
    paths = spec()["paths"]
    assert path in paths, f"the spec has no path {path!r}"
    operation = paths[path].get(method.lower())
    assert operation is not None, f"the spec has no {method.upper()} {path}"
    responses = operation.get("responses", {})
    entry = responses.get(str(status))
    if entry is None:
        assert status >= 400, (f"the spec lists no {status} for {method.upper()} {path} "
                               f"(it lists {sorted(responses)})")
        return _pointer("components", "schemas", ERROR_SCHEMA)
    ref = entry.get("$ref")
    base = ("components", "responses", ref.rsplit("/", 1)[-1]) if ref else (
        "paths", path, method.lower(), "responses", str(status))
    content = (entry if not ref else spec()["components"]["responses"][ref.rsplit("/", 1)[-1]]
               ).get("content", {})
    assert content_type in content, (f"the spec gives no {content_type} body for {status} of "
                                     f"{method.upper()} {path} (it gives {sorted(content)})")
    return _pointer(*base, "content", content_type, "schema")


def schema_errors(body: Any, pointer: str) -> list[str]:
    """Every way ``body`` breaks the schema at ``pointer``: ``"<where>: <why>"`` lines."""
    errors = sorted(_validator(pointer).iter_errors(body), key=lambda e: list(e.absolute_path))
    lines = []
    for error in errors:
        where = "/".join(str(p) for p in error.absolute_path) or "(the body)"
        why = error.message if len(error.message) < 300 else error.message[:300] + "…"
        # anyOf/oneOf failures say little by themselves: add the branch that came closest.
        if error.context:
            best = best_match(error.context)
            why += f" [closest: {'/'.join(str(p) for p in best.absolute_path)}: " \
                   f"{best.message[:200]}]"
        lines.append(f"{where}: {why}")
    return lines


def assert_schema(body: Any, schema: str) -> None:
    """``body`` validates against ``components/schemas/<schema>`` of the spec."""
    errors = schema_errors(body, _pointer("components", "schemas", schema))
    assert not errors, _message(f"not a valid {schema}", errors, body)


def assert_body(method: str, path: str, status: int, body: Any,
                content_type: str = "application/json") -> None:
    """``body`` is what the spec documents for ``status`` of ``method path``."""
    pointer = response_pointer(method, path, status, content_type)
    errors = schema_errors(body, pointer)
    what = f"{method.upper()} {path} → {status}: body does not match the spec ({pointer})"
    assert not errors, _message(what, errors, body)


def assert_response(method: str, path: str, response: httpx.Response, *,
                    status: int | None = None) -> Any:
    """The response has ``status`` (if given) and a JSON body the spec documents for its
    status; returns the parsed body."""
    if status is not None:
        assert response.status_code == status, (
            f"{method.upper()} {path}: expected {status}, got {response.status_code}: "
            f"{response.text[:1000]}")
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{method.upper()} {path} → {response.status_code}: the body is not "
                             f"JSON: {response.text[:500]!r}") from None
    assert_body(method, path, response.status_code, body)
    return body


def _message(what: str, errors: list[str], body: Any) -> str:
    shown = json.dumps(body, default=str)
    if len(shown) > 2000:
        shown = shown[:2000] + "…"
    return f"{what}:\n  " + "\n  ".join(errors[:20]) + f"\nbody: {shown}"
