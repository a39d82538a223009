"""The Serve application that KubeRay runs: its import path builds, and the deployments it makes
are the ones the RayService config names."""

from __future__ import annotations

import importlib

import pytest
import yaml
from ray.serve import Application

from tests.test_deployment import ROOT as REPO
from tests.test_deployment import serve_import_path_and_deployments


def _settings_from_configmap() -> dict[str, str]:
    configmap = yaml.safe_load((REPO / "k8s" / "base" / "configmap.yaml").read_text())
    return {k: v for k, v in configmap["data"].items() if k.startswith("TUNESERVE_")}


def _deployments(app: Application) -> list:
    found, stack = [], [app]
    while stack:
        deployment = stack.pop()._bound_deployment
        found.append(deployment)
        stack.extend(a for a in deployment.init_args if isinstance(a, Application))
    return found


def _deployment_names(app: Application) -> set[str]:
    return {deployment.name for deployment in _deployments(app)}


@pytest.mark.parametrize("variant", ["base", "cpu"])
def test_import_path_builds_the_configured_deployments(variant, monkeypatch):
    import_path, configured = serve_import_path_and_deployments(variant)
    for name, value in _settings_from_configmap().items():
        monkeypatch.setenv(name, value)
    module, _, attr = import_path.partition(":")
    build = getattr(importlib.import_module(module), attr)
    app = build({})
    assert isinstance(app, Application)
    assert _deployment_names(app) == set(configured)


def test_kuberay_replicas_get_no_environment_of_the_embedded_launcher(monkeypatch):
    """What ``tuneserve up`` tunes for one machine (``service.ray.embedded``) stays out of the
    application KubeRay builds, and importing the chat code changes no environment variable."""
    import os
    import subprocess
    import sys

    from service.ray.app import build_app
    from service.ray.embedded import CHAT_REPLICA_ENV
    from service.ray.embedded import build_app as build_embedded_app

    for name in CHAT_REPLICA_ENV:  # (a value set here would win over the launcher's)
        monkeypatch.delenv(name, raising=False)
    for deployment in _deployments(build_app({})):
        assert "runtime_env" not in (deployment.ray_actor_options or {}), deployment.name
    chats = [d for d in _deployments(build_embedded_app({})) if d.name.startswith("Chat-")]
    assert chats and all(d.ray_actor_options["runtime_env"]["env_vars"] == CHAT_REPLICA_ENV
                         and d.ray_actor_options["num_cpus"] == 0 for d in chats)

    env = {k: v for k, v in os.environ.items() if k not in CHAT_REPLICA_ENV}
    script = ("import os; before = dict(os.environ); import serving.deployment, service.ray.app; "
              "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    changed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True, cwd=REPO).stdout.strip()
    assert changed == "[]"
