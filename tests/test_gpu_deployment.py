"""The GPU deployment serves chat with vLLM on the replica's GPU; the CPU overlay with ours.

The rendered manifests themselves (the ConfigMap patch included) are validated by
tests/test_deployment.py; this holds the engine choice and the image that makes it possible.
"""

from __future__ import annotations

import re

import pytest

from serving.device import place
from tests.test_deployment import ROOT, rayservice, rendered


def _settings(variant: str) -> dict[str, str]:
    (configmap,) = [d for d in rendered()[variant] if d["kind"] == "ConfigMap"]
    return configmap["data"]


def _chat_gpus(variant: str) -> float:
    """GPUs the chat deployment's replicas ask Ray for (Serve config of the RayService)."""
    import yaml

    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    (chat,) = [d for app in config["applications"] for d in app["deployments"]
               if d["name"].startswith("Chat-")]
    return chat["ray_actor_options"].get("num_gpus", 0)


def test_gpu_deployment_selects_vllm_on_the_gpu():
    settings = _settings("base")
    assert (settings["TUNESERVE_CHAT_ENGINE"], settings["TUNESERVE_CHAT_DEVICE"]) == \
        ("vllm", "cuda")
    assert _chat_gpus("base") >= 1


def test_cpu_overlay_keeps_the_native_engine():
    settings = _settings("cpu")
    assert (settings["TUNESERVE_CHAT_ENGINE"], settings["TUNESERVE_CHAT_DEVICE"]) == \
        ("native", "cpu")
    assert _chat_gpus("cpu") == 0
    # And that choice starts here, where no GPU is.
    assert place(device="cpu", engine="native").engine == "native"


def test_gpu_image_installs_a_pinned_vllm_where_the_settings_look():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pin = re.search(r"ARG VLLM_VERSION=(\S+)", dockerfile)
    assert pin and re.fullmatch(r"\d+\.\d+\.\d+", pin.group(1))
    assert 'pip install --no-cache-dir "vllm==${VLLM_VERSION}"' in dockerfile
    venv = re.search(r"python -m venv (\S+)", dockerfile).group(1)
    assert f"ENV TUNESERVE_VLLM_PYTHON={venv}/bin/python" in dockerfile


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_chat_settings_parse(variant: str, monkeypatch: pytest.MonkeyPatch):
    from service.core.settings import Settings

    for key, value in _settings(variant).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.chat_engine in ("vllm", "native")
