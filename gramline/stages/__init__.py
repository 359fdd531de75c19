"""Stage entry points: `python -m gramline.stages.<stage>` is each container's command.

The list of stages lives here, once: the CLI's commands, the config schema each stage checks its
`--set` keys against (on the host, before a container starts), and the training stages (one
process per GPU under torchrun, a state location, a TrainJob with `--nodes`).
"""

# stage -> "module:Class" of its config
CONFIG_SCHEMAS: dict[str, str] = {
    "curate": "gramline.curate.config:CurateConfig",
    "curate_plan": "gramline.curate.config:CurateConfig",
    "curate_partition": "gramline.curate.config:CurateConfig",
    "pretrain": "gramline.train.recipes.dino.config:DinoConfig",
    "anchor": "gramline.eval.anchor:AnchorConfig",
    "gram": "gramline.train.recipes.dino.config:GramStageConfig",
    "highres": "gramline.train.recipes.dino.config:HighresStageConfig",
    "distill": "gramline.train.recipes.distill.config:DistillConfig",
    "align": "gramline.train.recipes.align.config:AlignConfig",
    "benchmark": "gramline.eval.benchmark:BenchmarkConfig",
}
STAGES = tuple(CONFIG_SCHEMAS)
TRAINING_STAGES = ("pretrain", "gram", "highres", "distill", "align")
