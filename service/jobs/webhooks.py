"""Signed webhooks for finished jobs, sent the way OpenAI sends them.

A job that ends (``succeeded``, ``failed``, ``cancelled``) is announced as the event
``fine_tuning.job.<status>`` (``{"id": "evt_…", "object": "event", "type": …, "created_at": …,
"data": {"id": <job id>}}``) to its tenant's endpoint (``TUNESERVE_WEBHOOK_URLS``) and to the
job's own ``webhook_url``, signed the Standard Webhooks way (``webhook-id``: the event id,
``webhook-timestamp``, ``webhook-signature``) with the tenant's secret, so that the ``openai``
SDK's ``client.webhooks.unwrap(body, headers, secret=…)`` verifies it.

Durable, in storage, before anything is sent:

    webhooks/deliveries/<event_id>/<endpoint>.json  the delivery: body, attempts, state
    webhooks/pending/<event_id>.<endpoint>           a marker while it is neither delivered
                                                     nor given up

Where it runs: a ``Dispatcher`` thread in every API replica (beside the job scheduler), not a
Ray actor. Everything it knows is in storage, so a replica that restarts, or another replica,
carries on where it stopped, and nothing new has to be kept alive on the cluster. The event id
is derived from the job and its final status, so finding a finished job again (after a restart,
or on two replicas) finds the same delivery (``Storage.create`` writes it once). Each attempt is
claimed with a compare-and-swap lease first, so one replica sends it; the record says
``delivered`` once the receiver answered 2xx, and nothing is sent after that. (A replica killed
after the receiver answered but before the record says so sends it once more, with the same
``webhook-id``: the Standard Webhooks way for a receiver to drop it.) Attempts run on a small
thread pool with a timeout, off the request path and off the job: a receiver that is down, slow
or failing delays only its own deliveries. Retries back off from ``webhook_retry_s`` doubling up
to an hour, for a day after the event; then the delivery is given up (``failed``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook

from service.core import names
from service.core.errors import AlreadyExists, InvalidRequest, NotFound, PreconditionFailed
from service.core.settings import Settings
from service.core.storage import Storage, open_storage
from service.jobs.store import TERMINAL, JobRecord

log = logging.getLogger(__name__)

RETRY_WINDOW_S = 24 * 3600
"""How long after the event a delivery is still tried."""
MAX_BACKOFF_S = 3600.0
POLL_S = 1.0
"""Between looks for deliveries that are due."""
JOB_SCAN_S = 5.0
"""Between looks for jobs that ended: listing ``jobs/`` lists every run's files too."""
SENDERS = 8
"""Deliveries in flight at once per replica (each waits at most ``webhook_timeout_s``)."""
USER_AGENT = "tuneserve-webhooks/1"


class Delivery(BaseModel):
    event_id: str
    endpoint: str
    url: str
    tenant: str
    body: str
    """The event's JSON, exactly the bytes every attempt sends and signs."""
    created_at: float
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    lease_until: float = 0.0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None


# --- what is sent ----------------------------------------------------------------------------


def event_id(job_id: str, status: str) -> str:
    """The same id every time the job's end is found: ``evt_`` + 32 hex."""
    return "evt_" + hashlib.sha256(f"{job_id}:{status}".encode()).hexdigest()[:32]


def event_body(job: JobRecord) -> str:
    event = {"id": event_id(job.id, job.status), "object": "event",
             "type": f"fine_tuning.job.{job.status}",
             "created_at": job.finished_at or int(time.time()), "data": {"id": job.id}}
    return json.dumps(event, separators=(",", ":"))


def endpoints(job: JobRecord, settings: Settings) -> list[str]:
    """Where the job's end is announced: the tenant's endpoint, then the job's own."""
    urls = [settings.webhook_urls.get(job.organization_id), job.webhook_url]
    return list(dict.fromkeys(url for url in urls if url))


def sign(secret: str, event_id_: str, body: str, now: float) -> dict[str, str]:
    """Standard Webhooks headers for one attempt (the timestamp is the attempt's)."""
    moment = datetime.fromtimestamp(int(now), tz=UTC)
    return {"webhook-id": event_id_, "webhook-timestamp": str(int(now)),
            "webhook-signature": Webhook(secret).sign(event_id_, moment, body),
            "content-type": "application/json", "user-agent": USER_AGENT}


def check_url(url: str, allow_private: bool) -> None:
    """Refuse (400 naming ``webhook_url``) a URL that is not http(s), or whose host resolves to
    a loopback, private, link-local or otherwise non-public address, unless allowed: a caller
    must not make the service call into the network it runs in."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("Invalid webhook_url: give an http:// or https:// URL with a host.",
                             param="webhook_url", code="invalid_url")
    if allow_private:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError, UnicodeError):
        raise InvalidRequest(f"Invalid webhook_url: the host {parts.hostname!r} does not "
                             "resolve.", param="webhook_url", code="invalid_url") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise InvalidRequest(
                f"Invalid webhook_url: {parts.hostname!r} resolves to {address}, a loopback, "
                "private or link-local address, which this service does not call.",
                param="webhook_url", code="webhook_url_not_allowed")


# --- recording ------------------------------------------------------------------------------


def record_deliveries(storage: Storage, settings: Settings, job: JobRecord) -> list[str]:
    """Record (once) a delivery of the finished job's event to each endpoint, and mark it
    pending; returns the new ones' keys. Safe to call again and from several replicas."""
    if job.status not in TERMINAL:
        return []
    body = event_body(job)
    created = []
    for url in endpoints(job, settings):
        delivery = Delivery(event_id=event_id(job.id, job.status), endpoint=_digest(url), url=url,
                            tenant=job.organization_id, body=body, created_at=time.time())
        key = names.webhook_delivery_key(delivery.event_id, delivery.endpoint)
        try:
            storage.create(key, delivery.model_dump_json().encode())
            created.append(key)
        except AlreadyExists:  # recorded before; it may have lost its marker to a crash
            delivery = Delivery.model_validate_json(storage.get(key))
            if delivery.state != "pending":
                continue
        storage.put(names.webhook_pending_key(delivery.event_id, delivery.endpoint), b"")
    return created


def read_delivery(storage: Storage, event: str, endpoint: str) -> tuple[Delivery, str] | None:
    key = names.webhook_delivery_key(event, endpoint)
    info = storage.head(key)
    if info is None:
        return None
    data = storage.get(key)
    after = storage.head(key)
    if after is None or after.etag != info.etag:
        return None  # changing right now: the next pass reads it
    return Delivery.model_validate_json(data), info.etag


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def backoff(attempts: int, first: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    return min(first * 2 ** (attempts - 1), MAX_BACKOFF_S)


# --- sending --------------------------------------------------------------------------------


class Dispatcher:
    """Finds finished jobs, records their deliveries and sends what is due; one per replica."""

    def __init__(self, settings: Settings, storage: Storage | None = None):
        self.settings = settings
        self.storage = storage or open_storage(settings.storage_config())
        self._seen: dict[str, str] = {}
        """Job record key → the etag whose end (or not) was already handled."""
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        scanned = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - scanned >= JOB_SCAN_S:
                    scanned = time.monotonic()
                    self.find_finished_jobs()
                self.send_due()
            except Exception:  # the loop must outlive a storage hiccup
                log.exception("webhook pass failed")
            self._stop.wait(POLL_S)

    def find_finished_jobs(self) -> None:
        """Record the deliveries of every job that ended within the retry window. Only records
        that changed since the last pass are read."""
        horizon = time.time() - RETRY_WINDOW_S
        for info in self.storage.iter(names.JOBS_PREFIX):
            if not names.is_job_key(info.key) or self._seen.get(info.key) == info.etag:
                continue
            try:
                job = JobRecord.model_validate_json(self.storage.get(info.key))
            except NotFound:
                continue
            if job.status in TERMINAL and (job.finished_at or time.time()) >= horizon:
                record_deliveries(self.storage, self.settings, job)
            self._seen[info.key] = info.etag

    def send_due(self) -> None:
        now = time.time()
        for info in self.storage.iter(names.webhook_pending_prefix()):
            event, endpoint = names.parse_webhook_pending_key(info.key)
            with self._lock:
                if info.key in self._in_flight:
                    continue
            found = read_delivery(self.storage, event, endpoint)
            if found is None:
                continue
            delivery, etag = found
            if delivery.state != "pending":
                self.storage.delete(info.key)
                continue
            if delivery.next_attempt_at > now or delivery.lease_until > now:
                continue
            claimed = delivery.model_copy(update={
                "attempts": delivery.attempts + 1,
                # Past any attempt's end (httpx's timeout is per phase: connect, write, read).
                "lease_until": now + 3 * self.settings.webhook_timeout_s + 5})
            try:
                self.storage.replace(names.webhook_delivery_key(event, endpoint),
                                     claimed.model_dump_json().encode(), etag)
            except (PreconditionFailed, NotFound):
                continue  # another replica claimed it
            with self._lock:
                self._in_flight.add(info.key)
            self._pool.submit(self._attempt, claimed, info.key)

    def _attempt(self, delivery: Delivery, marker: str) -> None:
        try:
            status, error = self._send(delivery)
            self._settle(delivery, marker, status, error)
        except Exception:
            log.exception("webhook %s: attempt failed", delivery.event_id)
        finally:
            with self._lock:
                self._in_flight.discard(marker)

    def _send(self, delivery: Delivery) -> tuple[int | None, str | None]:
        secret = self.settings.webhook_secrets.get(delivery.tenant)
        if secret is None:
            return None, "no webhook secret is configured for the tenant"
        try:
            # A job's URL is checked again at each attempt (the name may resolve elsewhere now);
            # the tenant's own endpoint is the operator's setting, trusted as given.
            if delivery.url != self.settings.webhook_urls.get(delivery.tenant):
                check_url(delivery.url, self.settings.webhook_allow_private)
            headers = sign(secret, delivery.event_id, delivery.body, time.time())
            response = self._http.post(delivery.url, content=delivery.body.encode(),
                                       headers=headers)
        except InvalidRequest as exc:
            return None, exc.message
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]
        return response.status_code, None

    def _settle(self, delivery: Delivery, marker: str, status: int | None,
                error: str | None) -> None:
        now = time.time()
        ok = status is not None and 200 <= status < 300
        if ok:
            update: dict[str, Any] = {"state": "delivered", "delivered_at": now}
            outcome = "delivered"
        else:
            wait = backoff(delivery.attempts, self.settings.webhook_retry_s)
            expired = now + wait > delivery.created_at + RETRY_WINDOW_S
            update = {"state": "failed" if expired else "pending", "next_attempt_at": now + wait}
            outcome = (f"given up ({status or error})" if expired
                       else f"retry in {wait:.0f} s ({status or error})")
        update.update(last_status=status, last_error=error if not ok else None, lease_until=0.0)
        key = names.webhook_delivery_key(delivery.event_id, delivery.endpoint)
        for _ in range(20):
            found = read_delivery(self.storage, delivery.event_id, delivery.endpoint)
            if found is None:
                time.sleep(0.05)
                continue
            current, etag = found
            try:
                self.storage.replace(key, current.model_copy(update=update)
                                     .model_dump_json().encode(), etag)
                break
            except PreconditionFailed:
                time.sleep(0.05)
        if update["state"] != "pending":
            self.storage.delete(marker)
        log.info("webhook %s to endpoint %s: attempt %d %s", delivery.event_id,
                 delivery.endpoint, delivery.attempts, outcome)
