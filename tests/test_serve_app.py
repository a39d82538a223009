"""The Serve application that KubeRay runs: its import path builds, and the deployments it makes
are the ones the RayService config names."""

from __future__ import annotations

import importlib

import pytest
import yaml
from ray.serve import Application

from tests.test_deployment import ROOT as REPO, serve_import_path_and_deployments


def _settings_from_configmap() -> dict[str, str]:
    configmap = yaml.safe_load((REPO / "k8s" / "base" / "configmap.yaml").read_text())
    return {k: v for k, v in configmap["data"].items() if k.startswith("TUNESERVE_")}


def _deployment_names(app: Application) -> set[str]:
    names, stack = set(), [app]
    while stack:
        deployment = stack.pop()._bound_deployment
        names.add(deployment.name)
        stack.extend(a for a in deployment.init_args if isinstance(a, Application))
    return names


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
