"""Memory plan of the pretrain presets: what a training step holds per GPU and the largest per-GPU
batch that fits.

    python bench/memory_plan.py                                   # vits16, vitl16, vit7b16 on 8 x 80 GB
    python bench/memory_plan.py --preset vit7b16 --gpus 8 --nodes 32
    python bench/memory_plan.py --preset vitl16 --gpus 8 --device cuda   # activations measured on the GPU

Per row: the student's parameters; the model state per GPU (fp32 student, gradients, AdamW moments,
EMA teacher; sharded under FSDP2 plus the gathered units, replicated under DDP); the activations
of the student step per image (bf16 autocast), measured as gramline.train.memory describes, for
each activation checkpointing mode (the preset's own marked *); the largest per-GPU batch that fits
90% of the GPU's memory, and the preset's batch against it. The distribution mode is the preset's
(`auto` is DDP) unless --distributed says otherwise.
"""

from __future__ import annotations

import argparse

import torch

from gramline.train.memory import GIB, ModelSizes, largest_batch, measure_activations, state_bytes
from gramline.train.recipes.dino.config import load_pretrain_config

MODES = ("none", "selective", "full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["vits16", "vitl16", "vit7b16"])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--distributed", choices=["ddp", "fsdp"], default=None, help="default: the preset's")
    parser.add_argument("--checkpointing", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cpu", help="cuda: measure activations with real tensors on the GPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    world = args.gpus * args.nodes
    memory = args.gpu_memory_gb * GIB

    print(f"# {world} GPUs ({args.nodes} x {args.gpus}) of {args.gpu_memory_gb:g} GB; activations measured on "
          f"{'the GPU' if device.type == 'cuda' else 'CPU (fake tensors, allocations tracked)'}, bf16 autocast")
    header = ("preset", "params M", "mode", "ckpt", "state GB/GPU", "act GB/img", "measured at", "max batch/GPU",
              "preset batch")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset in args.preset:
        config = load_pretrain_config(preset)
        fsdp = (args.distributed or config.train.distributed) == "fsdp"
        sizes = ModelSizes.of(config)
        state = state_bytes(sizes, world, fsdp, gram_teacher=config.gram.enabled)
        for mode in args.checkpointing:
            act = measure_activations(config, mode, device)
            fits = largest_batch(memory, state, act)
            mark = "*" if mode == config.train.activation_checkpointing else ""
            depths = "full depth" if len(act.depths) == 1 else f"{act.depths[0]}+{act.depths[1]} blocks"
            batch = config.train.batch_size
            print(f"| {preset} | {sizes.student / 1e6:,.0f} | {'fsdp' if fsdp else 'ddp'} | {mode}{mark} | "
                  f"{state / GIB:.1f} | {act.per_image / GIB:.2f} | {depths} | {fits} | "
                  f"{batch} {'fits' if batch <= fits else 'DOES NOT FIT'} |", flush=True)


if __name__ == "__main__":
    main()
