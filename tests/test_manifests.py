"""manifests/: kustomize overlays build, validate against the Kubernetes schemas offline, and grant
what gramline's tasks need (Trainer trainjobs, the S3 Secret, the kfp-launcher pipeline root).

Overlays are built with `kubectl kustomize` where kubectl exists, and always with a small
kustomize subset written here (resources, namespace, strategic-merge patches of maps) so the test
runs without kubectl; where both run, their outputs must agree.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
OVERLAYS = ["minio-in-cluster", "aws-s3"]
K8S_VERSION = "1.32"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge for the maps our patches touch (lists are replaced)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = _merge(out.get(key), value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def build_subset(directory: Path) -> list[dict[str, Any]]:
    """A kustomize subset: resources (files, directories), namespace, patches by kind + name."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "namespace", "resources", "patches"}
    assert not unknown, f"{directory}: the test's kustomize subset does not know {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs += build_subset(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in spec.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        targets = [i for i, d in enumerate(docs)
                   if d["kind"] == patch["kind"] and d["metadata"]["name"] == patch["metadata"]["name"]]
        assert len(targets) == 1, f"patch {patch_entry['path']} matches {len(targets)} resources"
        docs[targets[0]] = _merge(docs[targets[0]], patch)
    namespace = spec.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace
            elif doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
    return docs


def build_kubectl(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def _by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {_key(d): d for d in docs}
    assert len(out) == len(docs), "duplicate resources"
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param, _by_key(build_subset(MANIFESTS / "overlays" / request.param))


def test_every_resource_validates_against_the_kubernetes_schema(overlay: tuple[str, dict]) -> None:
    name, docs = overlay
    for key, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} {key}: {err.message} at {list(err.path)}")


def test_runner_rbac_covers_trainjobs_and_both_service_accounts(overlay: tuple[str, dict]) -> None:
    _, docs = overlay
    role = docs[("Role", "kubeflow", "gramline-runner")]
    trainjobs = [r for r in role["rules"] if r["apiGroups"] == ["trainer.kubeflow.org"] and "trainjobs" in r["resources"]]
    assert trainjobs and {"create", "get", "watch", "delete"} <= set(trainjobs[0]["verbs"])
    binding = docs[("RoleBinding", "kubeflow", "gramline-runner")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gramline-runner"}
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("gramline-runner", "kubeflow"), ("pipeline-runner", "kubeflow")}
    cluster_role = docs[("ClusterRole", "", "gramline-training-runtimes-reader")]
    assert cluster_role["rules"][0]["resources"] == ["clustertrainingruntimes"]
    assert ("ServiceAccount", "kubeflow", "gramline-runner") in docs


def test_s3_secret_has_the_keys_the_compiled_pipeline_maps_to_env(overlay: tuple[str, dict]) -> None:
    from gramline.kfp.profiles import S3_SECRET_KEYS

    _, docs = overlay
    secret = docs[("Secret", "kubeflow", "gramline-s3")]
    assert set(secret["stringData"]) == set(S3_SECRET_KEYS)


def test_launcher_config_points_the_pipeline_root_at_the_overlay_store(overlay: tuple[str, dict]) -> None:
    name, docs = overlay
    config = docs[("ConfigMap", "kubeflow", "kfp-launcher")]["data"]
    assert config["defaultPipelineRoot"].startswith("s3://")
    provider = yaml.safe_load(config["providers"])["s3"]["default"]
    assert provider["credentials"]["secretRef"]["secretName"] == "gramline-s3"
    secret = docs[("Secret", "kubeflow", "gramline-s3")]["stringData"]
    if name == "minio-in-cluster":
        assert provider["endpoint"] == "minio:9000" and provider["disableSSL"] is True
        assert secret["AWS_ENDPOINT_URL"] == "http://minio:9000"
        service = docs[("Service", "kubeflow", "minio")]
        assert {p["port"] for p in service["spec"]["ports"]} >= {9000}
        deployment = docs[("Deployment", "kubeflow", "minio")]
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MINIO_ROOT_USER"] == {"name": "gramline-s3", "key": "AWS_ACCESS_KEY_ID"}
        assert ("PersistentVolumeClaim", "kubeflow", "gramline-data") in docs
    else:
        assert provider["endpoint"].endswith("amazonaws.com") and provider["disableSSL"] is False
        assert secret["AWS_DEFAULT_REGION"] == provider["region"]
        assert not any(k[0] == "Deployment" for k in docs)


def test_the_data_pvc_is_the_claim_compile_mounts() -> None:
    docs = build_subset(MANIFESTS / "optional" / "data-pvc")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("PersistentVolumeClaim", "gramline-data")]
    assert "--pvc gramline-data" in (MANIFESTS / "optional" / "data-pvc" / "kustomization.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the subset build still ran)")
@pytest.mark.parametrize("name", OVERLAYS)
def test_kubectl_kustomize_agrees_with_the_subset_build(name: str) -> None:
    real = _by_key(build_kubectl(MANIFESTS / "overlays" / name))
    assert real == _by_key(build_subset(MANIFESTS / "overlays" / name))
