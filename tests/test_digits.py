"""scikit-learn digits as a Dataset artifact."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gramline.cli import main as cli_main
from gramline.data.digits import write_digits_dataset
from gramline.data.reader import iter_samples, open_dataset
from gramline.errors import InputError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written through the console command `gramline data digits`."""
    out = tmp_path_factory.mktemp("digits") / "ds"
    exe = Path(sys.executable).with_name("gramline")
    done = subprocess.run([str(exe), "data", "digits", "--out", str(out), "--size", "32", "--eval-fraction",
                           "0.25", "--seed", "1"], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_manifest_and_stratified_split(digits_dir: Path) -> None:
    info = open_dataset(digits_dir)
    target = load_digits().target
    assert info.classes == [str(d) for d in range(10)]
    assert info.splits["train"] + info.splits["eval"] == len(target) == 1797
    assert info.splits["eval"] == pytest.approx(0.25 * 1797, abs=1)
    eval_counts = Counter(s["label"] for s in iter_samples(info, "eval", decode=False))
    for digit, n in Counter(target.tolist()).items():
        assert abs(eval_counts[digit] - 0.25 * n) <= 1  # stratified: each digit split 1:3
    train_keys = {s["key"] for s in iter_samples(info, "train", decode=False)}
    eval_keys = {s["key"] for s in iter_samples(info, "eval", decode=False)}
    assert not train_keys & eval_keys and len(train_keys | eval_keys) == 1797


def test_images_are_the_upscaled_digits(digits_dir: Path) -> None:
    data = load_digits()
    for n, s in enumerate(iter_samples(digits_dir, "eval")):
        i = int(s["key"].split("-")[1])
        assert s["label"] == data.target[i] and s["label_name"] == str(data.target[i])
        assert s["image"].size == (32, 32) and s["image"].mode == "RGB"
        small = np.asarray(s["image"].convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        corr = np.corrcoef(small.ravel(), data.images[i].ravel())[0, 1]
        assert corr > 0.9
        assert set(np.unique(s["mask"])) <= {0, s["label"] + 1} and (s["mask"] > 0).any()
        assert s["caption"] == f"a handwritten {s['label']}"
        if n == 50:
            break


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="eval_fraction"):
        write_digits_dataset(tmp_path / "a", eval_fraction=1.0)
    with pytest.raises(InputError, match="size"):
        write_digits_dataset(tmp_path / "b", size=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_data_digits_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:  # the console entry point, in-process
        cli_main(["data", "digits", "--out", str(tmp_path / "x"), "--eval-fraction", "2"])
    assert exit_info.value.code == 2 and "eval_fraction" in capsys.readouterr().err
