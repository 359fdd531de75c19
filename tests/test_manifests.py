"""manifests/: every overlay renders with `kubectl kustomize`, validates against the Kubernetes
schemas offline, cannot hurt a cluster (no Namespace or other object KFP owns, no committed secret
values, workloads meet Pod Security "restricted"), works per profile namespace, and grants what
gramline's tasks need (Trainer trainjobs, the S3 Secret, the kfp-launcher pipeline root).

The overlays' secretGenerator reads s3.env, which users make from s3.env.example and git ignores;
the tests render a copy of manifests/ with an s3.env made from the example (sentinel passwords).
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gramline.kfp.profiles import PROFILES, S3_SECRET_KEYS

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed: `kubectl kustomize` renders the overlays")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.32"
S3_SECRET = PROFILES["vitl16"].s3_secret  # the Secret every compiled task maps to env
STATIC_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# The service account KFP runs pipelines as (KFP docs): standalone `pipeline-runner` in `kubeflow`,
# multi-user the profile's `default-editor`.
KFP_RUNNER = {"multi-user": "default-editor"}
# Objects KFP (or Kubeflow's profile controller) creates in the runs' namespace: an overlay that
# rendered one would overwrite it on apply and delete it on `kubectl delete -k`.
KFP_OWNED = {("ServiceAccount", "pipeline-runner"), ("ServiceAccount", "default-editor"),
             ("ConfigMap", "kfp-launcher"), ("ConfigMap", "metadata-grpc-configmap"),
             ("Secret", "mlpipeline-minio-artifact"), ("RoleBinding", "default-editor"),
             ("RoleBinding", "namespaceAdmin")}
WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}

Docs = dict[tuple[str, str, str], dict[str, Any]]


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def render(directory: Path) -> Docs:
    done = subprocess.run(["kubectl", "kustomize", str(directory)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    out = {_key(d): d for d in docs}
    assert len(out) == len(docs), f"{directory}: duplicate resources"
    return out


def copy_with_env_files(tmp: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """manifests/ copied to `tmp`, each overlay's s3.env made from its example; empty values
    (the passwords the user must choose) become unique sentinels. Returns the copy and the env files."""
    root = tmp / "manifests"
    shutil.copytree(MANIFESTS, root, ignore=shutil.ignore_patterns("s3.env"))
    envs = {}
    for name in OVERLAYS:
        example = root / "overlays" / name / "s3.env.example"
        values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                      if line.strip() and not line.startswith("#"))
        values = {k: v or f"sentinel-{name}-{k}-7f3a" for k, v in values.items()}
        (example.parent / "s3.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        envs[name] = values
    return root, envs


@pytest.fixture(scope="module")
def copied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    return copy_with_env_files(tmp_path_factory.mktemp("manifests"))


@pytest.fixture(scope="module")
def rendered(copied: tuple[Path, dict[str, dict[str, str]]]) -> dict[str, tuple[Docs, Docs]]:
    """Each overlay's objects, and those of its pipeline-root (KFP's kfp-launcher ConfigMap)."""
    root, _ = copied
    return {name: (render(root / "overlays" / name), render(root / "overlays" / name / "pipeline-root"))
            for name in OVERLAYS}


def _namespace(docs: Docs) -> str:
    spaces = {k[1] for k in docs if k[1]}
    assert len(spaces) == 1, f"one namespace per overlay, got {spaces}"
    return spaces.pop()


def test_every_overlay_is_found_and_every_object_validates_against_the_kubernetes_schema(rendered) -> None:
    assert {"minio-in-cluster", "aws-s3", "multi-user"} <= set(OVERLAYS)
    for name, (docs, launcher) in rendered.items():
        for key, doc in {**docs, **launcher}.items():
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{name} {key}: {err.message} at {list(err.path)}")


def test_no_overlay_makes_a_namespace_or_any_object_kfp_owns(rendered) -> None:
    for name, (docs, launcher) in rendered.items():
        assert not [k for k in docs if k[0] == "Namespace"], f"{name} renders a Namespace"
        assert not [k for k in docs if (k[0], k[2]) in KFP_OWNED], f"{name} renders an object KFP owns"
        assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gramline" for d in docs.values())
        # KFP's kfp-launcher is changed by a separate kustomization, in the overlay's namespace.
        assert list(launcher) == [("ConfigMap", _namespace(docs), "kfp-launcher")], name


def test_committed_manifests_hold_no_secret_and_the_generator_input_is_git_ignored() -> None:
    for path in MANIFESTS.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc or {}).get("kind") != "Secret", f"{path} commits a Secret"
    tracked = subprocess.run(["git", "ls-files", "manifests"], check=False, cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in OVERLAYS:
        spec = yaml.safe_load((MANIFESTS / "overlays" / name / "kustomization.yaml").read_text())
        [generator] = spec["secretGenerator"]
        assert generator["name"] == S3_SECRET and not generator.get("literals")
        for env in generator["envs"]:
            path = f"manifests/overlays/{name}/{env}"
            assert path not in tracked.stdout.split(), f"{path} is committed"
            ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], check=False, cwd=REPO)
            assert ignored.returncode == 0, f"{path} is not git-ignored"
        example = (MANIFESTS / "overlays" / name / "s3.env.example").read_text()
        assert re.search(r"^AWS_SECRET_ACCESS_KEY=\S", example, re.MULTILINE) is None, f"{name}: the example sets a password"


def test_secret_values_come_only_from_the_env_file(rendered, copied) -> None:
    _, envs = copied
    for name, (docs, _) in rendered.items():
        ns = _namespace(docs)
        secrets = [k for k in docs if k[0] == "Secret"]
        assert secrets == [("Secret", ns, S3_SECRET)], name
        data = docs[secrets[0]]["data"]
        assert {k: base64.b64decode(v).decode() for k, v in data.items()} == envs[name]
        others = yaml.safe_dump([d for k, d in docs.items() if k[0] != "Secret"])
        for value in envs[name].values():
            if value.startswith("sentinel-"):
                assert value not in others, f"{name}: a secret value is copied outside the Secret"
        for doc in docs.values():
            for container in _containers(doc):
                for env in container.get("env", []):
                    if re.search(r"KEY|SECRET|PASSWORD|TOKEN", env["name"]) and env["name"] != "AWS_ENDPOINT_URL":
                        assert "valueFrom" in env and "value" not in env, f"{name}: {env['name']} is a literal"


def test_the_s3_secret_has_keys_the_compiled_pipeline_maps_to_env(rendered) -> None:
    for name, (docs, _) in rendered.items():
        keys = set(docs[("Secret", _namespace(docs), S3_SECRET)]["data"])
        assert keys <= set(S3_SECRET_KEYS), name
        has_minio = ("Deployment", _namespace(docs), "minio") in docs
        # MinIO's root user is the static pair; on S3, IRSA: no static AWS keys at all.
        assert STATIC_KEYS <= keys if has_minio else not keys & STATIC_KEYS, name


# Pod Security Standards, "restricted" profile (which includes "baseline"), as listed at
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (Kubernetes 1.32).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(template: dict[str, Any]) -> list[str]:
    """What in a pod template (metadata + spec) breaks Pod Security "restricted"."""
    spec, meta = template["spec"], template.get("metadata", {})
    pod_sc = spec.get("securityContext", {})
    out = [f"host namespace {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    out += [f"volume {v['name']} type {t}" for v in spec.get("volumes", []) for t in v
            if t != "name" and t not in RESTRICTED_VOLUMES]
    out += [f"sysctl {s['name']}" for s in pod_sc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    out += [f"annotation {k}" for k, v in meta.get("annotations", {}).items()
            if k.startswith("container.apparmor.security.beta.kubernetes.io/")
            and not (v == "runtime/default" or v.startswith("localhost/"))]
    containers = [c for f in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(f, [])]
    for where, sc in [("pod", pod_sc)] + [(c["name"], c.get("securityContext", {})) for c in containers]:
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: appArmorProfile")
        selinux = sc.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"{where}: seLinuxOptions")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser 0")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"{where}: seccompProfile Unconfined")
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        out += [f"{name}: adds capability {a}" for a in caps.get("add", []) if a != "NET_BIND_SERVICE"]
        out += [f"{name}: hostPort" for p in c.get("ports", []) if p.get("hostPort")]
    return out


def _pod_template(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] not in WORKLOAD_KINDS:
        return None
    if doc["kind"] == "Pod":
        return doc
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    template = _pod_template(doc)
    spec = template["spec"] if template else {}
    return [c for f in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(f, [])]


def test_every_workload_meets_pod_security_restricted_with_a_read_only_root(rendered) -> None:
    workloads = 0
    for name, (docs, _) in rendered.items():
        for key, doc in docs.items():
            template = _pod_template(doc)
            if template is None:
                continue
            workloads += 1
            assert restricted_violations(template) == [], f"{name} {key}"
            for container in _containers(doc):
                assert container["securityContext"].get("readOnlyRootFilesystem") is True, f"{name} {key}"
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in template["spec"]["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{name} {key}: /tmp is not an emptyDir"
    assert workloads >= 4  # MinIO and its bucket Job in two overlays


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "pod runAsNonRoot": lambda t: t["spec"]["securityContext"].pop("runAsNonRoot"),
    "container runAsNonRoot false": lambda t: t["spec"]["containers"][0]["securityContext"].update(runAsNonRoot=False),
    "runAsUser 0": lambda t: t["spec"]["containers"][0]["securityContext"].update(runAsUser=0),
    "allowPrivilegeEscalation unset": lambda t: t["spec"]["containers"][0]["securityContext"].pop(
        "allowPrivilegeEscalation"),
    "drop ALL missing": lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
    "adds SYS_ADMIN": lambda t: t["spec"]["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
    "seccomp unset": lambda t: t["spec"]["securityContext"].pop("seccompProfile"),
    "container seccomp Unconfined": lambda t: t["spec"]["containers"][0]["securityContext"].update(
        seccompProfile={"type": "Unconfined"}),
    "privileged": lambda t: t["spec"]["containers"][0]["securityContext"].update(privileged=True),
    "hostPath volume": lambda t: t["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "hostNetwork": lambda t: t["spec"].update(hostNetwork=True),
    "hostPort": lambda t: t["spec"]["containers"][0]["ports"][0].update(hostPort=9000),
    "unsafe sysctl": lambda t: t["spec"]["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    "init container without a securityContext": lambda t: t["spec"].update(
        initContainers=[{"name": "init", "image": "busybox"}]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_restricted_check_rejects_each_forbidden_setting(rendered, mutation: str) -> None:
    docs, _ = rendered["minio-in-cluster"]
    template = copy.deepcopy(docs[("Deployment", _namespace(docs), "minio")]["spec"]["template"])
    MUTATIONS[mutation](template)
    assert restricted_violations(template), mutation


def _rules_for(role: dict[str, Any], group: str, resource: str) -> set[str]:
    return {v for r in role["rules"] if group in r["apiGroups"] and resource in r["resources"] for v in r["verbs"]}


def test_runner_rbac_grants_what_the_tasks_need_to_gramlines_and_kfps_runner(rendered) -> None:
    for name, (docs, _) in rendered.items():
        ns = _namespace(docs)
        subjects = {("gramline-runner", ns), (KFP_RUNNER.get(name, "pipeline-runner"), ns)}
        assert ("ServiceAccount", ns, "gramline-runner") in docs
        role = docs[("Role", ns, "gramline-runner")]
        assert {"create", "get", "watch", "delete"} <= _rules_for(role, "trainer.kubeflow.org", "trainjobs")
        assert {"create", "get", "watch", "delete"} <= _rules_for(role, "kubeflow.org", "pytorchjobs")
        assert {"get", "watch"} <= _rules_for(role, "", "pods/log")
        secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [S3_SECRET],
                                 "verbs": ["get"]}]  # the S3 Secret only, read only
        assert "get" in _rules_for(role, "", "configmaps")
        [binding] = [d for k, d in docs.items() if k[0] == "RoleBinding"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gramline-runner"}
        assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == subjects, name
        [cluster_binding] = [d for k, d in docs.items() if k[0] == "ClusterRoleBinding"]
        assert {(s["name"], s["namespace"]) for s in cluster_binding["subjects"]} == subjects, name
        cluster_role = docs[("ClusterRole", "", cluster_binding["roleRef"]["name"])]
        assert cluster_role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"],
                                          "resources": ["clustertrainingruntimes"], "verbs": ["get", "list", "watch"]}]


def _set_namespace(directory: Path, namespace: str) -> None:
    path = directory / "kustomization.yaml"
    text, count = re.subn(r"^namespace: \S+", f"namespace: {namespace}", path.read_text(), flags=re.MULTILINE)
    assert count == 1
    path.write_text(text)


def test_multi_user_profiles_bind_their_own_default_editor_and_never_collide(copied, tmp_path: Path) -> None:
    root, _ = copied
    renders = {}
    for profile in ("team-a", "team-b"):
        overlay = root / "overlays" / f"profile-{profile}"
        shutil.copytree(root / "overlays" / "multi-user", overlay)
        _set_namespace(overlay, profile)
        _set_namespace(overlay / "pipeline-root", profile)
        docs = render(overlay)
        assert _namespace(docs) == profile
        for doc in docs.values():
            for subject in doc.get("subjects", []):
                assert subject["namespace"] == profile, (profile, subject)
        editors = [d for d in docs.values() if d["kind"].endswith("RoleBinding")
                   and {"kind": "ServiceAccount", "name": "default-editor", "namespace": profile} in d["subjects"]]
        assert len(editors) == 2
        assert list(render(overlay / "pipeline-root")) == [("ConfigMap", profile, "kfp-launcher")]
        renders[profile] = docs
    # Two profiles share no object, so applying or deleting one leaves the other alone.
    assert not set(renders["team-a"]) & set(renders["team-b"])


def test_the_readmes_multi_user_s3_variant_renders_without_minio_or_keys(copied) -> None:
    """manifests/README.md: a profile on AWS S3 drops MinIO and the data PVC, takes aws-s3's env
    example and pipeline root; IRSA comes from the Profile's plugin on default-editor."""
    root, _ = copied
    overlay = root / "overlays" / "profile-s3"
    shutil.copytree(root / "overlays" / "multi-user", overlay)
    spec = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    spec.pop("components")
    spec["resources"].remove("../../optional/data-pvc")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(root / "overlays" / "aws-s3" / "s3.env.example", overlay / "s3.env")
    launcher = yaml.safe_load((overlay / "pipeline-root" / "kustomization.yaml").read_text())
    launcher["resources"] = ["../../../pipeline-root/aws-s3"]
    (overlay / "pipeline-root" / "kustomization.yaml").write_text(yaml.safe_dump(launcher))
    docs = render(overlay)
    ns = _namespace(docs)
    assert not any(k[0] in WORKLOAD_KINDS or k[0] == "PersistentVolumeClaim" for k in docs)
    assert not set(docs[("Secret", ns, S3_SECRET)]["data"]) & STATIC_KEYS
    binding = docs[("RoleBinding", ns, "gramline-runner")]
    assert {"kind": "ServiceAccount", "name": "default-editor", "namespace": ns} in binding["subjects"]
    config = render(overlay / "pipeline-root")[("ConfigMap", ns, "kfp-launcher")]["data"]
    assert yaml.safe_load(config["providers"])["s3"]["default"]["credentials"] == {"fromEnv": True}


def test_launcher_config_points_the_pipeline_root_at_the_overlay_store(rendered) -> None:
    for name, (docs, launcher) in rendered.items():
        ns = _namespace(docs)
        config = launcher[("ConfigMap", ns, "kfp-launcher")]["data"]
        root = config["defaultPipelineRoot"]
        assert root.startswith("s3://")
        provider = yaml.safe_load(config["providers"])["s3"]["default"]
        secret = {k: base64.b64decode(v).decode() for k, v in docs[("Secret", ns, S3_SECRET)]["data"].items()}
        assert secret["AWS_DEFAULT_REGION"] == provider["region"], name
        if ("Deployment", ns, "minio") in docs:
            host, port = provider["endpoint"].split(":")
            assert provider["disableSSL"] is True and secret["AWS_ENDPOINT_URL"] == f"http://{host}:{port}"
            assert int(port) in {p["port"] for p in docs[("Service", ns, host)]["spec"]["ports"]}
            ref = provider["credentials"]["secretRef"]
            assert ref["secretName"] == S3_SECRET and {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secret)
            container = docs[("Deployment", ns, "minio")]["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
            assert env["MINIO_ROOT_USER"] == {"name": S3_SECRET, "key": ref["accessKeyKey"]}
            assert env["MINIO_ROOT_PASSWORD"] == {"name": S3_SECRET, "key": ref["secretKeyKey"]}
            bucket = root.removeprefix("s3://").split("/")[0]
            assert f"store/{bucket}" in docs[("Job", ns, "minio-make-bucket")]["spec"]["template"]["spec"][
                "containers"][0]["args"][0]
            assert ("PersistentVolumeClaim", ns, "gramline-data") in docs
        else:  # AWS S3 with IRSA: the launcher takes the SDK's default chain, the runner has a role
            assert provider["credentials"] == {"fromEnv": True}
            assert provider["endpoint"] == secret["AWS_ENDPOINT_URL"].removeprefix("https://")
            assert provider["disableSSL"] is False
            annotations = docs[("ServiceAccount", ns, "gramline-runner")]["metadata"]["annotations"]
            assert re.fullmatch(r"arn:aws:iam::\d{12}:role/.+", annotations["eks.amazonaws.com/role-arn"])
            assert not any(k[0] in WORKLOAD_KINDS for k in docs)


def test_the_data_pvc_is_the_claim_compile_mounts() -> None:
    docs = render(MANIFESTS / "optional" / "data-pvc")
    assert [(k[0], k[2]) for k in docs] == [("PersistentVolumeClaim", "gramline-data")]
    assert "--pvc gramline-data" in (MANIFESTS / "optional" / "data-pvc" / "kustomization.yaml").read_text()
