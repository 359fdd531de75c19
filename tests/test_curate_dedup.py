"""Exact and near-duplicate detection: precision and recall on injected copies, decontamination,
and the bounded-memory search (a streamed IVF index) against the exact one.

Copies are made here with PIL (resize 40-80 %, JPEG q40-90 re-encode, crop 3-8 % per side, and
all three together; recolours); ground truth is which original each copy came from. Hard negatives:
the shapes world (many images share a layout: one object on a textured background).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gramline.curate.dedup import (
    ViewChunks,
    _build_index,
    contaminated,
    descriptor_views,
    exact_duplicates,
    near_duplicates,
)
from gramline.data.synthetic import render_sample
from gramline.errors import InputError

THRESHOLD = 0.91  # the default dedup.threshold


def scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random scene: a two-colour gradient, 3-8 filled shapes, a little noise."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    image = Image.fromarray(((c1 * (1 - t) + c2 * t) * np.ones((h, w, 1))).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)], fill=colour)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def make_copy(rng: np.random.Generator, image: Image.Image, kind: str) -> Image.Image:
    """resize | jpeg | crop | all: the transformations a near-duplicate detector must see through."""
    w, h = image.size
    if kind in ("crop", "all"):
        f = rng.uniform(0.03, 0.08, 4)
        image = image.crop((int(f[0] * w), int(f[1] * h), w - int(f[2] * w), h - int(f[3] * h)))
    if kind in ("resize", "all"):
        s = rng.uniform(0.4, 0.8)
        image = image.resize((max(8, int(image.width * s)), max(8, int(image.height * s))), Image.Resampling.BILINEAR)
    if kind in ("jpeg", "all", "resize", "crop"):
        image = jpeg_roundtrip(image, int(rng.integers(40, 90)))
    return image


def recolour(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Per-channel gain 0.8-1.2 and offset -20..20, then a JPEG re-encode."""
    arr = np.asarray(image).astype(np.float64) * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
    return jpeg_roundtrip(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), int(rng.integers(60, 90)))


def pair_precision_recall(component: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall over same-component pairs against same-origin pairs."""
    iu = np.triu_indices(len(truth), 1)
    pred = (component[:, None] == component[None, :])[iu]
    true = (truth[:, None] == truth[None, :])[iu]
    tp = int((pred & true).sum())
    return tp / max(int(pred.sum()), 1), tp / max(int(true.sum()), 1)


@pytest.fixture(scope="module")
def collection() -> tuple[list[Image.Image], np.ndarray]:
    """200 scenes + 100 shapes-world images, then 1-2 copies of every third original."""
    rng = np.random.default_rng(0)
    originals = [scene(rng, int(rng.integers(120, 260)), int(rng.integers(120, 260))) for _ in range(200)]
    originals += [Image.fromarray(render_sample(7, i, 128).image) for i in range(100)]
    images, origin = list(originals), list(range(len(originals)))
    kinds = ["resize", "jpeg", "crop", "all"]
    for n, i in enumerate(range(0, len(originals), 3)):
        for j in range(1 + n % 2):
            images.append(make_copy(rng, originals[i], kinds[(n + j) % 4]))
            origin.append(i)
    return images, np.asarray(origin)


@pytest.mark.parametrize(("backend", "ivf_min_size"), [("faiss", 10**9), ("torch", 10**9), ("auto", 1)])
def test_near_duplicates_precision_recall(collection, backend: str, ivf_min_size: int) -> None:
    """Exact faiss, exact torch, and faiss IVF (what "auto" uses for large collections)."""
    images, origin = collection
    views = np.stack([descriptor_views(im) for im in images])
    assert views.shape[1:] == (10, 384)
    area = np.array([im.width * im.height for im in images], dtype=np.float64)
    result = near_duplicates(views, THRESHOLD, priority=area, backend=backend, ivf_min_size=ivf_min_size)
    precision, recall = pair_precision_recall(result.component, origin)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # one image kept per component, and it is the largest (an original: copies are smaller or equal)
    kept = np.flatnonzero(result.kept)
    assert len(np.unique(result.component[kept])) == len(kept)
    n_originals = int(origin.max()) + 1
    assert abs(len(kept) - n_originals) <= 0.05 * n_originals
    for comp in np.unique(result.component):
        members = np.flatnonzero(result.component == comp)
        rep = members[result.kept[members]][0]
        assert area[rep] == area[members].max()


def test_faiss_and_torch_find_the_same_pairs(collection) -> None:
    images, _ = collection
    views = np.stack([descriptor_views(im) for im in images])
    a = near_duplicates(views, 0.7, backend="faiss")  # a low threshold: many edges, large components
    b = near_duplicates(views, 0.7, backend="torch")
    assert a.n_edges == b.n_edges > 0
    assert np.array_equal(a.representative, b.representative)


def test_exact_duplicates_keep_the_first() -> None:
    hashes = ["a", "b", "a", "c", "b", "a"]
    result = exact_duplicates(hashes)
    assert result.representative.tolist() == [0, 1, 0, 3, 1, 0]
    assert result.kept.tolist() == [True, True, False, True, False, False]


@pytest.mark.parametrize("ivf_min_size", [10**9, 1], ids=["exact", "bounded"])
def test_decontamination_flags_train_copies_of_eval_images(ivf_min_size: int) -> None:
    """Either side may be the indexed (smaller) one; the bounded index gives the same answer."""
    rng = np.random.default_rng(5)
    eval_images = [scene(rng, 160, 120) for _ in range(20)]
    train_images = [scene(rng, 160, 120) for _ in range(40)]
    copied = [3, 11, 17]  # train gets copies of these eval images
    kinds = ["crop", "resize", "all"]
    train_images += [make_copy(rng, eval_images[i], k) for i, k in zip(copied, kinds)]
    # a train image that is a larger version of an eval crop is caught from the other direction
    big = scene(rng, 200, 160)
    train_images.append(big)
    eval_images.append(big.crop((10, 8, 190, 152)))
    ev = np.stack([descriptor_views(im) for im in eval_images])
    tr = np.stack([descriptor_views(im) for im in train_images])
    hit = contaminated(tr, ev, 0.9, ivf_min_size=ivf_min_size)
    assert np.flatnonzero(hit).tolist() == [40, 41, 42, 43]
    # a train set smaller than the eval set: the train side is indexed instead
    hit = contaminated(tr[36:], ev, 0.9, ivf_min_size=ivf_min_size)
    assert np.flatnonzero(hit).tolist() == [4, 5, 6, 7]


def _write_chunks(root: Path, views: np.ndarray, chunk: int, rng: np.random.Generator) -> ViewChunks:
    """Per-chunk float16 `.desc.npy` files as ingest writes them, with random extra rows in each that
    the selection skips (as split skips images no longer alive): the selection is `views`, in order."""
    pieces = []
    for c, start in enumerate(range(0, len(views), chunk)):
        part = views[start:start + chunk].astype(np.float16)
        extra = rng.standard_normal((len(part) // 4, *part.shape[1:])).astype(np.float16)
        stored = np.concatenate([part, extra])
        order = rng.permutation(len(stored))
        np.save(root / f"chunk-{c:06d}.desc.npy", stored[order])
        position = np.argsort(order)[: len(part)]  # where each of `part` landed
        pieces.append((root / f"chunk-{c:06d}.desc.npy", position))
    return ViewChunks(pieces)


def test_bounded_search_finds_the_same_components_as_exact(collection, tmp_path: Path) -> None:
    """The streamed IVF-SQ8 index (what runs from `ivf_min_size` on; lowered to 1 here) with exact
    re-scoring of its candidates gives the components of the exact search, on crops, resizes,
    re-encodes and recolours read back from per-chunk descriptor files."""
    images, origin = collection
    rng = np.random.default_rng(3)
    recoloured = [recolour(rng, images[i]) for i in range(0, 300, 5)]
    images, origin = images + recoloured, np.concatenate([origin, origin[:300:5]])
    views = np.stack([descriptor_views(im) for im in images]).astype(np.float16)
    area = np.array([im.width * im.height for im in images], dtype=np.float64)
    exact = near_duplicates(views, THRESHOLD, priority=area, backend="torch", ivf_min_size=10**9)
    chunks = _write_chunks(tmp_path, views, 64, rng)
    assert _build_index(chunks, True, "auto", 1, 16).approximate  # the bounded path is what runs
    bounded = near_duplicates(chunks, THRESHOLD, priority=area, ivf_min_size=1, nprobe=16)
    assert bounded.n_edges == exact.n_edges > 0
    assert np.array_equal(bounded.representative, exact.representative)
    _, recall = pair_precision_recall(bounded.component, origin)
    assert recall >= 0.95, recall
    # the recoloured copies are found
    tail = np.arange(len(images) - len(recoloured), len(images))
    assert np.mean(bounded.component[tail] == bounded.component[origin[tail]]) >= 0.9


def test_descriptor_file_too_short_is_an_input_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "chunk-000000.desc.npy"
    np.save(path, np.zeros((3, 10, 384), np.float16))
    with pytest.raises(InputError, match=f"{path}.*3 descriptor rows but row 5"):
        ViewChunks([(path, np.array([0, 5]))])
    np.save(path, np.zeros((3, 384), np.float16))
    with pytest.raises(InputError, match=f"{path}.*shape"):
        ViewChunks([(path, None)])
