"""Every stage's preset values, in one table: `PRESETS[stage][name]`.

A preset is a partial config tree over the stage's schema defaults (the schema lives beside the code
that reads it: `gramline.curate.config`, `gramline.train.recipes.dino.config`, `gramline.eval.*`).
A stage resolves its config as: schema defaults ← preset ← `--config FILE` ← `--set key=value`
(`gramline.config.load_stage_config`). The names follow the model sizes: `tiny` (CPU, CI, minutes)
and the recipe's `vits16`, `vitb16`, `vitl16`, `vit7b16`; curate has `tiny` and `large`.

Where a value departs from the DINOv3 recipe the comment says why; the measurements behind the tiny
preset's departures are in docs/presets.md. Recipe values cite the official configs
(`dinov3/configs/train/*.yaml` in facebookresearch/dinov3) and the DINOv3 paper (arXiv 2508.10104).
"""

from __future__ import annotations

import copy
from typing import Any

from gramline.config import deep_merge
from gramline.errors import InputError

Tree = dict[str, Any]


def schedule(start: float, peak: float, end: float, warmup_steps: int = 0, cosine_steps: int | None = None,
             delay_steps: int = 0) -> Tree:
    """A fully specified schedule tree, so that merging never mixes in keys of an older schedule."""
    return {"start": start, "peak": peak, "end": end, "warmup_steps": warmup_steps, "cosine_steps": cosine_steps,
            "delay_steps": delay_steps}


def constant(value: float) -> Tree:
    return schedule(value, value, value)


# --------------------------------------------------------------------------- pretrain

_STANDARD_HEADS = {"dino_hidden": 2048, "dino_bottleneck": 256, "dino_prototypes": 65536,
                       "ibot_hidden": 2048, "ibot_bottleneck": 256, "ibot_prototypes": 65536}


def _vit_pretrain(arch: str, drop_path: float, batch: int, layerwise_decay: float) -> Tree:
    """The ViT-L IN-1k recipe (`vitl_im1k_lin834.yaml`) for S/B/L: 125k steps, cosine LR 1e-3 (before
    scaling), WD 0.04 → 0.4, momentum 0.992 → 1, teacher temperature 0.04 → 0.07 over 37.5k steps, the
    prototype layers frozen for the first 1250 steps."""
    return {
        "backbone": {"arch": arch, "img_size": 224, "drop_path_rate": drop_path, "rope_rescale_coords": 2.0},
        "heads": dict(_STANDARD_HEADS),
        "crops": {"global_size": 224, "local_size": 96, "n_local": 8},
        "loss": {"teacher_temp": schedule(0.04, 0.07, 0.07, warmup_steps=37_500)},
        "optim": {
            "lr": schedule(0.0, 1e-3, 1e-6, warmup_steps=12_500),
            "weight_decay": schedule(0.04, 0.04, 0.4),
            "layerwise_decay": layerwise_decay,
            "freeze_last_layer_steps": 1250,
            "clip_grad": 3.0,
        },
        "ema": {"momentum": schedule(0.992, 0.992, 1.0)},
        "data": {"num_workers": 10},
        "train": {"steps": 125_000, "batch_size": batch, "checkpoint_every": 3750,
                  "teacher_checkpoint_every": 12_500, "log_every": 50, "compile": True},
    }


_PRETRAIN: dict[str, Tree] = {
    # CPU in minutes: the same classes and losses, scaled down. Four values depart from the recipe so
    # that a run of a few hundred steps learns at all (docs/presets.md has the measurements):
    # LayerScale 1.0 (with 1e-5 every image starts with the same CLS token and the Sinkhorn-Knopp
    # targets are uniform), prototype-layer init std 0.3 (a usable logit scale from step 0), a
    # constant teacher temperature of 0.02 and EMA momentum 0.95 (with the recipe's values the DINO
    # term stays at ln K for the whole run).
    "tiny": {
        "backbone": {"arch": "tiny", "img_size": 64, "drop_path_rate": 0.0, "rope_rescale_coords": 2.0,
                     "layerscale_init": 1.0},
        "heads": {"dino_hidden": 256, "dino_bottleneck": 64, "dino_prototypes": 128,
                      "ibot_hidden": 256, "ibot_bottleneck": 64, "ibot_prototypes": 128, "last_layer_init_std": 0.3},
        "crops": {"global_size": 48, "local_size": 24, "n_local": 4},
        "loss": {"teacher_temp": constant(0.02)},
        "optim": {
            "lr": schedule(0.0, 2e-3, 2e-3, warmup_steps=20),
            "weight_decay": constant(0.04),
            "layerwise_decay": 1.0,
            "freeze_last_layer_steps": 0,
        },
        "ema": {"momentum": constant(0.95)},
        "data": {"num_workers": 0, "shuffle_buffer": 256},
        "train": {"steps": 200, "batch_size": 32, "checkpoint_every": 50, "teacher_checkpoints": 4,
                  "log_every": 10},
    },
    "vits16": _vit_pretrain("vits16", drop_path=0.1, batch=64, layerwise_decay=0.9),
    "vitb16": _vit_pretrain("vitb16", drop_path=0.2, batch=64, layerwise_decay=0.9),
    "vitl16": _vit_pretrain("vitl16", drop_path=0.3, batch=64, layerwise_decay=0.9),
    # 7B pretraining (`dinov3_vit7b16_pretrain.yaml`): constant schedules after a 100k warmup.
    "vit7b16": {
        "backbone": {"arch": "vit7b16", "img_size": 256, "drop_path_rate": 0.4, "rope_rescale_coords": 2.0},
        "heads": {"dino_hidden": 8192, "dino_bottleneck": 512, "dino_prototypes": 262_144,
                      "ibot_hidden": 4096, "ibot_bottleneck": 384, "ibot_prototypes": 98_304},
        "crops": {"global_size": 256, "local_size": 112, "n_local": 8, "horizontal_flip": False},
        "loss": {"teacher_temp": schedule(0.04, 0.07, 0.07, warmup_steps=100_000)},
        "optim": {
            "lr": schedule(0.0, 5e-5, 5e-5, warmup_steps=100_000),
            "weight_decay": constant(0.04),
            "betas": [0.9, 0.99],
            "layerwise_decay": 0.98,
            "freeze_last_layer_steps": 5000,
            "clip_grad": 30.0,
        },
        "ema": {"momentum": constant(0.994)},
        "data": {"num_workers": 10},
        "train": {"steps": 1_000_000, "batch_size": 16, "checkpoint_every": 1000,
                  "teacher_checkpoint_every": 12_500, "log_every": 50, "compile": True, "distributed": "fsdp",
                  "activation_checkpointing": "selective"},
    },
}

# --------------------------------------------------------------------------- adapt
# pretrain --init-from: continue self-supervised training of existing weights (public DINOv3
# backbones, a Model, an official checkpoint) on the user's domain. The released backbones have no
# DINO/iBOT heads, so new heads warm up first on the frozen backbone; then everything trains at a
# tenth of the from-scratch peak LR with the recipe's layer-wise decay (lower blocks move less), and
# the starting backbone is a fixed Gram teacher from step 0 (2x-resolution crops, no photometric
# distortion, weight 1.5 as the recipe's fixed-teacher high-resolution phase), so the dense patch
# geometry stays close to the starting model's while the global features adapt. The DINO local-crop
# weight is 0.5, as in both recipe phases with a Gram term. These are our choices, not the paper's
# (the official code ships no such configuration: official issue #18); `--set gram.enabled=false`
# turns the anchor off.


def _adapt(pretrain: Tree, steps: int, head_warmup: int, lr: Tree, momentum: Tree, gram_size: int,
           gram_weight: float, checkpoint_every: int, teacher_every: int, freeze_last_layer: int) -> Tree:
    return deep_merge(pretrain, {
        "init": {"head_warmup_steps": head_warmup},
        "crops": {"gram_size": gram_size, "gram_no_distortions": True},
        "gram": {"enabled": True, "weight": constant(gram_weight), "img_level": True, "normalize": True},
        "loss": {"local_weight": constant(0.5)},
        "optim": {"lr": lr, "weight_decay": constant(0.04), "freeze_last_layer_steps": freeze_last_layer},
        "ema": {"momentum": momentum},
        "train": {"steps": steps, "checkpoint_every": checkpoint_every, "teacher_checkpoint_every": teacher_every},
    })


def _adapt_vit(arch: str) -> Tree:
    """30k steps (a quarter of pretraining), 2k of them heads only; LR 1e-4 (before scaling) after a
    1k warmup, cosine to 1e-6; EMA momentum 0.994 → 1 (the 7B recipe's start: the teacher is good
    from step 0); teacher temperature 0.04 → 0.07 over 5k steps for the new heads."""
    tree = _adapt(_PRETRAIN[arch], steps=30_000, head_warmup=2000, lr=schedule(0.0, 1e-4, 1e-6, warmup_steps=1000),
                  momentum=schedule(0.994, 0.994, 1.0), gram_size=448, gram_weight=1.5, checkpoint_every=2500,
                  teacher_every=5000, freeze_last_layer=1250)
    tree["loss"]["teacher_temp"] = schedule(0.04, 0.07, 0.07, warmup_steps=5000)
    return tree


_ADAPT: dict[str, Tree] = {
    # CPU in minutes: the tiny pretrain preset, 60 steps of which 20 heads only, a quarter of its LR.
    # The Gram crops are the global crops' size (48), not 2x: a tiny start model's patch geometry at
    # 2x resolution differs from its own at 1x, so a 2x anchor moves it away from where it started
    # (docs/presets.md has the measurements).
    "tiny": _adapt(_PRETRAIN["tiny"], steps=60, head_warmup=20, lr=schedule(0.0, 5e-4, 5e-4, warmup_steps=10),
                   momentum=constant(0.95), gram_size=48, gram_weight=1.0, checkpoint_every=20, teacher_every=20,
                   freeze_last_layer=0),
    "vits16": _adapt_vit("vits16"),
    "vitb16": _adapt_vit("vitb16"),
    "vitl16": _adapt_vit("vitl16"),
}

# --------------------------------------------------------------------------- anchor

_ANCHOR: dict[str, Tree] = {
    "tiny": {"anchor": {"images": 32, "batch_size": 32, "threads": 1}},
    **{name: {"anchor": {"images": 256, "batch_size": 64}} for name in ("vits16", "vitb16", "vitl16")},
    "vit7b16": {"anchor": {"images": 256, "batch_size": 16}},
}

# --------------------------------------------------------------------------- gram
# The phase counts from its own first step S (the continued run's last step). The 7B values are the
# recipe's (`dinov3_vit7b16_gram_anchor.yaml`); the official code configures this phase for 7B only,
# so the S/B/L values are scaled-down choices of ours, not tuned.


def _gram(steps: int, ramp: int, refresh_at: list[int], lr: Tree | None, checkpoint_every: int,
          teacher_every: int, log_every: int, checkpointing: str = "full") -> Tree:
    """Full activation checkpointing, as the recipe's Gram phase (`checkpointing_full`)."""
    return {
        "phase": {"steps": steps, "weight": 2.0, "ramp_steps": ramp, "local_weight": 0.5, "refresh_at": refresh_at,
                  "gram_size_factor": 2.0, "lr": lr},
        "ema": {"momentum": constant(0.999)},
        "crops": {"gram_no_distortions": True},
        "gram": {"enabled": True, "img_level": True, "normalize": True},
        "train": {"checkpoint_every": checkpoint_every, "teacher_checkpoint_every": teacher_every,
                  "log_every": log_every, "activation_checkpointing": checkpointing},
    }


# S/B/L: 20% of the 125k pretraining, as 7B adds 200k to 1M; the run's LR has decayed to 1e-6, so the
# phase warms it up again to 1/5 of the pretraining peak.
_GRAM_VIT = _gram(25_000, 1000, [1250, 2500, 3750], schedule(1e-6, 2e-4, 2e-4, warmup_steps=1000),
                  checkpoint_every=2500, teacher_every=5000, log_every=50)
_GRAM: dict[str, Tree] = {
    "tiny": _gram(40, 10, [20], None, checkpoint_every=20, teacher_every=20, log_every=5, checkpointing="none"),
    "vits16": _GRAM_VIT,
    "vitb16": _GRAM_VIT,
    "vitl16": _GRAM_VIT,
    # 200k steps after 1M, ramp 1k, refreshes after +10k/+20k/+30k, LR 3e-5 (before scaling)
    "vit7b16": _gram(200_000, 1000, [10_000, 20_000, 30_000], constant(3e-5),
                     checkpoint_every=1000, teacher_every=12_500, log_every=50),
}

# --------------------------------------------------------------------------- highres
# Resolution mixture of `dinov3_vit7b16_high_res_adapt.yaml`: (global, local, Gram) sizes with
# probabilities. Its local size 168 is not a multiple of 16 (its patch embedding drops the
# remainder); 160 here.
_RECIPE_RESOLUTIONS = [
    {"global_size": 512, "local_size": 112, "gram_size": 768, "weight": 0.3},
    {"global_size": 768, "local_size": 112, "gram_size": 1152, "weight": 0.3},
    {"global_size": 768, "local_size": 160, "gram_size": 1152, "weight": 0.3},
    {"global_size": 768, "local_size": 224, "gram_size": 1152, "weight": 0.05},
    {"global_size": 768, "local_size": 336, "gram_size": 1152, "weight": 0.05},
]


def _highres(steps: int, lr_end: float, ramp: int, batch: int, resolutions: list[Tree], checkpoint_every: int,
             teacher_every: int, log_every: int, img_size: int, checkpointing: str = "full") -> Tree:
    """Gram weight 1.5 with a fixed teacher, DINO local weight 0.5, teacher temperature 0.07, momentum
    0.999, WD 0.04, LR a half-cosine ramp 0 → end then constant, no last-layer freeze, KoLeo over
    groups of 16 samples, full activation checkpointing."""
    return {
        "phase": {"resolutions": resolutions, "gram_size_factor": 1.5},
        "backbone": {"img_size": img_size},
        "crops": {"gram_no_distortions": True},
        "gram": {"enabled": True, "weight": constant(1.5), "img_level": True, "normalize": True},
        "loss": {"teacher_temp": constant(0.07), "local_weight": constant(0.5), "koleo_group_size": 16},
        "optim": {"lr": schedule(0.0, 0.0, lr_end, cosine_steps=ramp), "weight_decay": constant(0.04),
                  "freeze_last_layer_steps": 0},
        "ema": {"momentum": constant(0.999)},
        "train": {"steps": steps, "batch_size": batch, "checkpoint_every": checkpoint_every,
                  "teacher_checkpoint_every": teacher_every, "log_every": log_every,
                  "activation_checkpointing": checkpointing},
    }


_HIGHRES_VIT = _highres(10_000, 1e-4, 3000, 8, _RECIPE_RESOLUTIONS, 250, 2500, 50, 768)
_HIGHRES: dict[str, Tree] = {
    "tiny": _highres(40, 1e-3, 10, 16, [
        {"global_size": 48, "local_size": 24, "weight": 0.5},  # Gram 72 = 1.5 x 48
        {"global_size": 64, "local_size": 32, "weight": 0.5},  # Gram 96
    ], checkpoint_every=20, teacher_every=20, log_every=5, img_size=64, checkpointing="none"),
    "vits16": _HIGHRES_VIT,
    "vitb16": _HIGHRES_VIT,
    "vitl16": _HIGHRES_VIT,
    # 30k steps, 8 per GPU (2048 over 256 GPUs), LR end 1.25e-5 (before scaling; 7.07e-5 after) at 10k
    "vit7b16": _highres(30_000, 1.25e-5, 10_000, 8, _RECIPE_RESOLUTIONS, 250, 2500, 50, 768),
}

# --------------------------------------------------------------------------- distill
# Several students from one frozen teacher (`dinov3_vitl16_lvd1689m_distilled.yaml`): LR a cosine
# ramp from 0 to its peak over half the run, then constant; WD 0.04; momentum 0.994 -> 1; no
# drop-path; no last-layer freeze; KoLeo per process; full activation checkpointing. The tiny
# preset keeps the tiny pretrain's short-run values (LR 2e-3 after 20 steps, momentum 0.95,
# teacher temperature 0.02, the temperature the tiny teacher was trained with).


def _distill(students: dict[str, str], steps: int, batch: int, lr_peak: float) -> Tree:
    return {
        "distill": {"students": {name: {"arch": arch} for name, arch in students.items()}},
        "crops": {"global_size": 224, "local_size": 96, "n_local": 8},
        "loss": {"teacher_temp": constant(0.07)},
        "optim": {"lr": schedule(0.0, 0.0, lr_peak, cosine_steps=steps // 2),
                  "weight_decay": constant(0.04), "freeze_last_layer_steps": 0},
        "ema": {"momentum": schedule(0.994, 0.994, 1.0)},
        "data": {"num_workers": 10},
        "train": {"steps": steps, "batch_size": batch, "checkpoint_every": 1250, "teacher_checkpoint_every": 0,
                  "log_every": 50, "compile": True, "activation_checkpointing": "full"},
    }


_DISTILL: dict[str, Tree] = {
    "tiny": {
        "distill": {"students": {"micro": {"arch": "micro", "layerscale_init": 1.0},
                                 "tiny": {"arch": "tiny", "layerscale_init": 1.0}}},
        "crops": {"global_size": 48, "local_size": 24, "n_local": 4},
        "loss": {"teacher_temp": constant(0.02)},
        "optim": {"lr": schedule(0.0, 2e-3, 2e-3, warmup_steps=20), "weight_decay": constant(0.04),
                  "layerwise_decay": 1.0, "freeze_last_layer_steps": 0},
        "ema": {"momentum": constant(0.95)},
        "data": {"num_workers": 0, "shuffle_buffer": 256},
        "train": {"steps": 200, "batch_size": 32, "checkpoint_every": 50, "teacher_checkpoint_every": 0,
                  "log_every": 10},
    },
    "vits16": _distill({"vits16": "vits16"}, 25_000, 64, 5e-5),
    "vitb16": _distill({"vits16": "vits16"}, 25_000, 64, 5e-5),
    "vitl16": _distill({"vits16": "vits16", "vitb16": "vitb16"}, 25_000, 64, 5e-5),
    "vit7b16": _distill({"vits16": "vits16", "vitsp16": "vitsp16", "vitb16": "vitb16", "vitl16": "vitl16"},
                        25_000, 8, 5e-5),
}

# --------------------------------------------------------------------------- align
# LiT text alignment on the frozen backbone (`dinov3/eval/text/configs/dinov3_vitl_text.yaml`): 2
# head blocks (LayerScale 1e-5, drop-path 0.3), a 24-layer text tower of width 1280, AdamW at LR 7e-4
# with 2k warmup steps then a cosine to 0 over 50k, weight decay 1e-4, betas (0.9, 0.99), 256 images
# per GPU (the recipe ran 32 GPUs), RandomResizedCrop 224 + flip. The paper aligns the distilled
# ViT-L; every size gets the same towers here.


def _align(steps: int, warmup: int, batch: int, size: int) -> Tree:
    return {
        "head": {"blocks": 2, "head_dim": 64, "layerscale_init": 1e-5, "drop_path_rate": 0.3},
        "text": {"width": 1280, "layers": 24, "heads": 20, "context_length": 77},
        "optim": {"lr": schedule(0.0, 7e-4, 0.0, warmup_steps=warmup), "weight_decay": 1e-4,
                  "betas": [0.9, 0.99]},
        "images": {"size": size, "augment": True},
        "data": {"num_workers": 10},
        "train": {"steps": steps, "batch_size": batch, "checkpoint_every": 2500, "log_every": 50,
                  "teacher_checkpoint_every": 0, "compile": True},
    }


_ALIGN: dict[str, Tree] = {
    # CPU in minutes: a 2-block head on the tiny backbone (width 96: 3 heads of 32), a 4-layer text
    # tower of width 128, no drop-path, the whole image (the procedural captions describe all of it),
    # a higher LR for a run of a few hundred steps (measurements in docs/presets.md).
    "tiny": {
        "head": {"blocks": 2, "head_dim": 32, "layerscale_init": 1e-5, "drop_path_rate": 0.0},
        "text": {"width": 128, "layers": 4, "heads": 4, "context_length": 32},
        "optim": {"lr": schedule(0.0, 1e-3, 0.0, warmup_steps=20), "weight_decay": 1e-4, "betas": [0.9, 0.99]},
        "images": {"augment": False},
        "train": {"steps": 200, "batch_size": 64, "checkpoint_every": 50, "log_every": 10,
                  "teacher_checkpoint_every": 0},
    },
    **{name: _align(50_000, 2000, 256, 224) for name in ("vits16", "vitb16", "vitl16")},
    "vit7b16": _align(50_000, 2000, 128, 256),
}

# --------------------------------------------------------------------------- benchmark
# The random-init baselines (`random:<arch>`) use the size's input side; tiny tensors run faster on
# one thread on a shared 2-core machine.
_BENCHMARK: dict[str, Tree] = {
    "tiny": {"random_img_size": 64, "threads": 1},
    **{name: {"random_img_size": 224} for name in ("vits16", "vitb16", "vitl16")},
    "vit7b16": {"random_img_size": 256},
}

# --------------------------------------------------------------------------- curate

_CURATE: dict[str, Tree] = {
    # CPU/CI: small chunks, colour-layout embeddings, a two-level tree.
    "tiny": {
        "ingest": {"chunk_size": 256},
        "images": {"min_side": 16},
        "cluster": {"points_per_leaf": 20, "branching": 5, "n_levels": 2, "n_iter": 20, "n_init": 3,
                    "resampling_steps": [1, 5]},
        "balance": {"target": 0.8},
        "split": {"eval_fraction": 0.1},
        "output": {"max_count": 1000, "max_bytes": 256 << 20},
    },
    # Millions of web images on a GPU node: DINOv3 ViT-S/16 embeddings (downloaded by timm, or a local
    # file via embed.weights), a 4-level tree in the shape of the web configuration of Vo et al. 2024
    # ("Automatic data curation for self-supervised learning", 1 / 10 / 10 / 10 resampling steps),
    # half the pool kept, ~1 GB shards.
    "large": {
        "ingest": {"chunk_size": 4096},
        "images": {"min_side": 64, "max_side": 1024},
        "dedup": {"ivf_min_size": 20_000, "nprobe": 16},
        "embed": {"backbone": "timm:vit_small_patch16_dinov3", "pretrained": True, "img_size": 224,
                  "batch_size": 256},
        "cluster": {"points_per_leaf": 50, "branching": 10, "n_levels": 4, "n_iter": 50, "n_init": 1,
                    "resampling_steps": [1, 10, 10, 10],
                    # split (approximate) k-means from 1000 clusters on a CPU: minutes instead of
                    # hours at 1M points (docs/curate.md, "Clustering at scale")
                    "method": "auto", "clusters_per_group": 50, "nprobe": 4, "approximate_min_clusters": 1000},
        "balance": {"target": 0.5},
        "split": {"eval_fraction": 0.01, "eval_max": 50_000},
        "output": {"max_count": 10_000, "max_bytes": 1 << 30},
    },
}

PRESETS: dict[str, dict[str, Tree]] = {
    "curate": _CURATE,
    "pretrain": _PRETRAIN,
    "adapt": _ADAPT,
    "anchor": _ANCHOR,
    "gram": _GRAM,
    "highres": _HIGHRES,
    "distill": _DISTILL,
    "align": _ALIGN,
    "benchmark": _BENCHMARK,
}


def stage_preset(stage: str, name: str) -> Tree:
    """A copy of the preset tree `name` of `stage`, with its name under `preset`; InputError (exit 2)
    naming `--preset` when the stage has no such preset."""
    table = PRESETS[stage]
    if name not in table:
        raise InputError("--preset", f"{name!r} is not a preset of the {stage} stage", "one of " + ", ".join(table))
    return {"preset": name, **copy.deepcopy(table[name])}
