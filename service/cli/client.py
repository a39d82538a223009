"""The ``tuneserve`` client commands: files, jobs and models, over the public API with httpx.

Every command talks to one tuneserve URL (``--base-url``, else ``TUNESERVE_BASE_URL`` /
``OPENAI_BASE_URL``, else the local default) with one key (``--api-key``, else
``TUNESERVE_API_KEY`` / ``OPENAI_API_KEY``). Output is for people unless ``--json`` is given;
a failure is one line on stderr and a non-zero exit (``CliError``, raised here, printed by
``service.cli.main.main``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class CliError(Exception):
    """A failure told to the user in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def timeouts(seconds: float | None) -> tuple[float, float | None, float | None, float | None]:
    """(connect, read, write, pool): 10 s to connect, ``seconds`` for the rest (None: no limit).

    A plain tuple, not an ``httpx.Timeout``: only httpx's own clients understand that object, and
    the tests swap in Starlette's TestClient (built on httpx2 since Starlette 1.10)."""
    return (10.0, seconds, seconds, seconds)


class Client:
    """A thin httpx client of the tuneserve API that turns error bodies into ``CliError``."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=timeouts(timeout))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        check(response)
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None) -> Any:
        return self.request("POST", path, json=body)

    def sse(self, method: str, path: str, *, timeout: float | None = None,
            **kwargs: Any) -> Iterator[Any]:
        """The ``data:`` payloads of a server-sent event stream, JSON-decoded, until ``[DONE]``."""
        with self.http.stream(method, path, timeout=timeouts(timeout), **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                check(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                payload = json.loads(data)
                if isinstance(payload, dict) and "error" in payload and len(payload) == 1:
                    raise CliError(_error_message(payload["error"]))
                yield payload


def check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {"message": response.text.strip()[:200] or response.reason_phrase}
    raise CliError(f"{_error_message(error)} (HTTP {response.status_code})")


def _error_message(error: dict) -> str:
    message = str(error.get("message") or "request failed")
    if error.get("param"):
        message += f" [param: {error['param']}]"
    return message


# --- options every client command takes -----------------------------------------------------


def client_options() -> argparse.ArgumentParser:
    """A parent parser: ``--base-url``, ``--api-key``, ``--json``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--base-url", help="the API, e.g. http://127.0.0.1:8000/v1 (env "
                        "TUNESERVE_BASE_URL or OPENAI_BASE_URL)")
    parent.add_argument("--api-key", help="env TUNESERVE_API_KEY or OPENAI_API_KEY")
    parent.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parent


def make_client(args: argparse.Namespace, timeout: float = 60.0) -> Client:
    base_url = (args.base_url or os.environ.get("TUNESERVE_BASE_URL")
                or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
    if not base_url.startswith(("http://", "https://")):
        raise CliError(f"--base-url must start with http:// or https://, got {base_url!r}")
    api_key = (args.api_key or os.environ.get("TUNESERVE_API_KEY")
               or os.environ.get("OPENAI_API_KEY"))
    return Client(base_url, api_key, timeout)


# --- output ---------------------------------------------------------------------------------


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def table(rows: list[list[Any]], headers: list[str]) -> None:
    cells = [headers] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def show_list(args: argparse.Namespace, page: dict, headers: list[str],
              row: Callable[[dict], list[Any]]) -> int:
    """A list response as JSON (``--json``), or as a table for people."""
    if args.json:
        emit_json(page)
    else:
        table([row(item) for item in page["data"]], headers)
    return 0


def when(unix: int | None) -> str:
    if not unix:
        return ""
    return dt.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# --- files ----------------------------------------------------------------------------------


def cmd_files_validate(args: argparse.Namespace) -> int:
    """The server's check of an upload on a local file: the same limits (from the
    ``TUNESERVE_*`` settings), the same tokenizer (the first base model's, the built-in one unless
    ``--model``), the same verdict and message (``service.files.validation``)."""
    from service.core.settings import Settings
    from service.files import validation

    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    try:
        settings = Settings()
    except ValueError as exc:
        raise CliError(f"invalid TUNESERVE_* settings: {exc}") from None
    try:
        tokens = validation.load_file_tokenizer(settings, args.model)
    except Exception as exc:  # noqa: BLE001 - told to the user in one line
        raise CliError(f"cannot load the tokenizer of {args.model or 'the built-in model'} "
                       f"(needed to check files as the server does): {exc}") from None
    checks = validation.FileChecks.from_settings(settings, tokens)
    try:
        with path.open("rb") as stream:
            report = validation.check_file(stream, checks, declared_format=args.format,
                                           invalid_records=args.invalid_records)
    except ValueError as exc:  # an unknown --format
        raise CliError(str(exc)) from None
    described = validation.description(report, checks) if report.ok else None
    if args.json:
        emit_json({"file": str(path), "ok": report.ok, "problem_count": report.problem_count,
                   "message": None if report.ok else validation.refusal_message(report),
                   "problems": [{report.unit: p.line, "code": p.code, "message": p.message}
                                for p in report.problems],
                   "description": described})
        return 0 if report.ok else 1
    if not report.ok:
        sys.stdout.write(f"{path}: refused: {validation.refusal_message(report)}\n")
        for problem in report.problems:
            sys.stdout.write(f"{path}:{problem.line or 0}: {problem.code}: {problem.message}\n")
        shown = len(report.problems)
        if report.problem_count > shown:
            sys.stdout.write(f"… and {report.problem_count - shown} more problems\n")
        sys.stdout.write(f"{path}: {report.problem_count} problem"
                         f"{'s' * (report.problem_count != 1)} in {report.lines} "
                         f"{report.unit}s\n")
        return 1
    assert described is not None
    sys.stdout.write(f"{path}: OK, {described['examples']} examples in format "
                     f"{described['format']} ({described['kind']}), {described['duplicates']} "
                     f"duplicates; read as {report.read_as()}\n")
    if described["skipped"]:
        skipped = described["skipped"]
        sys.stdout.write(f"  skipped {skipped['records']} invalid {report.unit}s: "
                         + ", ".join(f"{k} {v}" for k, v in skipped["reasons"].items()) + "\n")
        for problem in skipped["first"]:
            sys.stdout.write(f"    {problem}\n")
    if described["tokens"]:
        t, s = described["tokens"], described["supervised_tokens"]
        sys.stdout.write(f"  tokens per example under {described['model']}: min {t['min']}, "
                         f"mean {t['mean']}, max {t['max']}; trained-on tokens: {s['total']} "
                         f"in total (first {described['tokenized_examples']} examples)\n")
    for note in described["notes"]:
        sys.stdout.write(f"  note: {note}\n")
    for key, n in described["ignored_keys"].items():
        sys.stdout.write(f"  warning: key {key!r} is not read by the {described['format']} "
                         f"layout ({n} {report.unit}s)\n")
    for warning in described["warnings"]:
        sys.stdout.write(f"  warning: {warning}\n")
    return 0


class _ProgressReader:
    """A file whose reads advance a progress callback (httpx reads the multipart part by chunks)."""

    def __init__(self, file: BinaryIO, advance):
        self._file, self._advance = file, advance

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._advance(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:  # lets httpx send a Content-Length instead of chunks
        return self._file.fileno()


def upload_file(client: Client, path: Path, *, quiet: bool = False,
                invalid_records: str = "refuse") -> dict:
    """Upload with a progress bar on a terminal; returns the FileObject."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if not path.is_file():
        raise CliError(f"no such file: {path}")
    size = path.stat().st_size
    interactive = sys.stderr.isatty() and not quiet
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), disable=not interactive,
                  transient=True) as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)
        with path.open("rb") as raw:
            reader = _ProgressReader(raw, lambda n: progress.advance(task, n))
            files = {"file": (path.name, reader, "application/jsonl")}
            try:
                uploaded = client.request("POST", "/files", files=files,
                                          data={"purpose": "fine-tune",
                                                "invalid_records": invalid_records})
            finally:
                progress.update(task, completed=size)
    return uploaded


def cmd_files_upload(args: argparse.Namespace) -> int:
    client = make_client(args, timeout=600)
    uploaded = upload_file(client, Path(args.file), quiet=args.json,
                           invalid_records=args.invalid_records)
    if args.json:
        emit_json(uploaded)
        return 0
    desc = uploaded.get("description") or {}
    sys.stdout.write(f"{uploaded['id']}  {uploaded['filename']}  {uploaded['bytes']} bytes, "
                     f"{desc.get('examples', '?')} examples ({desc.get('format', '?')})\n")
    return 0


def cmd_files_list(args: argparse.Namespace) -> int:
    return show_list(args, make_client(args).get("/files"),
                     ["ID", "BYTES", "CREATED", "PURPOSE", "FILENAME", "EXAMPLES"],
                     lambda f: [f["id"], f["bytes"], when(f["created_at"]), f["purpose"],
                                f["filename"], (f.get("description") or {}).get("examples", "")])


# --- models ---------------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    return show_list(args, make_client(args).get("/models"), ["ID", "OWNED BY", "CREATED"],
                     lambda m: [m["id"], m["owned_by"], when(m.get("created"))])


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``files``, ``models``, ``jobs`` and ``chat`` under the ``tuneserve`` command."""
    from service.cli import chat as cli_chat
    from service.cli import datagen as cli_datagen
    from service.cli import jobs as cli_jobs

    common = client_options()
    files = sub.add_parser("files", help="validate, upload and list training files")
    fsub = files.add_subparsers(dest="files_command", required=True)
    validate = fsub.add_parser("validate", parents=[common], help="check a training file "
                               "locally, exactly as the server checks an upload")
    validate.add_argument("file")
    validate.add_argument("--model", help="count tokens and check the chat template under this "
                          "base model (default: the server's first base model, the built-in "
                          "one unless TUNESERVE_* settings say otherwise)")
    validate.add_argument("--format", help="declare the layout instead of detecting it")
    validate.add_argument("--invalid-records", choices=["refuse", "skip"], default="refuse",
                          help="skip: accept the file and count its invalid records, as an "
                          "upload with invalid_records=skip does")
    validate.set_defaults(func=cmd_files_validate)
    upload = fsub.add_parser("upload", parents=[common], help="upload a training file")
    upload.add_argument("file")
    upload.add_argument("--invalid-records", choices=["refuse", "skip"], default="refuse",
                        help="skip: train on the valid records, counting the others")
    upload.set_defaults(func=cmd_files_upload)
    fsub.add_parser("list", parents=[common], help="list your files").set_defaults(
        func=cmd_files_list)

    models = sub.add_parser("models", help="list base and tuned models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", parents=[common], help="list models").set_defaults(
        func=cmd_models_list)

    cli_jobs.add_commands(sub, common)
    cli_chat.add_command(sub, common)
    cli_datagen.add_command(sub, common)
