"""What every probe reads: the eval images, the models to compare and their frozen features.

A model spec on the command line is `NAME=DIR` (a Model artifact), `NAME=timm:<name>[@<weights>]`
(a plain timm backbone: timm's pretrained weights, or a local weights file), `NAME=FILE` (an official DINOv3
checkpoint, `teacher_checkpoint.pth`) or `NAME=random:<arch>` (a seeded random-init baseline of a
preset architecture). A FILE, and every spec `starting_model_spec` makes (the weights a pretrain
`--init-from` started from), loads through `gramline.models.init_from.load_starting_weights`, so it
is the very backbone that run started from. Features come from timm's `forward_features` (after the
final norm): CLS = token 0, patches = the tokens after the `num_prefix_tokens` prefix.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramline.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None or 0: leave torch's setting).

    Small probe tensors on a shared 2-core machine run several times faster on one thread: with
    two, OpenMP's spin-waiting collides with every other busy process.
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # "weights": an --init-from spec (official checkpoint file, timm:<name>[@file]) through load_starting_weights
    kind: Literal["dir", "timm", "random", "weights"]
    target: str  # directory, timm model name, preset arch or --init-from spec
    weights: Path | None = None

    def describe(self) -> str:
        if self.kind == "dir":
            return f"Model artifact {self.target}"
        if self.kind == "timm":
            return f"timm {self.target}" + (f" with weights {self.weights}" if self.weights else " (timm's pretrained weights)")
        if self.kind == "weights":
            return (f"timm {self.target[len('timm:'):]} (as --init-from loads it)" if self.target.startswith("timm:")
                    else f"DINOv3 checkpoint {self.target}")
        return f"random-init {self.target}"


def _check_name(name: str, value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"--model {name}={value}", "has an invalid name",
                         "a NAME of letters, digits, '_', '.' or '-' (it becomes a metric key and a file name)")


def parse_model_spec(name: str, value: str) -> ModelSpec:
    """`DIR`, `FILE` (an official DINOv3 checkpoint), `timm:<name>[@<weights file>]` or `random:<arch>`."""
    _check_name(name, value)
    if value.startswith("timm:"):
        body = value[len("timm:"):]
        timm_name, _, weights = body.partition("@")
        if not timm_name:
            raise InputError(f"--model {name}={value}", "names no timm model", "timm:<timm model name>[@weights]")
        return ModelSpec(name, "timm", timm_name, Path(weights) if weights else None)
    if value.startswith("random:"):
        arch = value[len("random:"):]
        from gramline.models.archs import ARCHS

        if arch not in ARCHS:
            raise InputError(f"--model {name}={value}", f"arch {arch!r} is unknown", "one of " + ", ".join(ARCHS))
        return ModelSpec(name, "random", arch)
    if Path(value).is_file():
        return ModelSpec(name, "weights", value)
    return ModelSpec(name, "dir", value)


def starting_model_spec(name: str, value: str) -> ModelSpec:
    """The model a pretrain `--init-from VALUE` started from, loaded as that run loaded it: a Model
    directory as a Model artifact, anything else (`timm:<name>` with the hub's or its cache's
    pretrained weights, `timm:<name>@<file>`, an official checkpoint file) through
    `load_starting_weights` (fitted to a registered architecture, as the training run saw it)."""
    _check_name(name, value)
    value = value.strip()
    if value.startswith("timm:"):
        if not value[len("timm:"):].partition("@")[0]:
            raise InputError(f"--start-model {value}", "names no timm model", "timm:<timm model name>[@weights]")
        return ModelSpec(name, "weights", value)
    return parse_model_spec(name, value)


def expand_students(specs: list[ModelSpec]) -> list[ModelSpec]:
    """A Model directory holding several students (the distill stage's output: a manifest with
    `students`) stands for each of them, named `<name>.<student>`."""
    from gramline.artifacts import read_manifest

    out: list[ModelSpec] = []
    for spec in specs:
        manifest = read_manifest(spec.target, "Model", f"--model {spec.name}") if spec.kind == "dir" else {}
        students = manifest.get("students") or {}
        if not students:
            out.append(spec)
            continue
        out += [ModelSpec(f"{spec.name}.{student}", "dir", str(Path(spec.target) / rel))
                for student, rel in students.items()]
    return out


@dataclass
class LoadedModel:
    """A frozen backbone ready to probe, with what the report shows about it."""

    name: str
    spec: ModelSpec
    module: nn.Module
    manifest: dict[str, Any] | None = None
    metrics_jsonl: Path | None = None
    text_tower: Any = None  # a zeroshot.TextAligned when the artifact carries one

    @property
    def patch_size(self) -> int:
        return patch_size_of(self.module)

    @property
    def native_size(self) -> int:
        vit: Any = self.module
        return int(vit.patch_embed.img_size[0])

    @property
    def embed_dim(self) -> int:
        vit: Any = self.module
        return int(vit.embed_dim)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def load_model(spec: ModelSpec, random_img_size: int, seed: int = 0) -> LoadedModel:
    """Build the backbone a spec names; every failure is an InputError naming the spec."""
    from gramline.models import io as model_io

    if spec.kind == "dir":
        model_dir = Path(spec.target)
        module, manifest = model_io.load_backbone(model_dir, flag=f"--model {spec.name}")
        jsonl = model_dir / "metrics.jsonl"
        return LoadedModel(spec.name, spec, module, manifest, jsonl if jsonl.is_file() else None)
    if spec.kind == "timm":
        module = (model_io.load_timm_backbone(spec.target, spec.weights) if spec.weights is not None
                  else _timm_pretrained(spec))
        if not hasattr(module, "forward_features") or not hasattr(module, "patch_embed"):
            raise InputError(f"--model {spec.name}=timm:{spec.target}", "is not a ViT with patch tokens",
                             "a timm ViT/Eva backbone such as vit_small_patch16_dinov3")
        return LoadedModel(spec.name, spec, module)
    if spec.kind == "weights":
        return LoadedModel(spec.name, spec, load_starting_backbone(spec, random_img_size))
    module = model_io.build_random_backbone(spec.target, random_img_size, seed=seed)
    return LoadedModel(spec.name, spec, module)


def _timm_pretrained(spec: ModelSpec) -> nn.Module:
    """`timm:<name>` without a file: timm's pretrained weights (the hub, or its cache offline); a
    random baseline is `random:<arch>`."""
    import timm

    try:
        return timm.create_model(spec.target, pretrained=True, num_classes=0, global_pool="token").eval()
    except Exception as err:  # noqa: BLE001 - hub errors (offline, no cache, HTTP, unknown tag) come in many types
        raise InputError(f"--model {spec.name}=timm:{spec.target}", "could not be loaded: timm found no pretrained "
                         f"weights on the Hugging Face hub or in its local cache ({type(err).__name__})",
                         f"hub access once (the cache then serves it offline), timm:{spec.target}@<local weights "
                         "file>, or random:<arch> for a random-init baseline") from None


def load_starting_backbone(spec: ModelSpec, img_size: int) -> nn.Module:
    """The backbone of an --init-from spec as a plain timm model of its architecture (ARCHS), in
    eval mode, built for `img_size` inputs (the DINOv3 ViTs also take other sizes)."""
    from gramline.models.init_from import load_starting_weights

    return load_starting_weights(spec.target, flag=f"--model {spec.name}").timm_backbone(img_size)


# --------------------------------------------------------------------------- eval images


@dataclass
class EvalData:
    """The eval split in memory, in the dataset's deterministic order, at one common size."""

    images: Tensor  # uint8 [N, 3, H, W]
    labels: np.ndarray  # int64 [N], -1 = no label
    masks: np.ndarray | None  # uint8 [N, H, W] (0 background, class c -> c + 1) or None
    classes: list[str]
    keys: list[str]
    captions: list[str | None]  # the samples' caption text (None when a sample has none)
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    def num_classes(self) -> int:
        top = int(self.labels.max()) + 1 if self.n else 0
        return max(len(self.classes), top)


def load_eval_data(dataset_dir: Path | str, max_images: int | None = None,
                   flag: str = "--eval-dataset") -> EvalData:
    """Read the eval split. Images of different sizes are resized to the most common size."""
    from gramline.data.reader import iter_samples, open_dataset

    dataset_dir = Path(dataset_dir)
    info = open_dataset(dataset_dir)
    classes = [str(c) for c in (info.classes or [])]
    pil_images, labels, masks, keys = [], [], [], []
    captions: list[str | None] = []
    for sample in iter_samples(dataset_dir, split="eval", decode=True):
        pil_images.append(sample["image"].convert("RGB"))
        labels.append(int(sample.get("label", -1) if sample.get("label") is not None else -1))
        masks.append(sample.get("mask"))
        keys.append(str(sample["key"]))
        captions.append(sample.get("caption"))
        if max_images is not None and len(keys) >= max_images:
            break
    if not keys:
        raise InputError(f"{flag} {dataset_dir}", "has no images in its eval split",
                         "a Dataset artifact with a non-empty eval split")
    notes: list[str] = []
    sizes = Counter(im.size for im in pil_images)  # PIL size is (W, H)
    (width, height), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:
        notes.append(f"eval images came in {len(sizes)} sizes; all were resized to {width}x{height} "
                     f"(masks with nearest-neighbour)")
    from PIL import Image

    arrays = [np.asarray(im if im.size == (width, height) else im.resize((width, height), Image.Resampling.BICUBIC))
              for im in pil_images]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    mask_array: np.ndarray | None = None
    if all(m is not None for m in masks):
        fixed = []
        for m in masks:
            m = np.asarray(m, dtype=np.uint8)
            if m.shape != (height, width):
                m = np.asarray(Image.fromarray(m).resize((width, height), Image.Resampling.NEAREST))
            fixed.append(m)
        mask_array = np.stack(fixed)
    elif any(m is not None for m in masks):
        notes.append(f"only {sum(m is not None for m in masks)} of {len(masks)} eval images have masks; "
                     "the segmentation probe needs all of them")
    return EvalData(images, np.asarray(labels, dtype=np.int64), mask_array, classes, keys, captions, notes)


# --------------------------------------------------------------------------- probe splits


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-seed split of positions 0..N-1, stratified by label when every class allows it."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if n < 2:
        raise InputError("eval split", f"has {n} usable images", "at least 2 to split into probe train and test")
    positions = np.arange(n)
    counts = np.bincount(labels - labels.min())
    n_test = max(1, min(n - 1, round(n * test_fraction)))
    n_classes = int((counts > 0).sum())
    stratify = labels if counts[counts > 0].min() >= 2 and n_test >= n_classes and n - n_test >= n_classes else None
    train, test = train_test_split(positions, test_size=n_test, random_state=seed, shuffle=True, stratify=stratify)
    return np.sort(train), np.sort(test)


# --------------------------------------------------------------------------- features


def preprocess(images: Tensor, size: int) -> Tensor:
    """uint8 [B,3,H,W] -> ImageNet-normalised float at size x size (bicubic, antialiased)."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def patch_size_of(module: nn.Module) -> int:
    """The patch side of a timm ViT (`patch_embed.patch_size`)."""
    vit: Any = module  # timm attributes are not typed on nn.Module
    return int(vit.patch_embed.patch_size[0])


@torch.inference_mode()
def forward_tokens(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS [B,D], patches [B,h,w,D]) from a timm ViT's last layer after the final norm."""
    vit: Any = module
    tokens = vit.forward_features(x)
    prefix = int(getattr(module, "num_prefix_tokens", 1))
    patch = patch_size_of(module)
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    patches = tokens[:, prefix:]
    if patches.shape[1] != h * w:
        raise InputError("model", f"returned {patches.shape[1]} patch tokens for a {h}x{w} grid",
                         "a ViT whose forward_features returns prefix + patch tokens")
    return tokens[:, 0], patches.reshape(x.shape[0], h, w, -1)


@dataclass
class FeatureSet:
    cls: Tensor  # [N, D]
    mean_patch: Tensor  # [N, D]
    patches: Tensor | None  # [N, h, w, D] when kept
    grid: tuple[int, int]


def extract_features(model: LoadedModel, images: Tensor, size: int, batch_size: int = 64,
                     keep_patches: bool = True, label: str = "") -> FeatureSet:
    """Frozen features of all images, in order; prints throughput."""
    module = model.module.eval()
    cls_parts, mean_parts, patch_parts = [], [], []
    start = time.perf_counter()
    for lo in range(0, images.shape[0], batch_size):
        cls, patches = forward_tokens(module, preprocess(images[lo:lo + batch_size], size))
        cls_parts.append(cls.float())
        mean_parts.append(patches.float().mean(dim=(1, 2)))
        if keep_patches:
            patch_parts.append(patches.float())
    seconds = time.perf_counter() - start
    n = images.shape[0]
    print(f"[benchmark] {label or model.name}: features of {n} images at {size}px in {seconds:.1f}s "
          f"({n / max(seconds, 1e-9):.0f} img/s)", flush=True)
    patches_all = torch.cat(patch_parts) if keep_patches else None
    grid = (size // model.patch_size, size // model.patch_size)
    return FeatureSet(torch.cat(cls_parts), torch.cat(mean_parts), patches_all, grid)


def input_size_for(model: LoadedModel, override: int | None) -> int:
    """The side the model sees: the override or the model's own size, rounded to the patch size."""
    patch = model.patch_size
    size = max(patch, round((override or model.native_size) / patch) * patch)
    vit: Any = model.module
    if size != model.native_size and not getattr(vit, "dynamic_img_size", False):
        raise InputError("config img_size", f"is {override}, but model {model.name!r} only takes "
                         f"{model.native_size}x{model.native_size} inputs", "no img_size override for it")
    return size
