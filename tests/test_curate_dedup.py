"""Exact and near-duplicate detection: precision and recall on injected copies, decontamination.

Copies are made here with PIL (resize 40-80 %, JPEG q40-90 re-encode, crop 3-8 % per side, and
all three together); ground truth is which original each copy came from. Hard negatives: the
shapes world (many images share a layout: one object on a textured background).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gramline.curate.dedup import contaminated, descriptor_views, exact_duplicates, near_duplicates
from gramline.data.synthetic import render_sample

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


def test_decontamination_flags_train_copies_of_eval_images() -> None:
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
    hit = contaminated(tr, ev, 0.9)
    assert np.flatnonzero(hit).tolist() == [40, 41, 42, 43]
