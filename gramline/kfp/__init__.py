"""The Kubeflow Pipelines side of gramline: container components, the DAG, deployment profiles,
and the local runs of the compiled pipeline.

Needs the `pipeline` extra (`pip install 'gramline[pipeline]'`: kfp, kfp-kubernetes, docker).

  components.py   one `@dsl.container_component` per stage (`python -m gramline.stages.<stage>`)
  profiles.py     deployment profiles: parameter defaults and per-task Kubernetes settings
  pipeline.py     the `@dsl.pipeline` DAG built from a stage table; `compile_pipeline()`
  compiled.py     reading a compiled `gramline.yaml` back (tasks, executors, parameters)
  local_run.py    `gramline run` / `gramline rerun`: the compiled YAML on one machine (kfp.local)
  dockerhost.py   the local Docker daemon those two use with `--runner docker`
  multinode.py    a training stage's component as the launcher of a Kubeflow Trainer TrainJob (`--nodes N`)
  trainjob.py     that launcher (`python -m gramline.kfp.trainjob`; needs only the `cluster` extra)
"""
