"""The alignment recipe: a vision head and a text tower learn a shared space on a frozen backbone
(LiT; DINOv3 paper §6, official `dinov3/eval/text/train_dinotxt.py`).

Each step the frozen backbone (eval mode, no gradients) turns the images into last-layer tokens;
the trainable `TextAlignment` (gramline.models.text) embeds them and the captions, and the
contrastive loss over the global batch (gramline.losses.contrastive) is back-propagated into the
head, the text tower and the logit scale, which is clamped to [0, loss.max_logit_scale] after
every step. AdamW: warmup then cosine LR, one weight decay, none for parameters with fewer than 2
dimensions. The backbone is never handed to the optimizer, and its weights are exported as loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramline.artifacts import build_manifest, write_manifest
from gramline.config import dump_config
from gramline.losses.contrastive import contrastive_loss
from gramline.models.io import BACKBONE_FILE, save_weights
from gramline.models.text import MANIFEST_KEY, TEXT_FILE, TextAlignment, Tokenizer
from gramline.train import distributed
from gramline.train.checkpoint import Stateful, Upgrade
from gramline.train.optimizer import OptimizerValues, ScheduledAdamW
from gramline.train.recipe import StepValues
from gramline.train.recipes.align.config import AlignConfig
from gramline.train.recipes.align.data import CaptionBatch
from gramline.train.runtime import Runtime
from gramline.train.schedules import Timeline
from gramline.train.teachers import ModulePart

BACKBONE_ENTRIES = ("timm", "arch", "embed_dim", "patch_size", "img_size")  # copied from the backbone's manifest


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Decayed (2-d and up) and not decayed (norms, biases, the logit scale, every 1-d or 0-d tensor)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    plain = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": params, "lr_mult": 1.0, "wd_mult": wd, "is_last_layer": False}
            for params, wd in ((decay, 1.0), (plain, 0.0)) if params]


class AlignRecipe:
    name = "align"
    loss_names: Sequence[str] = ("contrastive",)
    progress_keys: Sequence[str] = ("total", "logit_scale", "batch_top1")
    upgrade: Upgrade | None = None  # no earlier checkpoint layout

    def __init__(self, config: AlignConfig, backbone: nn.Module, backbone_manifest: Mapping[str, Any],
                 tokenizer: Tokenizer) -> None:
        """`backbone`: the frozen timm ViT (gramline.models.io.load_backbone); its manifest gives the
        exported Model's timm entry."""
        self.config = config
        self.backbone: Any = backbone.eval().requires_grad_(False)  # timm's attributes are untyped
        self.backbone_manifest = dict(backbone_manifest)
        self.tokenizer = tokenizer

    def build(self, runtime: Runtime) -> None:
        cfg, env = self.config, runtime.env
        self.runtime = runtime
        self.backbone.to(runtime.device)
        vit: Any = self.backbone
        self.alignment = TextAlignment(int(vit.embed_dim), int(vit.num_prefix_tokens), cfg.head, cfg.text,
                                       cfg.loss.init_logit_scale).to(runtime.device)
        if cfg.train.compile:
            for block in [*self.alignment.head.blocks, *self.alignment.text.transformer.resblocks]:
                block.compile()
        self.forward: nn.Module = self.alignment
        if env.world_size > 1:
            self.forward = nn.parallel.DistributedDataParallel(
                self.alignment, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.optimizer = ScheduledAdamW(self.alignment, param_groups(self.alignment), cfg.optim.betas,
                                        cfg.optim.clip_grad, {"alignment": self.alignment}, runtime.device)
        self.lr = Timeline.of(cfg.optim.lr, cfg.train.steps)
        self.alignment.train()

    def parts(self) -> dict[str, Stateful]:
        return {"alignment": ModulePart(self.alignment), "optimizer": self.optimizer}

    def optimizers(self) -> dict[str, ScheduledAdamW]:
        return {"alignment": self.optimizer}

    def last_step(self) -> int:
        return self.config.train.steps

    def values_at(self, step: int) -> StepValues:
        return StepValues({"alignment": OptimizerValues(self.lr.at(step), self.config.optim.weight_decay)})

    def forward_backward(self, batch: CaptionBatch, values: StepValues) -> tuple[Tensor, dict[str, float]]:
        rt = self.runtime
        batch = batch.to(rt.device)
        with rt.section("backbone"), torch.no_grad(), rt.autocast():
            tokens = self.backbone.forward_features(batch.images)
        with rt.section("towers"), rt.autocast():
            image, text = self.forward(tokens, batch.tokens)
        with rt.section("losses"):
            loss = contrastive_loss(image, text, self.alignment.logit_scale)
            with torch.no_grad():
                cosine = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
                top1 = cosine.argmax(dim=1).eq(torch.arange(len(image), device=image.device)).float().mean()
            logged = distributed.all_reduce_mean(torch.stack([loss.detach(), top1]))  # one NaN decision everywhere
        total = float(logged[0])
        if math.isfinite(total):
            with rt.section("backward"):
                loss.backward()
        return loss.detach(), {"total": total, "contrastive": total, "batch_top1": float(logged[1]),
                               "logit_scale": float(self.alignment.logit_scale.detach().exp())}

    def after_optimizer_step(self, step: int, values: StepValues) -> None:
        with torch.no_grad():
            self.alignment.logit_scale.clamp_(0.0, self.config.loss.max_logit_scale)

    def export(self, directory: Path, step: int, metrics: Mapping[str, float],
               manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """On the main rank: the backbone as loaded, the alignment's weights, then the manifest."""
        if not self.runtime.env.is_main:
            return None
        source = self.backbone_manifest
        save_weights(directory / BACKBONE_FILE, self.backbone.state_dict(),
                     {"format": "pt", "timm_model": source["timm"]["name"]})
        save_weights(directory / TEXT_FILE, self.alignment.state_dict(), {"format": "pt"})
        record = dict(manifest)
        tower = {"head": self.config.head.model_dump(), "text": self.config.text.model_dump(),
                 "embed_dim": self.alignment.embed_dim, "tokenizer": self.tokenizer.identity(),
                 "logit_scale": float(self.alignment.logit_scale.detach().exp()), "file": TEXT_FILE,
                 **record.pop("text_tower", {})}
        out = build_manifest("Model", "align", config=dump_config(self.config), inputs=list(record.pop("inputs", [])),
                             counts={"step": step}, metrics=dict(metrics), step=step,
                             **{k: source[k] for k in BACKBONE_ENTRIES if k in source},
                             **{MANIFEST_KEY: tower}, **record)
        write_manifest(directory, out)
        return out
