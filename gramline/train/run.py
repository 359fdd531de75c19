"""Glue shared by the training stages: config check against an existing run, teacher checkpoints,
final export and the executor output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from gramline.artifacts import MANIFEST
from gramline.config import SSLConfig, dump_config
from gramline.errors import InputError
from gramline.stages.common import emit_executor_output
from gramline.train.engine import SSLTrainer
from gramline.train.export import export_model, export_teacher_checkpoint

# Sections that must not change when a run is resumed in the same output directory.
FROZEN_SECTIONS = ("backbone", "heads")


def check_resume_compatible(out_dir: Path, config: SSLConfig) -> None:
    """Refuse to resume a run whose architecture differs from the requested one (reads only the
    checkpoint's small meta.json, not its weights)."""
    import json

    from gramline.train.checkpoint import META_FILE, latest_checkpoint

    path = latest_checkpoint(out_dir / "state")
    if path is None or not (path / META_FILE).is_file():
        return
    saved = json.loads((path / META_FILE).read_text()).get("config")
    if not saved:
        return
    now = dump_config(config)
    for section in FROZEN_SECTIONS:
        if saved.get(section) != now.get(section):
            raise InputError(f"--out-model {out_dir}", f"holds a run with a different {section} config "
                             f"({saved.get(section)} vs {now.get(section)})",
                             "a fresh output directory, or the same architecture to resume")


def final_metrics(log: dict[str, float]) -> dict[str, float]:
    keep = ("total", "dino_local", "dino_global", "ibot", "koleo", "gram")
    return {f"final_{k}": float(v) for k, v in log.items() if k in keep}


def train_and_export(args: argparse.Namespace, trainer: SSLTrainer, out_dir: Path, stage: str,
                     inputs: list[dict[str, Any]], extra_manifest: dict[str, Any] | None = None,
                     before_fit: Callable[[SSLTrainer], None] | None = None) -> dict:
    config = trainer.config
    trainer.extra_state["config"] = dump_config(config)
    resumed = trainer.try_resume()
    if before_fit is not None:
        before_fit(trainer)

    def teacher_checkpoint(step: int) -> None:
        if trainer.env.is_main:
            export_teacher_checkpoint(out_dir, trainer.teacher, config, stage, step, inputs,
                                      final_metrics(trainer.last_log))

    log = trainer.fit(on_teacher_checkpoint=teacher_checkpoint)
    manifest: dict = {}
    if trainer.env.is_main:
        (out_dir / MANIFEST).unlink(missing_ok=True)
        metrics = final_metrics(log)
        manifest = export_model(out_dir, trainer.teacher, config, stage, trainer.step, inputs, metrics,
                                resumed=resumed, **(extra_manifest or {}))
        meta = {"timm_model": manifest["timm"]["name"], "arch": config.backbone.arch, "step": trainer.step,
                **metrics}
        emit_executor_output(args, {"model": (out_dir, meta)})
        print(f"[{stage}] model written to {out_dir} (step {trainer.step}; "
              f"load with gramline.models.io.load_backbone or timm {manifest['timm']['name']})", flush=True)
    return manifest
