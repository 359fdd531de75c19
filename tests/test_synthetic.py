"""The procedural shapes world: determinism, labels vs masks, captions, the Dataset artifact, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from gramline.cli import main as cli_main
from gramline.data.reader import iter_samples, open_dataset
from gramline.data.synthetic import (
    CLASSES,
    COLOURS,
    EVAL_INDEX_OFFSET,
    TEXTURES,
    render_sample,
    write_synthetic_dataset,
)
from gramline.errors import InputError

COLOUR_NAMES = {name for name, _ in COLOURS}


@pytest.fixture(scope="module")
def samples() -> list:
    return [render_sample(7, i, 48) for i in range(500)]


def test_same_arguments_same_bytes() -> None:
    for size in (32, 64, 96):
        a, b = render_sample(3, 17, size), render_sample(3, 17, size)
        assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert (a.label, a.caption) == (b.label, b.caption)
        assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
        assert a.mask.shape == (size, size) and a.mask.dtype == np.uint8
    assert render_sample(3, 18).image.tobytes() != render_sample(3, 17).image.tobytes()
    assert render_sample(4, 17).image.tobytes() != render_sample(3, 17).image.tobytes()


def test_classes_are_shapes_and_balanced(samples: list) -> None:
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    assert {"circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent"} <= set(CLASSES)
    counts = Counter(s.label for s in samples)
    expected = len(samples) / len(CLASSES)
    assert set(counts) == set(range(len(CLASSES)))
    assert all(0.5 * expected <= n <= 1.5 * expected for n in counts.values()), counts


def test_label_is_the_largest_object_in_the_mask(samples: list) -> None:
    shares = []
    for s in samples:
        assert s.mask.max() <= len(CLASSES)
        pixels = np.bincount(s.mask.ravel(), minlength=len(CLASSES) + 1)[1:]
        assert pixels.argmax() == s.label  # the label's class covers the most pixels
        shares.append(pixels[s.label] / s.mask.size)
    # the main object covers a fair share of the image: a few percent at least, often a quarter
    assert min(shares) > 0.08 and np.median(shares) > 0.15 and max(shares) > 0.3


def test_caption_describes_the_scene(samples: list) -> None:
    objects_per_image = []
    for s in samples:
        caption = s.caption
        assert caption.startswith("a ") and caption.endswith(" background")
        first = caption.split(" and ")[0].split(", ")[0].split(" on a ")[0]  # the main object comes first
        assert first.split()[-1] == CLASSES[s.label] and first.split()[-2] in COLOUR_NAMES
        assert caption.split(" on a ")[-1].removesuffix(" background") in TEXTURES
        mentioned = [w for w in caption.replace(",", "").split() if w in CLASSES]
        present = {CLASSES[c - 1] for c in np.unique(s.mask) if c > 0}
        assert set(mentioned) <= present
        objects_per_image.append(len(mentioned))
    assert set(objects_per_image) >= {1, 2, 3}  # several objects per image


def test_label_does_not_follow_colour() -> None:
    """Colour statistics alone predict the class at chance level: classes are shapes."""
    feats, labels = [], []
    for i in range(1000):
        s = render_sample(11, i, 32)
        q = (s.image // 64).reshape(-1, 3).astype(int)
        hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / q.shape[0]
        feats.append(np.concatenate([hist, s.image.mean((0, 1)) / 255, s.image.std((0, 1)) / 255]))
        labels.append(s.label)
    x, y = np.array(feats), np.array(labels)
    accuracy = LogisticRegression(max_iter=2000).fit(x[:800], y[:800]).score(x[800:], y[800:])
    assert accuracy < 0.2  # chance is 0.1
    colours_per_class = {c: {s.caption.split(" on a ")[0].split(", ")[0].split(" and ")[0].split()[-2]
                             for s in (render_sample(11, i, 32) for i in range(300)) if s.label == c}
                         for c in range(len(CLASSES))}
    assert all(len(v) >= 4 for v in colours_per_class.values())


def test_colour_class_prior_is_opt_in() -> None:
    """At 0 the world is unchanged; at 1 the main object has its class's colour wherever that colour
    stands out from the background; a value outside [0, 1] is refused, naming the field."""
    for i in range(20):
        a, b = render_sample(5, i, 32), render_sample(5, i, 32, colour_class_prior=0.0)
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
    biased = [render_sample(5, i, 32, colour_class_prior=1.0) for i in range(300)]
    own = np.mean([s.main_colour == COLOURS[s.label][0] for s in biased])
    chance = np.mean([s.main_colour == COLOURS[s.label][0] for s in (render_sample(5, i, 32) for i in range(300))])
    assert own > 0.6 and chance < 0.2
    assert all(s.caption.split()[2] == s.main_colour for s in biased)  # the caption names the main colour
    with pytest.raises(InputError, match="colour_class_prior"):
        render_sample(0, 0, 32, colour_class_prior=1.5)


def test_render_rejects_tiny_size() -> None:
    with pytest.raises(InputError, match="size"):
        render_sample(0, 0, 8)


def test_write_synthetic_dataset(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = write_synthetic_dataset(out, n_train=40, n_eval=12, size=32, seed=5, shard_max_count=16)
    assert manifest["kind"] == "Dataset" and manifest["stage"] == "synth" and manifest["inputs"] == []
    assert manifest["classes"] == list(CLASSES)
    assert manifest["splits"] == {"train": 40, "eval": 12}
    assert manifest["shard_counts"] == {"train": [16, 16, 8], "eval": [12]}
    info = open_dataset(out)
    train = list(iter_samples(info, "train"))
    evals = list(iter_samples(info, "eval"))
    assert not {s["key"] for s in train} & {s["key"] for s in evals}
    for i, s in enumerate(evals):  # eval sample i is render index EVAL_INDEX_OFFSET + i
        ref = render_sample(5, EVAL_INDEX_OFFSET + i, 32)
        assert np.array_equal(np.asarray(s["image"]), ref.image)
        assert np.array_equal(s["mask"], ref.mask)
        assert s["caption"] == ref.caption and s["label"] == ref.label
        assert s["label_name"] == CLASSES[ref.label]
    assert np.array_equal(np.asarray(train[7]["image"]), render_sample(5, 7, 32).image)
    labels = info.index.column("label").to_pylist()
    assert labels == [s["label"] for s in train] + [s["label"] for s in evals]


def _gramline(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("gramline")
    return subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, timeout=120)


def test_cli_data_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    done = _gramline("data", "synth", "--out", str(out), "--n", "64", "--size", "64")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 64, "eval": 16}
    assert "80/80" in done.stderr  # the progress line
    # bad input, through the same entry point in-process (spares a torch import per case)
    for args, words in (([str(out), "--n", "64"], [str(out), "manifest"]),
                        ([str(tmp_path / "bad"), "--n", "0"], ["n_train"])):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["data", "synth", "--out", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert not (tmp_path / "bad").exists()
