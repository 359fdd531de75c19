"""The procedural "shapes world": labelled, segmented, captioned images with no download.

Each image holds 1-4 filled shapes on a textured background. The label is the class of the
largest object (the "main" object, always drawn last and fully inside the image); the mask gives
every object's class (class c -> c + 1, 0 = background, later objects on top); the caption names
every visible object. Classes differ by shape only: colour, size, rotation, aspect and position
are drawn independently of the class, and all shapes are scaled to the same area per unit size.

`render_sample(seed, index, size)` is a pure function: the same arguments give identical bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gramline.errors import InputError
from gramline.progress import Progress

CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent", "heart", "arrow",
)
EVAL_INDEX_OFFSET = 1_000_000_000
"""Eval samples use render indices from here on, so they never repeat a train image."""

# Named colours: (name, RGB). Objects get one of these, jittered a little.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (215, 35, 35)), ("green", (35, 160, 55)), ("blue", (35, 75, 215)),
    ("yellow", (240, 210, 35)), ("orange", (245, 125, 25)), ("purple", (135, 50, 185)),
    ("pink", (240, 115, 180)), ("cyan", (35, 200, 210)), ("white", (248, 248, 248)),
    ("black", (20, 20, 20)), ("brown", (125, 75, 35)),
)
_PALETTE = np.array([rgb for _, rgb in COLOURS], dtype=np.float32)
TEXTURES = ("plain", "striped", "checkered", "noisy", "gradient", "dotted")
MAIN_SIZE = (0.40, 0.70)  # main object's equal-area diameter, as a fraction of the image side
SECONDARY_SCALE = (0.20, 0.45)  # other objects' size relative to the main object
N_OBJECTS = (1, 4)  # objects per image, inclusive
BACKGROUND_CONTRAST = (35.0, 70.0)  # grey-level difference between a texture's two colours
_UNIT_AREA = math.pi * 0.5**2  # every shape has this area at unit size (diameter-1 disc)


@dataclass
class SyntheticSample:
    image: np.ndarray  # uint8 [H, W, 3]
    label: int  # class of the largest object
    mask: np.ndarray  # uint8 [H, W]; 0 = background, class c -> c + 1
    caption: str
    main_colour: str  # colour name of the largest object (drawn independently of its class)
    texture: str  # background texture name


def _regular(n: int, phase: float = 0.0, radius: float = 1.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _heart(n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1) / 16.0
    return pts - pts.mean(axis=0)


def _shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _unit_shapes() -> list[list[tuple[np.ndarray, int]]]:
    """Each class as polygons to fill (1) or cut out (0), centred, scaled to area _UNIT_AREA."""
    w = 0.3
    cross = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                      (-1, w), (-1, -w), (-w, -w)], dtype=np.float64)
    arrow = np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22),
                      (-1, 0.22)], dtype=np.float64)
    circle = _regular(32)
    shapes: dict[str, list[tuple[np.ndarray, int]]] = {
        "circle": [(circle, 1)],
        "square": [(_regular(4, np.pi / 4), 1)],
        "triangle": [(_regular(3, -np.pi / 2), 1)],
        "star": [(_star(), 1)],
        "ring": [(circle, 1), (_regular(32, radius=0.58), 0)],
        "cross": [(cross, 1)],
        "hexagon": [(_regular(6), 1)],
        "crescent": [(circle, 1), (_regular(32, radius=0.85) + np.array([0.42, 0.0]), 0)],
        "heart": [(_heart(), 1)],
        "arrow": [(arrow, 1)],
    }
    crescent_area = _crescent_area(1.0, 0.85, 0.42)
    out = []
    for name in CLASSES:
        ops = shapes[name]
        area = crescent_area if name == "crescent" else sum(_shoelace(p) * (1 if f else -1) for p, f in ops)
        k = math.sqrt(_UNIT_AREA / area)
        out.append([(p * k, f) for p, f in ops])
    return out


def _crescent_area(r1: float, r2: float, d: float) -> float:
    """Area of a disc of radius r1 minus its overlap with a disc of radius r2 at distance d."""
    a1 = r1 * r1 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    a2 = r2 * r2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    tri = 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))
    return math.pi * r1 * r1 - (a1 + a2 - tri)


_SHAPES = _unit_shapes()
_EXTENT = [max(float(np.hypot(p[:, 0], p[:, 1]).max()) for p, f in ops if f) for ops in _SHAPES]
"""Largest distance from the centre to the outline, per class, at unit size."""


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)  # xs, ys in (0, 1)


def _muted(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(70, 190)
    return np.clip(grey + rng.normal(0, 22, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A float32 [size, size, 3] textured background in muted colours, and its texture's name."""
    xs, ys = _grid(size)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    c1 = _muted(rng)
    c2 = np.clip(c1 + rng.choice([-1.0, 1.0]) * rng.uniform(*BACKGROUND_CONTRAST), 0, 255).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    if texture == "plain":
        return np.broadcast_to(c1, (size, size, 3)).copy(), texture
    u = xs * cos + ys * sin
    if texture == "gradient":
        w = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return c1 + (c2 - c1) * w[..., None], texture
    if texture == "noisy":  # blotchy low-resolution noise plus fine grain
        cells = max(2, size // 8)
        low = rng.normal(0, 1, (cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.Resampling.BILINEAR))
        grain = rng.normal(0, 0.35, (size, size)).astype(np.float32)
        w = np.clip(0.5 + 0.35 * (up + grain), 0, 1)
        return c1 + (c2 - c1) * w[..., None], texture
    if texture == "striped":
        period = rng.uniform(0.08, 0.25)
        t = ((u / period + rng.uniform()) % 1.0) < 0.5
    else:
        v = ys * cos - xs * sin
        if texture == "checkered":
            period = rng.uniform(0.12, 0.3)
            t = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
        else:  # dotted
            period = rng.uniform(0.1, 0.22)
            du = (u / period) % 1.0 - 0.5
            dv = (v / period) % 1.0 - 0.5
            t = du * du + dv * dv < 0.09
    return np.where(t[..., None], c1, c2), texture


def _object_mask(cls: int, cx: float, cy: float, scale: float, angle: float, aspect: float,
                 size: int) -> np.ndarray:
    """Rasterise one object (unit shape `cls` scaled to `scale` px diameter) as a bool mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.array([aspect, 1.0 / aspect])
    for poly, fill in _SHAPES[cls]:
        pts = (poly * stretch * scale) @ rot.T + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    return np.asarray(canvas) > 0


def _contrasting_colours(background_mean: np.ndarray) -> np.ndarray:
    """Palette indices that stand out from the background's mean colour."""
    dist = ((_PALETTE - background_mean) ** 2).sum(axis=1)
    candidates = np.flatnonzero(dist > 90.0**2)
    return candidates if candidates.size else np.argsort(dist)[-3:]


def _size_word(main: bool, frac: float) -> str:
    if main:
        return "large" if frac >= 0.55 else "medium"
    return "small" if frac >= 0.12 else "tiny"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def render_sample(seed: int, index: int, size: int = 64, colour_class_prior: float = 0.0) -> SyntheticSample:
    """Render sample `index` of the shapes world `seed` at `size` x `size` pixels.

    colour_class_prior (default 0: colour independent of class) is the probability that the main
    object takes its class's own colour (COLOURS[class]) when that colour stands out from the
    background, as bananas tend to be yellow: a cue that features which learn colour can use. At 0
    the random stream, and so every image, is the same as without the option.
    """
    if size < 16:
        raise InputError("size", f"is {size}", "at least 16 pixels")
    if not 0.0 <= colour_class_prior <= 1.0:
        raise InputError("colour_class_prior", f"is {colour_class_prior}", "a probability in [0, 1]")
    rng = np.random.default_rng([seed, index])
    bg, texture = _background(rng, size)
    colours = _contrasting_colours(bg[::4, ::4].mean(axis=(0, 1)))
    n_objects = int(rng.integers(N_OBJECTS[0], N_OBJECTS[1] + 1))
    main_cls = int(rng.integers(len(CLASSES)))
    main_frac = rng.uniform(*MAIN_SIZE)

    objects = []  # (cls, mask, colour index, size fraction); main first
    for i in range(n_objects):
        cls = main_cls if i == 0 else int(rng.integers(len(CLASSES)))
        frac = main_frac if i == 0 else main_frac * rng.uniform(*SECONDARY_SCALE)
        aspect = rng.uniform(0.85, 1.18)
        angle = rng.uniform(0, 2 * np.pi)
        scale = frac * size
        stretch = _EXTENT[cls] * max(aspect, 1 / aspect)
        if i == 0:  # the main object lies fully inside the image
            scale = min(scale, (size / 2 - 1) / stretch)
            frac = scale / size
            extent = stretch * scale
            cx, cy = rng.uniform(extent, size - extent, 2)
        else:
            cx, cy = rng.uniform(0, size, 2)
        colour = int(colours[rng.integers(colours.size)])
        if i == 0 and colour_class_prior > 0 and rng.random() < colour_class_prior and cls in colours:
            colour = cls
        objects.append((cls, _object_mask(cls, cx, cy, scale, angle, aspect, size), colour, frac))

    # The main object must win the pixel count over any other class: drop secondaries that would
    # bring their class's (upper-bound) area near the main object's area.
    main_area = int(objects[0][1].sum())
    per_class: dict[int, int] = {}
    kept = [objects[0]]
    for obj in objects[1:]:
        area = per_class.get(obj[0], 0) + int(obj[1].sum())
        if obj[0] != main_cls and area >= 0.8 * main_area:
            continue
        per_class[obj[0]] = area
        kept.append(obj)
    draw_order = kept[1:] + kept[:1]  # secondaries first, main on top

    xs, ys = _grid(size)
    light_angle = rng.uniform(0, 2 * np.pi)
    light = 0.85 + 0.3 * (xs * np.float32(math.cos(light_angle)) + ys * np.float32(math.sin(light_angle)))
    rgbs = np.clip(_PALETTE[[o[2] for o in draw_order]] + rng.normal(0, 12, (len(draw_order), 3)), 0, 255)
    layer = np.zeros((size, size, 3), np.float32)
    mask = np.zeros((size, size), np.uint8)
    instance = np.zeros((size, size), np.uint8)  # 0 = background, k + 1 = draw_order[k]
    for k, (cls, m, _colour, _frac) in enumerate(draw_order):
        layer[m] = rgbs[k]
        mask[m] = cls + 1
        instance[m] = k + 1
    covered = instance > 0
    image = np.where(covered[..., None], layer * light[..., None], bg)
    visible = np.bincount(instance.ravel(), minlength=len(draw_order) + 1)[1:]

    phrases = []
    main_k = len(draw_order) - 1
    for k in [main_k, *range(main_k)]:
        cls, m, colour, frac = draw_order[k]
        if k == main_k or visible[k] >= 0.3 * m.sum():
            phrases.append(f"a {_size_word(k == main_k, frac)} {COLOURS[colour][0]} {CLASSES[cls]}")
    caption = f"{_join(phrases)} on a {texture} background"
    return SyntheticSample(
        image=np.clip(image, 0, 255).astype(np.uint8), label=main_cls, mask=mask, caption=caption,
        main_colour=COLOURS[objects[0][2]][0], texture=texture,
    )


def sample_key(index: int) -> str:
    """The shard key of render index `index`; `key_index` inverts it."""
    return f"shapes-{index:010d}"


def key_index(key: str) -> int:
    """The render index behind a shapes-world shard key (to re-render the sample or its attributes)."""
    return int(key.rsplit("-", 1)[1])


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_synthetic_dataset(
    out: Path,
    n_train: int,
    n_eval: int,
    size: int = 64,
    seed: int = 0,
    shard_max_count: int = 1000,
    shard_max_bytes: int = 256 << 20,
    colour_class_prior: float = 0.0,
) -> dict:
    """Write a shapes-world Dataset artifact (train + held-out eval split); returns the manifest.

    Train uses render indices [0, n_train), eval [EVAL_INDEX_OFFSET, EVAL_INDEX_OFFSET + n_eval),
    so the eval images are the same whatever n_train is, and never appear in train.
    """
    from gramline.data.writer import DatasetWriter, ShardSample

    if not 1 <= n_train < EVAL_INDEX_OFFSET:
        raise InputError("n_train", f"is {n_train}", f"an integer in [1, {EVAL_INDEX_OFFSET})")
    if n_eval < 0:
        raise InputError("n_eval", f"is {n_eval}", "0 or more")
    if size < 16:
        raise InputError("size", f"is {size}", "at least 16 pixels")
    if not 0.0 <= colour_class_prior <= 1.0:
        raise InputError("colour_class_prior", f"is {colour_class_prior}", "a probability in [0, 1]")
    config = {"generator": "shapes", "seed": seed, "size": size, "n_train": n_train, "n_eval": n_eval,
              "eval_index_offset": EVAL_INDEX_OFFSET, "colour_class_prior": colour_class_prior}
    progress = Progress("synth", what=str(out), total=n_train + n_eval, unit="img", every_s=2.0)
    done = 0
    with DatasetWriter(Path(out), stage="synth", config=config, max_count=shard_max_count,
                       max_bytes=shard_max_bytes) as writer:
        for split, n, offset in (("train", n_train, 0), ("eval", n_eval, EVAL_INDEX_OFFSET)):
            for i in range(n):
                index = offset + i
                s = render_sample(seed, index, size, colour_class_prior)
                writer.add(split, ShardSample(
                    key=sample_key(index), image=encode_png(s.image), image_ext="png",
                    label=s.label, label_name=CLASSES[s.label], source=f"shapes:seed={seed}:index={index}",
                    caption=s.caption, seg=encode_png(s.mask), width=size, height=size,
                    extra={"seed": seed, "render_index": index},
                ))
                done += 1
                progress.update(done)
        progress.finish()
        return writer.close(classes=list(CLASSES), stats={"generator": config})
