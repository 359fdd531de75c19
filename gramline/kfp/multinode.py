"""A training stage's KFP component that runs it on several nodes through a Kubeflow Trainer TrainJob.

`multinode_component(stage, ...)` has the same name, inputs and outputs as the stage's single-node
component (`build_components(image)[stage]`), so a DAG can use either. Its container is the small
launcher `python -m gramline.kfp.trainjob` (see there): the stage's own arguments follow `--`
unchanged, and the launcher points the artifact paths among them at the shared volume.

The launcher task itself needs no GPU; it needs the shared volume mounted at `pvc_mount` as on the
nodes (`kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=pvc_mount)`), its `run_id` input set to
dsl.PIPELINE_JOB_ID_PLACEHOLDER (it names the TrainJob), and a service account allowed to create
trainjobs (manifests/base/rbac.yaml).
"""

# no `from __future__ import annotations`: KFP reads the real annotation objects

import inspect
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from kfp import dsl
from kfp.dsl.types.type_annotations import is_artifact_wrapped_in_Input

from gramline.kfp.components import EXECUTOR_OUTPUT, build_components, check_image
from gramline.stages import TRAINING_STAGES
from gramline.stages.common import UI_METADATA


def multinode_component(stage: str, image: str, nodes: int, gpus_per_node: int, cpu: str | None, memory: str | None,
                        shared_root: str, *, pvc: str | None = None, pvc_mount: str = "/data",
                        state_root: str | None = None, s3_secret: str | None = "gramline-s3", shm: str | None = None,
                        run_as_user: int | None = None, namespace: str | None = None,
                        timeout_s: int = 0, service_account: str | None = None) -> Callable[..., Any]:
    """The launcher component of `stage` on `nodes` nodes with `gpus_per_node` GPUs (and `cpu`,
    `memory`, `shm` if given) each. `shared_root`: a directory on the shared volume (the claim `pvc`,
    mounted at `pvc_mount` on the launcher and the nodes; pvc None: the runtime mounts it already)
    where each TrainJob keeps its inputs and Model. `state_root`: the DAG's `--state-uri` root, as
    for the single-node component. `run_as_user`: the nodes' user id (the launcher task's);
    `service_account`: the nodes' ServiceAccount (IRSA needs the annotated one)."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"multinode stage must be one of {TRAINING_STAGES}, not {stage!r}")
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, not {nodes} and {gpus_per_node}")
    if not shared_root.startswith("/") or (pvc and not PurePosixPath(shared_root).is_relative_to(pvc_mount)):
        raise ValueError(f"shared_root must be an absolute directory on the shared volume ({pvc_mount}), "
                         f"not {shared_root!r}")
    check_image(image)
    # the stage's own arguments as the DAG builds them, `--gpus` counting every node's GPUs
    single: Any = build_components(image, gpus={stage: nodes * gpus_per_node}, state_root=state_root)[stage]
    signature = inspect.signature(single.pipeline_func)
    names = list(signature.parameters)
    inputs = [name for name, p in signature.parameters.items() if is_artifact_wrapped_in_Input(p.annotation)]

    def launcher(*values: Any) -> dsl.ContainerSpec:
        bound = dict(zip(names, values))
        own = single.pipeline_func(*values)  # the stage's single-node container: its arguments
        model = bound["model"]
        args: list[Any] = ["--stage", stage, "--image", image, "--nodes", str(nodes),
                           "--gpus-per-node", str(gpus_per_node), "--shared-root", shared_root,
                           "--run-id", bound["run_id"]]
        if pvc:
            args += ["--pvc", pvc, "--pvc-mount", pvc_mount]
        for flag, value in (("--cpu", cpu), ("--memory", memory), ("--shm", shm),
                            ("--s3-secret", s3_secret), ("--namespace", namespace),
                            ("--service-account", service_account)):
            if value:
                args += [flag, value]
        if run_as_user is not None:
            args += ["--run-as-user", str(run_as_user)]
        if timeout_s:
            args += ["--timeout-s", str(timeout_s)]
        for name in inputs:
            args += ["--input", dsl.ConcatPlaceholder([f"{name}=", bound[name].path])]
        ui = bound[UI_METADATA]
        args += ["--out-model", model.path, "--out-ui-metadata", ui.path, "--executor-output", EXECUTOR_OUTPUT,
                 "--output-uri", dsl.ConcatPlaceholder(["model=", model.uri]),
                 "--output-uri", dsl.ConcatPlaceholder([f"{UI_METADATA}=", ui.uri]), "--", *own.args]
        return dsl.ContainerSpec(image=image, command=["python", "-m", "gramline.kfp.trainjob"], args=args)

    launcher.__name__ = launcher.__qualname__ = single.pipeline_func.__name__
    launcher.__doc__ = (f"{single.pipeline_func.__doc__}\n\nOn {nodes} nodes x {gpus_per_node} GPUs "
                        "as a Kubeflow Trainer TrainJob (torch-distributed).")
    launcher.__signature__ = signature  # type: ignore[attr-defined]
    launcher.__annotations__ = {name: p.annotation for name, p in signature.parameters.items()}
    return dsl.container_component(launcher)
