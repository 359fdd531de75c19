"""align: LiT text alignment on a frozen backbone ("dino.txt", DINOv3 paper §6).

    python -m gramline.stages.align (--model DIR | --init-from SPEC) --dataset DIR --out-model DIR
        [--preset tiny] [--config FILE] [--set key=value ...] [--executor-output FILE] [--output-uri model=URI]

`--model` is a Model artifact (any stage's), or a distill output, whose student `align.student`
(default: the largest) is aligned. `--init-from` instead aligns starting weights: timm:<name> (timm's
public weights), timm:<name>@<file> (a local weights file for that timm class) or an official DINOv3
checkpoint (a directory is taken as --model), as a plain timm model of the architecture they fit,
built at `images.size` (default: timm's input side for that class, 256 for the DINOv3 ViTs); the
manifest records the spec under `init_from`. The dataset's train samples carry captions
(`<key>.txt`). The backbone stays frozen; a vision head and a text tower trained from scratch
learn a shared space with a contrastive loss over the global batch. Output: a Model artifact with
the backbone as loaded, the head, text tower and logit scale (`text.safetensors`) and the
tokenizer's identity; `gramline.models.text.load_aligned(DIR)` gives encode_image / encode_text /
encode_patches, and the benchmark runs zero-shot classification, retrieval and text-driven
segmentation on it. Captions longer than the text context are truncated and counted; a missing or
empty one exits 2 naming the sample. Started again on the same --out-model it resumes from the last
complete checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gramline.artifacts import lineage_entry
from gramline.data.reader import open_dataset
from gramline.models.text import Tokenizer
from gramline.stages.common import (
    add_state_option,
    add_ui_metadata_option,
    emit_training_output,
    run_stage,
    stage_parser,
)
from gramline.train.recipes.align.config import load_align_config
from gramline.train.recipes.align.data import (
    caption_batches,
    check_captions,
    read_captions,
    shuffled_captions,
)
from gramline.train.recipes.align.inputs import align_backbone
from gramline.train.recipes.align.recipe import AlignRecipe
from gramline.train.run import StepHook, TrainingRun, run_training


def main(argv: Sequence[str] | None = None, *, hooks: Sequence[StepHook] = ()) -> int:
    """`hooks(recipe, step)` run after every step (tests use them to interrupt a run)."""
    parser = stage_parser("align", "align a text tower to a frozen backbone (LiT / dino.txt)")
    parser.add_argument("--model", type=Path, default=None, help="backbone Model artifact (or a distill output)")
    parser.add_argument("--init-from", default=None, metavar="SPEC",
                        help="instead of --model: timm:<name>[@<file>] or an official DINOv3 checkpoint (.pth)")
    parser.add_argument("--dataset", type=Path, required=True, help="captioned Dataset artifact directory")
    parser.add_argument("--out-model", type=Path, required=True, help="output Model artifact directory")
    add_state_option(parser)
    add_ui_metadata_option(parser)
    args = parser.parse_args(argv)

    config = load_align_config(args.preset, args.config, args.overrides)
    source = align_backbone(args.model, args.init_from, config.align.student, config.images.size)
    tokenizer = Tokenizer(config.text.context_length)
    info = open_dataset(args.dataset)
    captions = read_captions(info, "train")
    truncated = check_captions(captions, tokenizer, f"--dataset {args.dataset}")
    if truncated:
        print(f"[align] {truncated} of {len(captions)} captions are longer than text.context_length="
              f"{config.text.context_length} tokens and will be truncated", flush=True)
    replacement = shuffled_captions(captions, config.train.seed) if config.align.shuffle_captions else None
    vit: Any = source.model  # timm's attributes are untyped
    size = config.images.size or int(vit.patch_embed.img_size[0])
    recipe = AlignRecipe(config, source.model, source.manifest, tokenizer)
    caption_counts = {"train": len(captions), "truncated": truncated}
    result = run_training(TrainingRun(
        stage="align", config=config, dataset=args.dataset, out_dir=args.out_model, recipe=recipe,
        batches=lambda info, env: caption_batches(info, config, env, size, tokenizer, replacement),
        inputs=[*source.inputs, lineage_entry("dataset", args.dataset)],
        record=lambda: {**source.record, "text_tower": {"backbone": source.label, "image_size": size},
                        "captions": {**caption_counts, "shuffled": config.align.shuffle_captions}},
        periodic_exports=False, frozen_sections=("head", "text", "align"), hooks=hooks, state_uri=args.state_uri,
        artifact=args.executor_output is not None))
    if result is None:
        return 0
    emit_training_output(args, {**result.metadata, "truncated_captions": truncated}, result.tensorboard_dir)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
