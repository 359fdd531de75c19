"""Curate-stage benchmark: validate+hash throughput, near-dup search, hierarchical vs flat k-means.

    python bench/curate.py [--kmeans-n 100000] [--dim 384] [--neardup-n 10000] [--ivf-n 100000]

Prints, in one run on this machine:
1. ingest work per image (full decode, EXIF, RGB, pixel + file sha256, copy descriptor, colour
   layout) in images/s on one core, and with one thread per core;
2. near-duplicate search (every view of every image against all whole views, cosine >= 0.91):
   faiss exact vs torch matmul at --neardup-n images, and faiss IVF at --ivf-n images;
3. hierarchical k-means with resampling (gramline.curate.cluster) on --kmeans-n x --dim
   embeddings vs one flat faiss.Kmeans with as many clusters as its lowest level, same data and
   iterations, plus balanced sampling.
Each timing is given as wall seconds and process CPU seconds (all threads). On a shared, loaded
VM the wall time depends on the other tenants; CPU time, and per-core rates computed from it, much
less so. Compare numbers within one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch  # noqa: F401  (imported before any timing)
from PIL import Image

from gramline.curate.cluster import balanced_sample, hierarchical_kmeans
from gramline.curate.dedup import DESCRIPTOR_DIM, descriptor_views, near_duplicates
from gramline.curate.embed import colour_layout
from gramline.curate.validate import ValidImage, validate_image


class Timer:
    wall: float = 0.0
    cpu: float = 0.0

    def __str__(self) -> str:
        return f"{self.wall:.1f} s wall, {self.cpu:.1f} s CPU"


@contextmanager
def timed() -> Iterator[Timer]:
    """Wall and process CPU time (summed over threads) of the block."""
    timer = Timer()
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield timer
    finally:
        timer.wall, timer.cpu = time.perf_counter() - w0, time.process_time() - c0


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth noise at several scales: JPEG sizes close to photos' (no flat areas)."""
    out = np.zeros((h, w, 3), np.float32)
    for scale, amp in ((8, 90), (32, 50), (128, 25)):
        small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale), 3)).astype(np.float32)
        layer = np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                          for c in range(3)], axis=-1)
        out += amp * layer
    return Image.fromarray(np.clip(out + 128, 0, 255).astype(np.uint8))


def _ingest_one(data: bytes) -> None:
    result = validate_image(data)
    assert isinstance(result, ValidImage)
    descriptor_views(result.image)
    colour_layout(result.image)


def bench_validate(n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        image = _photo(rng, 500, 375)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90) if i % 4 else image.save(buf, format="PNG")
        files.append(buf.getvalue())
    mean_kb = np.mean([len(f) for f in files]) / 1024
    with timed() as one:
        for data in files:
            _ingest_one(data)
    cores = os.cpu_count() or 1
    with timed() as many, concurrent.futures.ThreadPoolExecutor(cores) as pool:
        list(pool.map(_ingest_one, files))
    print(f"validate+hash+describe, {n} images 500x375 (3/4 JPEG q90, 1/4 PNG; mean {mean_kb:.0f} KB):")
    print(f"  1 thread: {n / one.cpu:.0f} images per CPU-second = per core ({n / one.wall:.0f} images/s wall)")
    print(f"  {cores} threads: {n / many.wall:.0f} images/s wall, {n / many.cpu:.0f} images per CPU-second")


def _clustered(n: int, dim: int, n_concepts: int, rng: np.random.Generator) -> np.ndarray:
    """L2-normalised embeddings around Zipf-sized concepts (a skewed web-like pool)."""
    weights = 1.0 / np.arange(1, n_concepts + 1)
    sizes = rng.multinomial(n, weights / weights.sum())
    centres = rng.normal(size=(n_concepts, dim)).astype(np.float32)
    x = np.repeat(centres, sizes, axis=0) + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)]


def _descriptor_pool(n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """[n, 10, 384] stand-in descriptors: random unit whole views, sub-views near them, and 10%
    of images near-copies of another (so the search has real matches to return)."""
    base = rng.normal(size=(n, 1, DESCRIPTOR_DIM)).astype(np.float32)
    order = rng.permutation(n)
    m = n // 10
    src, dst = order[:m], order[m:2 * m]
    base[dst] = base[src] + 0.15 * rng.normal(size=(m, 1, DESCRIPTOR_DIM)).astype(np.float32)
    views = base + 0.2 * rng.normal(size=(n, 10, DESCRIPTOR_DIM)).astype(np.float32)
    views[:, 0] = base[:, 0]
    views /= np.linalg.norm(views, axis=2, keepdims=True)
    return views.astype(np.float16), m


def bench_neardup(n_flat: int, n_ivf: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    views, injected = _descriptor_pool(n_flat, rng)
    print(f"near-dup search, {n_flat} images x 10 views x {DESCRIPTOR_DIM}-d, cosine >= 0.91 "
          f"({injected} injected copies):")
    for backend in ("faiss", "torch"):
        with timed() as t:
            result = near_duplicates(views, 0.91, backend=backend, ivf_min_size=10**12)
        print(f"  {backend:5s} exact: {t}, {int((~result.kept).sum())} duplicates found")
    views, injected = _descriptor_pool(n_ivf, rng)
    with timed() as t:
        result = near_duplicates(views, 0.91, backend="faiss", ivf_min_size=1, nprobe=16)
    print(f"  faiss IVF (nlist 4*sqrt(n), nprobe 16), {n_ivf} images ({injected} injected copies): {t}, "
          f"{int((~result.kept).sum())} duplicates found")


def bench_kmeans(n: int, dim: int, n_iter: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = _clustered(n, dim, 500, rng)
    levels = [max(2, n // 100), max(2, n // 1000), max(2, n // 10000)]
    steps = [1, 5, 5]
    print(f"k-means on {n} x {dim} (Zipf concepts), {n_iter} Lloyd iterations, {faiss.omp_get_max_threads()} threads:")
    with timed() as hier:
        tree = hierarchical_kmeans(x, levels, n_iter, steps, seed=seed, log=False)
    with timed() as sampling:
        chosen = balanced_sample(tree, n // 2, seed=seed)
    with timed() as flat_t:
        flat = faiss.Kmeans(dim, levels[0], niter=n_iter, seed=seed, max_points_per_centroid=n, verbose=False)
        flat.train(x)
        flat.index.search(x, 1)
    print(f"  hierarchical levels {levels}, resampling steps {steps}: {hier} "
          f"(+ balanced sampling of {len(chosen)}: {sampling.wall:.2f} s)")
    print(f"  flat faiss.Kmeans k={levels[0]} (+ final assignment): {flat_t}")
    print(f"  hierarchical / flat: {hier.wall / flat_t.wall:.2f} (wall), {hier.cpu / flat_t.cpu:.2f} (CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--validate-n", type=int, default=200)
    parser.add_argument("--neardup-n", type=int, default=10_000)
    parser.add_argument("--ivf-n", type=int, default=100_000)
    parser.add_argument("--kmeans-n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    bench_validate(args.validate_n)
    bench_neardup(args.neardup_n, args.ivf_n)
    bench_kmeans(args.kmeans_n, args.dim, args.iters)


if __name__ == "__main__":
    main()
