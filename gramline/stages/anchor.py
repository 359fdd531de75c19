"""anchor: pick the Gram teacher from a pretrain run's teacher checkpoints (reference §1.5, §6.2).

    python -m gramline.stages.anchor --model PRETRAIN_DIR [--dataset DIR] --out-model DIR
        [--preset tiny] [--config FILE] [--set anchor.step=N] [--set key=value ...]
        [--executor-output FILE] [--output-uri model=URI]

Candidates are the complete teacher checkpoints under <model>/checkpoints/teacher-XXXXXXXX/. With
`anchor.step=N` that checkpoint is taken. Otherwise each candidate (steps within
anchor.min_step..anchor.max_step) is scored on the first `anchor.images` images of the dataset's
eval split with the label-free dense diagnostics of gramline.eval.dense: patch correspondence
(crop-and-flip nearest-neighbour matching, averaged over `anchor.crop_fractions`) decides; each
candidate's Gram-matrix correlation with the latest checkpoint is recorded beside it (how far
the run's patch geometry moved since). The best wins (ties: the earlier step). The output is a
frozen Gram-teacher Model: the chosen backbone only, with a manifest naming the checkpoint and
every candidate's scores.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.artifacts import build_manifest, lineage_entry, read_manifest, write_manifest
from gramline.errors import InputError
from gramline.io import atomic_path
from gramline.models.io import BACKBONE_FILE
from gramline.phase_presets import AnchorSettings, load_anchor_config
from gramline.stages.common import emit_executor_output, run_stage, stage_parser
from gramline.train.export import list_teacher_checkpoints
from gramline.train.progress import format_eta

STAGE = "anchor"


def score_checkpoints(candidates: Sequence[tuple[int, Path]], dataset: Path, settings: AnchorSettings,
                      ) -> list[dict[str, Any]]:
    """Dense scores of each checkpoint: correspondence (mean over crop fractions) and Gram
    correlation/MSE against the latest candidate; rows in step order."""
    import torch

    from gramline.eval.dense import gram_similarity, patch_correspondence
    from gramline.eval.features import forward_tokens, load_eval_data, preprocess, torch_threads
    from gramline.models.io import load_backbone

    data = load_eval_data(dataset, max_images=settings.images, flag="--dataset")
    rows: list[dict[str, Any]] = []
    reference = None
    start = time.perf_counter()
    with torch_threads(settings.threads):
        for done, (step, path) in enumerate(reversed(candidates), 1):  # the latest first: it is the reference
            module, manifest = load_backbone(path, flag=f"checkpoint {path.name}")
            patch = int(module.patch_embed.patch_size[0])
            size = settings.size or int((manifest.get("config") or {}).get("crops", {}).get("global_size", 0)) \
                or int(manifest.get("img_size") or 0)
            if size <= 0 or size % patch:
                raise InputError("config field 'anchor.size'", f"is {size or 'unset'}",
                                 f"a positive multiple of the patch size {patch}")
            corr = [patch_correspondence(module, data.images, size, fraction, settings.seed, settings.batch_size)
                    for fraction in settings.crop_fractions]
            patches = [forward_tokens(module, preprocess(data.images[lo:lo + settings.batch_size], size))[1]
                       for lo in range(0, data.n, settings.batch_size)]
            patches_all = torch.cat(patches).float()
            if reference is None:
                reference = patches_all
            gram = gram_similarity(patches_all, reference)
            rows.append({"step": step, "checkpoint": path.name, "correspondence": sum(corr) / len(corr),
                         "correspondence_by_fraction": dict(zip(map(str, settings.crop_fractions), corr)),
                         "gram_corr_to_latest": gram["gram_corr"], "gram_mse_to_latest": gram["gram_mse"],
                         "images": data.n, "size": size})
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(candidates) - done)
            print(f"[{STAGE}] {path.name}: correspondence {rows[-1]['correspondence']:.4f} gram_corr_to_latest "
                  f"{gram['gram_corr']:.4f} ({done}/{len(candidates)}, {done / elapsed:.2f} ckpt/s, "
                  f"ETA {format_eta(eta)})", flush=True)
    return sorted(rows, key=lambda r: r["step"])


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest correspondence; the earliest step among equals."""
    return max(rows, key=lambda r: (r["correspondence"], -r["step"]))


def select(model_dir: Path, dataset: Path | None, settings: AnchorSettings) -> tuple[int, Path, dict[str, Any]]:
    """(step, checkpoint dir, why) of the anchor."""
    found = list_teacher_checkpoints(model_dir)
    if not found:
        raise InputError(f"--model {model_dir}", "has no teacher checkpoints (checkpoints/teacher-XXXXXXXX with a "
                         "manifest)", "a pretrain run with train.teacher_checkpoint_every > 0 that reached it")
    steps = [s for s, _ in found]
    if settings.step is not None:
        by_step = dict(found)
        if settings.step not in by_step:
            raise InputError("config field 'anchor.step'", f"is {settings.step}, which has no teacher checkpoint "
                             f"in {model_dir}/checkpoints", "one of " + ", ".join(map(str, steps)))
        return settings.step, by_step[settings.step], {"mode": "step", "available_steps": steps}
    upper = settings.max_step if settings.max_step is not None else max(steps)
    candidates = [(s, p) for s, p in found if settings.min_step <= s <= upper]
    if not candidates:
        raise InputError("config fields 'anchor.min_step'/'anchor.max_step'",
                         f"leave no candidate among steps {steps}", "a range containing some checkpoint steps")
    if dataset is None:
        raise InputError("--dataset", "is missing", "a Dataset artifact whose eval split scores the checkpoints "
                         "(or --set anchor.step=N to take a checkpoint by step)")
    rows = score_checkpoints(candidates, dataset, settings)
    best = choose(rows)
    why = {"mode": "dense", "metric": "correspondence", "candidates": rows, "available_steps": steps}
    return best["step"], dict(candidates)[best["step"]], why


def export_anchor(out_dir: Path, checkpoint: Path, step: int, why: dict[str, Any], config: dict[str, Any],
                  inputs: list[dict[str, Any]]) -> dict[str, Any]:
    source = read_manifest(checkpoint, "Model", f"checkpoint {checkpoint}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / BACKBONE_FILE) as tmp:
        shutil.copyfile(checkpoint / BACKBONE_FILE, tmp)
    keep = {k: source[k] for k in ("timm", "arch", "embed_dim", "patch_size", "img_size") if k in source}
    scores = {}
    if why["mode"] == "dense":
        chosen = next(r for r in why["candidates"] if r["step"] == step)
        scores = {"correspondence": chosen["correspondence"], "gram_corr_to_latest": chosen["gram_corr_to_latest"]}
    manifest = build_manifest("Model", STAGE, config=config, inputs=inputs, counts={"step": step},
                              metrics=scores, step=step, **keep,
                              anchor={"checkpoint": checkpoint.name, "step": step, **why},
                              training_config=source.get("config", {}), frozen=True, backbone_only=True)
    write_manifest(out_dir, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "choose the Gram teacher (anchor) from a pretrain run's teacher checkpoints")
    parser.add_argument("--model", type=Path, required=True, help="pretrain Model artifact (with checkpoints/)")
    parser.add_argument("--dataset", type=Path, default=None, help="Dataset artifact whose eval split scores them")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    args = parser.parse_args(argv)

    config = load_anchor_config(args.preset, args.config, args.overrides)
    read_manifest(args.model, "Model", "--model")
    step, checkpoint, why = select(args.model, args.dataset, config.anchor)
    inputs = [lineage_entry("model", args.model)]
    if args.dataset is not None and why["mode"] == "dense":
        inputs.append(lineage_entry("dataset", args.dataset))
    manifest = export_anchor(args.out_model, checkpoint, step, why, config.model_dump(mode="json"), inputs)
    meta = {"timm_model": manifest["timm"]["name"], "arch": manifest.get("arch"), "step": step,
            "mode": why["mode"], **manifest["metrics"]}
    emit_executor_output(args, {"model": (args.out_model, meta)})
    print(f"[{STAGE}] anchor = {checkpoint.name} (by {why['mode']}) written to {args.out_model}", flush=True)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
