"""Service settings from ``TUNESERVE_*`` environment variables (pydantic-settings).

Built once at the edge (``create_app``, the CLI), never at import, so tests pass their own.
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core import limits
from service.core.storage.config import StorageConfig


def default_storage_uri() -> str:
    return str(Path(platformdirs.user_data_dir("tuneserve")) / "storage")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", extra="ignore", frozen=True)

    storage: str = Field(default_factory=default_storage_uri)
    """Where everything durable lives: a local directory (path or ``file://``) or ``s3://bucket/prefix``."""
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible server (SeaweedFS, MinIO); None means AWS."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """``key:tenant`` pairs, comma-separated. Empty: one local tenant, loopback only."""
    models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """Extra base models, ``id=path-or-s3-prefix`` pairs, comma-separated."""
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_line_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    """Largest JSON request body (job specs, chat requests); uploads have max_upload_bytes."""
    max_concurrent_runs: int = Field(default=1, ge=1)
    ray_address: str | None = None
    """Address of an existing Ray cluster; None starts a local one (``tuneserve up``)."""
    cpus_per_worker: int = Field(default=0, ge=0)
    """CPUs each training worker asks Ray for; 0 means all CPUs of the machine / workers."""
    max_tokens_cap: int = Field(default=limits.MAX_TOKENS, ge=1)
    chat_max_concurrency: int = Field(default=32, ge=1)
    max_adapters_per_replica: int = Field(default=limits.ADAPTERS_PER_REPLICA, ge=1)
    max_full_models_per_replica: int = Field(default=limits.FULL_MODELS_PER_REPLICA, ge=1)
    """Full fine-tunes a chat replica keeps loaded per base model, each a whole model in memory."""
    chat_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a chat replica runs its model: ``auto`` takes the replica's GPU if it has one;
    ``cuda`` refuses to start without one (never serves from the CPU instead)."""
    chat_engine: Literal["auto", "native", "vllm"] = "auto"
    """``auto``: vLLM when the replica runs on a GPU and vLLM is installed, else ours."""
    vllm_python: str | None = None
    """The Python that has vLLM (its own venv, as its pins clash with ours); None: this one's
    if it imports vllm, else ``.venv-vllm`` of a source checkout."""
    worker_memory_gb: float | None = Field(default=None, gt=0)
    """Memory a training worker's tensors may use on the largest worker the cluster offers
    (a GPU's memory, less its runtime's); a job estimated to need more per worker is refused
    at ``POST`` (``service.jobs.estimate``). None: no check, and ``ddp`` by default."""
    gpu_price_per_hour: float | None = Field(default=None, ge=0)
    """Price of one GPU-hour: a GPU job's estimate then carries its cost."""
    builtin_models: bool = True
    """Offer the built-in SmolLM2-135M-Instruct as a base model."""
    tiny_model: bool = True
    """Also offer the tiny random test model (fast trials; off in production)."""
    webhook_secrets: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """``tenant:whsec_<base64>`` pairs, comma-separated: the key that signs a tenant's webhooks
    (Standard Webhooks; the ``openai`` SDK's ``webhooks.unwrap`` checks it). A tenant without
    one cannot ask for webhooks."""
    webhook_urls: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    """``tenant=url`` pairs, comma-separated: where every finished job of the tenant is
    announced (a job's ``webhook_url`` adds its own endpoint)."""
    webhook_allow_private: bool = False
    """Let a job's ``webhook_url`` resolve to loopback, private or link-local addresses (off:
    a caller must not make the service call into its own network)."""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    """How long one delivery waits for the receiver's answer."""
    webhook_retry_s: float = Field(default=5.0, gt=0)
    """Wait before the first retry; it doubles per attempt, up to an hour, for a day."""

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys = _pairs(value, ":", "TUNESERVE_API_KEYS", "key:tenant")
        for tenant in keys.values():
            if not tenant.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"TUNESERVE_API_KEYS: tenant {tenant!r} must be letters, digits, - or _")
        return keys

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _parse_webhook_secrets(cls, value: object) -> object:
        secrets = (_pairs(value, ":", "TUNESERVE_WEBHOOK_SECRETS", "tenant:whsec_…")
                   if isinstance(value, str) else value)
        for tenant, secret in (secrets or {}).items():
            try:
                key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except (ValueError, AttributeError):
                key = b""
            if not secret.startswith("whsec_") or len(key) < 16:
                raise ValueError(f"TUNESERVE_WEBHOOK_SECRETS: the secret of {tenant!r} must be "
                                 "'whsec_' + base64 of at least 16 random bytes")
        return secrets

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _parse_webhook_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return _pairs(value, "=", "TUNESERVE_WEBHOOK_URLS", "tenant=url")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        return _pairs(value, "=", "TUNESERVE_MODELS", "id=path") if isinstance(value, str) else value

    @field_validator("storage")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if value.startswith("s3://"):
            if not value[5:].split("/")[0]:
                raise ValueError("TUNESERVE_STORAGE: s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        elif "://" in value and not value.startswith("file://"):
            raise ValueError("TUNESERVE_STORAGE: use a directory, file://… or s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _refuse_open_bind_without_keys(self) -> Settings:
        if not self.api_keys and not _is_loopback(self.host):
            raise ValueError(
                f"TUNESERVE_HOST={self.host} is not loopback but TUNESERVE_API_KEYS is empty: "
                "set API keys before exposing the service")
        return self

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> Settings:
        unsigned = sorted(set(self.webhook_urls) - set(self.webhook_secrets))
        if unsigned:
            raise ValueError(f"TUNESERVE_WEBHOOK_URLS: tenant {unsigned[0]!r} has no secret in "
                             "TUNESERVE_WEBHOOK_SECRETS to sign its webhooks with")
        return self

    @property
    def tenants_by_key(self) -> dict[str, str]:
        return self.api_keys

    def storage_config(self) -> StorageConfig:
        return StorageConfig(uri=self.storage, endpoint_url=self.s3_endpoint_url)


LOCAL_TENANT = "local"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pairs(value: str, sep: str, variable: str, form: str) -> dict[str, str]:
    """``a<sep>b,c<sep>d`` → ``{a: b, c: d}``; a malformed pair names the variable (a key's
    first characters only: an API key must not reach the message whole)."""
    pairs: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, found, item = pair.partition(sep)
        if not found or not key or not item:
            raise ValueError(f"{variable}: expected {form} pairs, got {pair[:4]!r}…")
        pairs[key] = item
    return pairs

