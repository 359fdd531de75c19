"""The Kubeflow Pipelines side of gramline: container components, the DAG, pipeline presets.

Needs the `pipeline` extra (`pip install 'gramline[pipeline]'`: kfp, kfp-kubernetes, docker).

  components.py   one `@dsl.container_component` per stage (`python -m gramline.stages.<stage>`)
  presets.py      pipeline presets: parameter defaults and per-task Kubernetes settings
  pipeline.py     the `@dsl.pipeline` DAG built from a stage table; `compile_pipeline()`
  compiled.py     reading a compiled `gramline.yaml` back (tasks, executors, parameters)
"""
