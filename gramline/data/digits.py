"""scikit-learn's handwritten digits (shipped with the package) as a small labelled Dataset.

1,797 8x8 grey images of the digits 0-9, upscaled to `size` x `size` RGB (white ink on black, as
in the source), with a stratified train/eval split. Each sample also gets a segmentation mask
(ink pixels -> digit + 1) and a caption, so every reader path has real, non-synthetic data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from gramline.data.synthetic import encode_png
from gramline.data.writer import DatasetWriter, ShardSample
from gramline.errors import InputError

CLASSES = [str(d) for d in range(10)]


def digit_image(pixels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An 8x8 digit (values 0-16) as a uint8 RGB image and its ink mask (bool), both size x size."""
    grey = Image.fromarray((pixels.reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8))
    big = np.asarray(grey.resize((size, size), Image.Resampling.BICUBIC))
    return np.repeat(big[..., None], 3, axis=2), big >= 96


def write_digits_dataset(out: Path, size: int = 32, eval_fraction: float = 0.5, seed: int = 0) -> dict:
    """Write the digits Dataset artifact (train + eval split, stratified by digit); returns the manifest."""
    if not 8 <= size <= 1024:
        raise InputError("size", f"is {size}", "an integer in [8, 1024]")
    if not 0.0 < eval_fraction < 1.0:
        raise InputError("eval_fraction", f"is {eval_fraction}", "a number strictly between 0 and 1")
    digits = load_digits()
    labels = digits.target.astype(int)
    train_idx, eval_idx = train_test_split(
        np.arange(labels.size), test_size=eval_fraction, random_state=seed, stratify=labels
    )
    config = {"source": "sklearn.datasets.load_digits", "size": size, "eval_fraction": eval_fraction, "seed": seed}
    with DatasetWriter(Path(out), stage="digits", config=config) as writer:
        for split, indices in (("train", np.sort(train_idx)), ("eval", np.sort(eval_idx))):
            for i in indices.tolist():
                image, ink = digit_image(digits.data[i], size)
                label = int(labels[i])
                writer.add(split, ShardSample(
                    key=f"digit-{i:05d}", image=encode_png(image), image_ext="png", label=label,
                    label_name=CLASSES[label], source=f"sklearn-digits:{i}", caption=f"a handwritten {label}",
                    seg=encode_png((ink * (label + 1)).astype(np.uint8)), width=size, height=size,
                ))
        manifest = writer.close(classes=CLASSES)
    print(f"digits: wrote {manifest['splits']} to {out}")
    return manifest
