"""Speed of the shapes world and its shards, on one core; optionally, how learnable it is.

    python bench/synthetic_speed.py                 # render / encode / write / read rates
    python bench/synthetic_speed.py --learn 180     # + supervised tiny ViT for 180 s on CPU

Rates are images per second in this process (one core). The target for `render` at 64 px is
>= 500/s per core. `--learn` trains a small timm ViT (patch 8, width 96, depth 4) on labels and
prints eval accuracy over time, to check a small ViT learns the task in a few CPU minutes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _rate(fn, n: int) -> str:
    """Images per second of wall time and per CPU-second of this process (the per-core rate,
    which stays meaningful on a shared, loaded machine)."""
    fn(0)  # warm caches
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{n / wall:7.0f} images/s wall, {n / cpu:7.0f} images per CPU-second"


def speed(n: int) -> None:
    from gramline.data.reader import iter_samples, open_dataset
    from gramline.data.synthetic import encode_png, render_sample, write_synthetic_dataset

    for size in (32, 64, 128):
        print(f"render        {size:4d} px: {_rate(lambda i, s=size: render_sample(0, i, s), n)}")

    image = render_sample(0, 0, 64).image

    def render_encode(i: int) -> None:
        s = render_sample(0, i, 64)
        encode_png(s.image)
        encode_png(s.mask)

    print(f"render+png      64 px: {_rate(render_encode, n)}")
    print(f"png only        64 px: {_rate(lambda i: encode_png(image), n)} (image only)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ds"
        start, cpu = time.perf_counter(), time.process_time()
        write_synthetic_dataset(out, n_train=n, n_eval=n // 4, size=64, shard_max_count=500)
        total = n + n // 4
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"write dataset   64 px: {total / wall:7.0f} images/s wall, {total / cpu:7.0f} images per CPU-second"
              " (render, PNG, sha256, tar, index)")
        info = open_dataset(out)
        start = time.perf_counter()
        count = sum(1 for _ in iter_samples(info, "train"))
        print(f"iter_samples    64 px: {count / (time.perf_counter() - start):7.0f} images/s (decode + mask)")
        stream = info.stream("train", seed=0, mode="shuffle")
        start = time.perf_counter()
        count = sum(1 for _ in itertools.islice(stream, n))
        print(f"ShardStream     64 px: {count / (time.perf_counter() - start):7.0f} images/s (shuffled, decoded)")
        start = time.perf_counter()
        count = sum(1 for _ in itertools.islice(info.stream("train", seed=0, start_position=50 * n), 10))
        print(f"resume at {50 * n} samples: first 10 in {time.perf_counter() - start:.3f} s")


def learn(seconds: float, n_train: int, n_eval: int) -> None:
    import timm
    import torch
    import torch.nn.functional as F

    from gramline.data.synthetic import CLASSES, EVAL_INDEX_OFFSET, render_sample

    torch.manual_seed(0)

    def tensors(indices) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [render_sample(0, int(i), 64) for i in indices]
        x = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
        return (x - 0.5) / 0.25, torch.tensor([s.label for s in samples])

    start = time.perf_counter()
    x_train, y_train = tensors(range(n_train))
    x_eval, y_eval = tensors(range(EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + n_eval))
    print(f"learn: rendered {n_train} + {n_eval} images in {time.perf_counter() - start:.1f} s")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    start, step, batch, last_loss = time.perf_counter(), 0, 128, float("nan")
    print(f"learn: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{torch.get_num_threads()} threads", flush=True)
    next_report = 30.0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= next_report or elapsed >= seconds:
            model.eval()
            with torch.no_grad():
                acc = (model(x_eval).argmax(1) == y_eval).float().mean().item()
            model.train()
            print(f"learn: {elapsed:6.0f} s, step {step}, train loss {last_loss:.3f}, eval accuracy {acc:.3f} "
                  f"(chance {1 / len(CLASSES):.2f})", flush=True)
            next_report += 30.0
            if elapsed >= seconds:
                return
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100)  # linear warmup, then constant
        idx = torch.randint(0, n_train, (batch,))
        x = x_train[idx]
        flip = torch.rand(batch) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(model(x), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        last_loss = loss.item()
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images per measurement")
    parser.add_argument("--learn", type=float, default=0.0, help="seconds of supervised ViT training (0: skip)")
    parser.add_argument("--learn-train", type=int, default=10000)
    parser.add_argument("--learn-eval", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    speed(args.n)
    if args.learn > 0:
        learn(args.learn, args.learn_train, args.learn_eval)


if __name__ == "__main__":
    main()
