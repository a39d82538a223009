"""What a process needs to open storage: plain and picklable, so it travels to Ray workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageConfig:
    uri: str
    """A local directory (path or ``file://``) or ``s3://bucket/prefix``."""
    endpoint_url: str | None = None
    """S3-compatible endpoint; credentials come from the standard AWS variables."""
