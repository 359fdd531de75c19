"""Multi-crop augmentation speed per core, with PIL blur (ours) against torchvision blur.

    python bench/augment_speed.py [--rounds 5] [--min-seconds 1.0] [--json out.json]

Settings: the tiny preset on a 64x64 image, the ViT recipe (224 + 8x96) and the Gram phase
(224 + 8x96 + Gram crops 448) on a 500x375 image. Both blur variants run interleaved in the same
process on one thread, so their ratio is meaningful on a noisy shared machine; the median round is
reported. Also times the blur op alone at 224 and 96 px, and batch mask sampling + collation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from gramline.data.augment import BLUR_KERNEL, MultiCropAugment, pil_gaussian_blur
from gramline.data.collate import collate_crops
from gramline.data.config import CropsConfig, MaskingConfig
from gramline.train.recipes.dino.config import load_pretrain_config


class TorchvisionBlurAugment(MultiCropAugment):
    """The same pipeline with torchvision's 9x9 GaussianBlur, as the official code uses."""

    def _blur(self, img: Image.Image, sigma: float, scale: float) -> Image.Image:
        s = sigma * scale
        return TF.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL], [s, s])


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    low = (rng.random((height // 6 + 1, width // 6 + 1, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)


def rate(fn: Callable[[int], object], min_seconds: float) -> float:
    """Calls per second of fn(seed) over at least min_seconds (new seed each call)."""
    n, start = 0, time.perf_counter()
    while True:
        fn(n)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def bench_setting(name: str, crops: CropsConfig, image: Image.Image, rounds: int,
                  min_seconds: float) -> dict[str, object]:
    n_crops = 2 + crops.n_local + (2 if crops.gram_size else 0)
    variants = {"pil": MultiCropAugment(crops), "torchvision": TorchvisionBlurAugment(crops)}
    for aug in variants.values():  # warm up
        aug(image, 0)
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key, aug in variants.items():
            per_round[key].append(rate(partial(aug, image), min_seconds))
        print(f"  {name}: round {r + 1}/{rounds}  pil {per_round['pil'][-1]:.1f} img/s  "
              f"torchvision {per_round['torchvision'][-1]:.1f} img/s", flush=True)
    pil = statistics.median(per_round["pil"])
    tv = statistics.median(per_round["torchvision"])
    ratios = [p / t for p, t in zip(per_round["pil"], per_round["torchvision"])]
    return {
        "setting": name,
        "image": list(image.size),
        "crops_per_image": n_crops,
        "pil_images_per_s": round(pil, 2),
        "pil_crops_per_s": round(pil * n_crops, 1),
        "torchvision_images_per_s": round(tv, 2),
        "torchvision_crops_per_s": round(tv * n_crops, 1),
        "pil_over_torchvision_speedup": round(statistics.median(ratios), 2),
    }


def bench_blur_op(size: int, rounds: int, min_seconds: float) -> dict[str, object]:
    """The blur alone on one crop, σ drawn from the recipe's [0.1, 2]."""
    img = smooth_image(size, size)
    sigmas = np.random.default_rng(0).uniform(0.1, 2.0, 1024)
    pil: list[float] = []
    tv: list[float] = []
    for _ in range(rounds):  # interleaved, so load changes hit both alike
        pil.append(rate(lambda i: pil_gaussian_blur(img, sigmas[i % 1024]), min_seconds / 2))
        tv.append(rate(lambda i: TF.gaussian_blur(img, [BLUR_KERNEL] * 2, [sigmas[i % 1024]] * 2), min_seconds / 2))
    return {"setting": f"blur op on a {size}x{size} crop", "pil_blurs_per_s": round(statistics.median(pil), 1),
            "torchvision_blurs_per_s": round(statistics.median(tv), 1),
            "pil_over_torchvision_speedup": round(statistics.median(pil) / statistics.median(tv), 2)}


def bench_collate(min_seconds: float) -> dict[str, object]:
    cfg = load_pretrain_config("vits16")
    aug = MultiCropAugment(cfg.crops)
    items = [aug(smooth_image(500, 375, i), i) for i in range(32)]
    masks_rate = rate(lambda s: collate_crops(items, 16, MaskingConfig(), s), min_seconds)
    return {"setting": "collate 32 images (224+8x96), masks on 14x14", "batches_per_s": round(masks_rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers

    tiny = load_pretrain_config("tiny").crops
    vit = CropsConfig(global_size=224, local_size=96, n_local=8)
    settings = [
        ("tiny preset 48+4x24 on 64x64", tiny, smooth_image(64, 64)),
        ("ViT 224+8x96 on 500x375", vit, smooth_image(500, 375)),
        ("ViT 224+8x96 + Gram 448 on 500x375", vit.model_copy(update={"gram_size": 448}), smooth_image(500, 375)),
    ]
    results = []
    for name, crops, image in settings:
        print(f"{name} ...", flush=True)
        results.append(bench_setting(name, crops, image, args.rounds, args.min_seconds))
    for size in (224, 96):
        print(f"blur op {size} ...", flush=True)
        results.append(bench_blur_op(size, args.rounds, args.min_seconds))
    print("collate ...", flush=True)
    results.append(bench_collate(args.min_seconds))

    print("\nresults (1 thread, median of rounds):")
    for r in results:
        print(json.dumps(r))
    if args.json:
        from gramline.io import write_json_atomic

        write_json_atomic(args.json, {"torch_threads": 1, "results": results})


if __name__ == "__main__":
    main()
