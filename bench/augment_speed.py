"""Multi-crop augmentation speed per core: gramline against a reference of the official recipe.

    python bench/augment_speed.py [--rounds 5] [--min-seconds 2.0] [--json out.json]

The reference is an independent torchvision (transforms.v2) composition written from the recipe's
description of `DataAugmentationDINO` (shared/reference/dinov3_recipe.md §4; the official code is
not used): per global crop RandomResizedCrop(224, scale (0.32, 1), bicubic), horizontal flip,
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, 9x9 Gaussian blur σ in [0.1, 2] with
p 1.0 (first) and 0.1 (second) and solarize p 0.2 (second); 8 local crops RandomResizedCrop(96,
scale (0.05, 0.32)) with blur p 0.5; ToImage + ToDtype + Normalize. Both decode the JPEG bytes
(the reference with PIL `Image.open(...).convert("RGB")`, as the official loader does).

Procedural JPEGs (smooth noise, shapes and grain; quality 90) at 500x375 and 4000x3000. Variants
run interleaved call by call in one process on one thread, so load from other processes hits all
alike; the ratio of each round is taken and the median reported. Also: gramline with deferred photometrics
(what the data workers do when the GPU finishes the crops), the per-op times of the photometric
ops against the PIL/torchvision ops used before, and on CUDA the GPU finishing rate. The ratios
are printed last.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, v2

from gramline.data import photometric as P
from gramline.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment
from gramline.data.collate import collate_crops
from gramline.data.config import CropsConfig, MaskingConfig

# ------------------------------------------------------------------------------ the reference


def reference_crop(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
    """One crop of the official recipe, from its description."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class ReferenceAugment:
    """2 global + n local crops of a decoded image, the official recipe's transforms (intended blur)."""

    def __init__(self, crops: CropsConfig) -> None:
        self.global_1 = reference_crop(crops.global_size, crops.global_scale, 1.0, 0.0)
        self.global_2 = reference_crop(crops.global_size, crops.global_scale, 0.1, 0.2)
        self.local = reference_crop(crops.local_size, crops.local_scale, 0.5, 0.0)
        self.n_local = crops.n_local

    def __call__(self, data: bytes) -> list[torch.Tensor]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.n_local)]


# ------------------------------------------------------------------------------ inputs


def procedural_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour noise, random shapes and grain: structure at every scale, like a photograph."""
    rng = np.random.default_rng(seed)
    low = (rng.random((max(2, height // 40), max(2, width // 40), 3)) * 255).astype(np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.02, 0.3) * width, rng.uniform(0.02, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(1.0, width / 1000)))
    grain = rng.normal(0, 6, (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------ timing


def rate(fn: Callable[[int], object], min_seconds: float) -> float:
    """Calls per second of fn(i) over at least min_seconds (new i each call)."""
    n, start = 0, time.perf_counter()
    while True:
        fn(n)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def interleaved(variants: dict[str, Callable[[int], object]], rounds: int, min_seconds: float,
                label: str) -> dict[str, list[float]]:
    """Per-round rates of each variant. The variants take turns call by call (each call timed on
    its own), so a change of load from other processes hits all of them alike; a round ends when
    every variant has run for min_seconds."""
    for fn in variants.values():
        fn(0)  # warm up
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    i = 0
    for r in range(rounds):
        spent = dict.fromkeys(variants, 0.0)
        calls = 0
        while min(spent.values()) < min_seconds:
            for key, fn in variants.items():
                start = time.perf_counter()
                fn(i)
                spent[key] += time.perf_counter() - start
            calls += 1
            i += 1
        for key in variants:
            per_round[key].append(calls / spent[key])
        shown = "  ".join(f"{k} {v[-1]:.2f}/s" for k, v in per_round.items())
        print(f"  {label}: round {r + 1}/{rounds}  {shown}", flush=True)
    return per_round


def median_ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 2)


def bench_images(name: str, crops: CropsConfig, images: list[bytes], rounds: int,
                 min_seconds: float) -> dict[str, object]:
    ours = MultiCropAugment(crops)
    deferred = MultiCropAugment(crops, defer_photometrics=True)
    reference = ReferenceAugment(crops)
    n = len(images)
    variants = {
        "gramline": lambda i: ours(images[i % n], seed=i),
        "gramline_deferred": lambda i: deferred(images[i % n], seed=i),
        "reference": lambda i: reference(images[i % n]),
    }
    torch.manual_seed(0)
    rates = interleaved(variants, rounds, min_seconds, name)
    return {
        "setting": name,
        "images_per_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "gramline_over_reference": median_ratio(rates["gramline"], rates["reference"]),
        "gramline_deferred_over_reference": median_ratio(rates["gramline_deferred"], rates["reference"]),
    }


def bench_ops(size: int, rounds: int, min_seconds: float) -> dict[str, object]:
    """Microseconds per photometric op on one crop: gramline's array op and the PIL/torchvision op
    the augmentation used before (through torchvision.transforms.functional on PIL images)."""
    pil = procedural_photo(size, size, 1)
    arr = np.asarray(pil)
    sigmas = [float(s) for s in np.random.default_rng(0).uniform(0.1, 2.0, 1024)]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def before_to_tensor(_: int) -> torch.Tensor:
        return (torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div_(255) - mean) / std

    def after_to_tensor(_: int) -> torch.Tensor:
        x = torch.from_numpy(arr[None]).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        return x.mul_(1 / (255 * std)).sub_(mean / std)

    pairs: dict[str, tuple[Callable[[int], object], Callable[[int], object]]] = {
        "resize (bicubic, from a box)": (
            lambda i: pil.resize((size, size), Image.Resampling.BICUBIC, box=(3, 5, size * 0.8, size * 0.9)),
            lambda i: pil.resize((size, size), Image.Resampling.BICUBIC, box=(3, 5, size * 0.8, size * 0.9))),
        "brightness": (lambda i: TF.adjust_brightness(pil, 1.2), lambda i: P.adjust_brightness(arr, 1.2)),
        "contrast": (lambda i: TF.adjust_contrast(pil, 1.2), lambda i: P.adjust_contrast(arr, 1.2)),
        "saturation": (lambda i: TF.adjust_saturation(pil, 1.1), lambda i: P.adjust_saturation(arr, 1.1)),
        "hue": (lambda i: TF.adjust_hue(pil, 0.05), lambda i: P.adjust_hue(arr, 0.05)),
        "grayscale": (lambda i: pil.convert("L").convert("RGB"), lambda i: P.to_grayscale(arr)),
        "blur (PIL before)": (lambda i: pil.filter(ImageFilter.GaussianBlur(sigmas[i % 1024])),
                              lambda i: P.gaussian_blur(arr, sigmas[i % 1024])),
        "solarize": (lambda i: ImageOps.solarize(pil, 128), lambda i: P.solarize(arr)),
        "to tensor + normalise": (before_to_tensor, after_to_tensor),
    }
    out: dict[str, object] = {}
    for op, (before, after) in pairs.items():
        rates = interleaved({"before": before, "after": after}, rounds, min_seconds / 4, f"{op} {size}px")
        out[op] = {"before_us": round(1e6 / statistics.median(rates["before"]), 1),
                   "after_us": round(1e6 / statistics.median(rates["after"]), 1),
                   "speedup": median_ratio(rates["after"], rates["before"])}
    return {"setting": f"photometric ops on a {size}x{size} crop", "ops": out}


def bench_device(crops: CropsConfig, images: list[bytes], min_seconds: float) -> dict[str, object]:
    """Crops per second of the deferred photometrics finished on the GPU (batch of 64 images)."""
    aug = MultiCropAugment(crops, defer_photometrics=True)
    items = [aug(images[i % len(images)], seed=i) for i in range(64)]
    batch = collate_crops(items, 16, MaskingConfig(), seed=0)
    batch.to("cuda")
    torch.cuda.synchronize()

    def finish(_: int) -> None:
        batch.to("cuda")
        torch.cuda.synchronize()

    per_s = rate(finish, min_seconds)
    return {"setting": "GPU photometrics, 64 images 224+8x96", "crops_per_s": round(per_s * 64 * (2 + crops.n_local))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--skip-ops", action="store_true", help="only the whole-image comparison")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers

    vit = CropsConfig(global_size=224, local_size=96, n_local=8)
    print("making JPEGs ...", flush=True)
    small = [jpeg(procedural_photo(500, 375, s)) for s in range(16)]
    large = [jpeg(procedural_photo(4000, 3000, s)) for s in range(2)]
    results = []
    for name, images in (("2x224+8x96 on 500x375 JPEGs", small), ("2x224+8x96 on 4000x3000 JPEGs", large)):
        print(f"{name} ...", flush=True)
        results.append(bench_images(name, vit, images, args.rounds, args.min_seconds))
    if not args.skip_ops:
        for size in (224, 96):
            results.append(bench_ops(size, args.rounds, args.min_seconds))
    if torch.cuda.is_available():
        results.append(bench_device(vit, small, args.min_seconds))
    collate_items = [MultiCropAugment(vit)(small[i % len(small)], seed=i) for i in range(32)]
    results.append({"setting": "collate 32 images (224+8x96), masks on 14x14", "batches_per_s": round(
        rate(lambda s: collate_crops(collate_items, 16, MaskingConfig(), s), args.min_seconds / 2), 1)})

    print("\nresults (1 thread, median of rounds):")
    for r in results:
        print(json.dumps(r))
    print("\nratios (gramline / reference, per core, interleaved in this run):")
    for r in results:
        if "gramline_over_reference" in r:
            print(f"  {r['setting']}: {r['gramline_over_reference']}x "
                  f"(deferred photometrics: {r['gramline_deferred_over_reference']}x)")
    if args.json:
        from gramline.io import write_json_atomic

        write_json_atomic(args.json, {"torch_threads": 1, "results": results})


if __name__ == "__main__":
    main()
