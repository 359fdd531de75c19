"""Training-step throughput: images/s, where a step's time goes, and (on CUDA) bf16 MFU.

    python bench/train_step.py                      # CPU: tiny and ViT-S/16 presets
    python bench/train_step.py --device cuda        # + ViT-S/B/L in bf16 with MFU
    python bench/train_step.py --gram               # + the Gram step's overhead over a plain step

The data share is measured on the real batch source (shards → decode → multi-crop → collate) over
a procedural dataset; the model sections (teacher, student forward, losses, backward, optimizer)
on a fixed batch, timed by the training runtime's `section` hooks. FLOPs per step come from
torch.utils.flop_counter on one step; MFU = FLOPs / step time / peak bf16 FLOP/s of the device.
All ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from gramline.data.collate import CropBatch
from gramline.data.reader import open_dataset
from gramline.data.synthetic import write_synthetic_dataset
from gramline.train.data import batch_source
from gramline.train.distributed import DistEnv
from gramline.train.loop import LoopSettings, TrainLoop
from gramline.train.recipes.dino.config import DinoConfig, load_pretrain_config
from gramline.train.recipes.dino.recipe import DinoRecipe

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_trainer(config: DinoConfig, device: torch.device, out: Path, gram: bool) -> TrainLoop:
    env = DistEnv(0, 1, 0, device)
    gram_anchor = None
    if gram:
        from gramline.models.backbone import Backbone

        gram_anchor = Backbone(config.backbone)
    recipe = DinoRecipe(config, "bench", gram_anchor=gram_anchor, log=False)
    return TrainLoop(recipe, lambda step: iter(()), env, out, LoopSettings.of(config.train),
                     images_per_step=config.train.batch_size, log=False)


def one_batch(config: DinoConfig, dataset: Path) -> CropBatch:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    return next(batch_source(open_dataset(dataset), config, env)(0))


def time_data(config: DinoConfig, dataset: Path, steps: int) -> float:
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    iterator = batch_source(open_dataset(dataset), config, env)(0)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return (time.perf_counter() - start) / steps


def time_model(trainer: TrainLoop, batch: CropBatch, steps: int, warmup: int) -> tuple[float, dict[str, float]]:
    for _ in range(warmup):
        trainer.train_step(batch)
    trainer.runtime.section_times = {}
    if trainer.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    if trainer.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    sections = {k: v / steps for k, v in trainer.runtime.section_times.items()}
    trainer.runtime.section_times = None
    return per_step, sections


def count_flops(trainer: TrainLoop, batch: CropBatch) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(batch)
    return float(counter.get_total_flops())


def bench_preset(name: str, overrides: list[str], device: torch.device, dataset: Path, steps: int, warmup: int,
                 data_steps: int, gram: bool) -> dict:
    config = load_pretrain_config(name, overrides=overrides)
    batch = one_batch(config, dataset)
    data_s = time_data(config, dataset, data_steps) if data_steps else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(config, device, Path(tmp), gram=False)
        step_s, sections = time_model(trainer, batch, steps, warmup)
        flops = count_flops(trainer, batch)
        row = {"preset": name, "device": str(device), "batch": config.train.batch_size,
               "model_step_s": step_s, "images_per_s": config.train.batch_size / step_s,
               "data_step_s_per_worker": data_s, "sections_s": sections, "tflop_per_step": flops / 1e12}
        total = step_s + (0.0 if math.isnan(data_s) else data_s)
        row["share"] = {"data": None if math.isnan(data_s) else data_s / total,
                        **{k: v / total for k, v in sections.items()}}
        peak = peak_flops(device)
        if peak:
            row["mfu"] = flops / step_s / peak
        del trainer
        if gram:
            gram_config = load_pretrain_config(name, overrides=overrides + [
                f"crops.gram_size={2 * config.crops.global_size}", "gram.enabled=true", "gram.weight=1.0"])
            gram_batch = one_batch(gram_config, dataset)
            trainer = make_trainer(gram_config, device, Path(tmp), gram=True)
            gram_s, gram_sections = time_model(trainer, gram_batch, steps, warmup)
            row["gram_step_s"] = gram_s
            row["gram_overhead"] = gram_s / step_s
            row["gram_sections_s"] = gram_sections
            del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=None, help="per-device batch for the ViT presets")
    parser.add_argument("--gram", action="store_true", help="also time a Gram step (2x-resolution teacher)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny_data = Path(tmp) / "tiny"
        write_synthetic_dataset(tiny_data, n_train=256, n_eval=16, size=64, seed=0)
        big_data = Path(tmp) / "big"
        write_synthetic_dataset(big_data, n_train=128, n_eval=8, size=256, seed=0)
        presets = args.presets or (["tiny", "vits16"] if device.type == "cpu" else ["tiny", "vits16", "vitb16", "vitl16"])
        for name in presets:
            batch = args.batch or (8 if device.type == "cpu" else 64)
            overrides = ["data.num_workers=0"] + ([] if name == "tiny" else [f"train.batch_size={batch}", "train.compile=false"])
            dataset = tiny_data if name == "tiny" else big_data
            steps = args.steps if (name == "tiny" or device.type == "cuda") else max(2, args.steps // 2)
            row = bench_preset(name, overrides, device, dataset, steps, args.warmup,
                               data_steps=3 if device.type == "cpu" else 0, gram=args.gram)
            rows.append(row)
            share = " ".join(f"{k}={v:.0%}" for k, v in row["share"].items() if v is not None)
            mfu = f" MFU={row['mfu']:.1%}" if "mfu" in row else ""
            gram = f" gram-step x{row['gram_overhead']:.2f}" if "gram_overhead" in row else ""
            print(f"{name:7s} {row['device']:5s} batch {row['batch']:3d}: {row['images_per_s']:8.1f} img/s "
                  f"({row['model_step_s'] * 1000:.0f} ms/step, {row['tflop_per_step']:.2f} TFLOP/step){mfu}{gram} | "
                  f"{share}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
