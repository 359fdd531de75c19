"""Text alignment on the tiny preset learns from the captions: on the procedural world's eval split,
text→image recall@5 and zero-shot colour-word accuracy are well above chance and above the same
head trained on shuffled captions (the control: whatever it learns does not come from the text).

Measured (2 cores, one thread; 512 train / 128 eval images at 64 px, the shared 20-step tiny
pretrain as the backbone, align tiny preset for 150 steps): colour words 0.44 vs 0.07 shuffled
(chance 1/11), text→image recall@5 0.23 vs 0.02 (chance 5/128 = 0.04), class words 0.125 vs 0.10
(chance 0.1). The thresholds below are about half those margins. Class words stay at chance: the tiny backbone
does not encode shape (the known gap of tiny runs, see test_pretrain_quality.py); at scale it is
measured by bench/ssl_learnability.py on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from phase_run import TinyRun, one_thread, sets, tiny_run

from gramline.data.reader import iter_samples
from gramline.data.synthetic import CLASSES, COLOURS, key_index, render_sample, write_synthetic_dataset
from gramline.eval.features import load_eval_data, preprocess
from gramline.eval.zeroshot import retrieval_recall, zero_shot_accuracy
from gramline.models.text import load_aligned
from gramline.stages import align

SEED, SIZE = 1, 64
COLOUR_NAMES = [name for name, _ in COLOURS]
# caption-shaped prompts, each word marginalised over the other attribute (captions read
# "a large red circle ..."): a class is every colour of it, a colour every class in it
CLASS_TEMPLATES = [f"a large {colour} {{}}" for colour in COLOUR_NAMES]
COLOUR_TEMPLATES = [f"a large {{}} {cls}" for cls in CLASSES]


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    run: TinyRun = tiny_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("align_quality")
    dataset = root / "dataset"
    write_synthetic_dataset(dataset, n_train=512, n_eval=128, size=SIZE, seed=SEED)
    out: dict[str, dict[str, float]] = {}
    for name, shuffled in (("captions", "false"), ("shuffled", "true")):
        model_dir = root / name
        with one_thread():
            assert align.main(["--model", str(run.pretrain), "--dataset", str(dataset), "--out-model", str(model_dir),
                               "--preset", "tiny", *sets(["train.steps=150", f"align.shuffle_captions={shuffled}"])]) == 0
            out[name] = evaluate(model_dir, dataset)
    print({name: {k: round(v, 3) for k, v in s.items()} for name, s in out.items()})
    return out


def evaluate(model_dir: Path, dataset: Path) -> dict[str, float]:
    model = load_aligned(model_dir)
    data = load_eval_data(dataset)
    images = preprocess(data.images, int(model.backbone.patch_embed.img_size[0]))
    colours = torch.tensor([COLOUR_NAMES.index(render_sample(SEED, key_index(k), SIZE).main_colour)
                            for k in data.keys])
    captions = [str(s["caption"]) for s in iter_samples(dataset, "eval", decode=False)]
    with torch.inference_mode():
        recall = retrieval_recall(F.normalize(model.encode_image(images), dim=-1),
                                  F.normalize(model.encode_text(captions), dim=-1), captions, ks=[5])
    return {"class_words": zero_shot_accuracy(model, images, torch.from_numpy(np.asarray(data.labels)),
                                              list(CLASSES), CLASS_TEMPLATES),
            "colour_words": zero_shot_accuracy(model, images, colours, COLOUR_NAMES, COLOUR_TEMPLATES),
            "t2i_r5": recall["t2i_r5"]}


@pytest.mark.slow
def test_colour_words_and_retrieval_beat_chance_and_the_shuffled_control(scores: dict) -> None:
    real, control = scores["captions"], scores["shuffled"]
    assert real["colour_words"] >= 0.25 and real["colour_words"] >= control["colour_words"] + 0.15, scores
    assert real["t2i_r5"] >= 0.08 and real["t2i_r5"] >= control["t2i_r5"] + 0.06, scores


@pytest.mark.slow
@pytest.mark.xfail(reason="tiny scale: the tiny backbone does not encode shape, so class words stay at chance "
                          "(measured 0.125 vs 0.10 shuffled); measured at scale on a GPU", strict=False)
def test_class_words_beat_the_shuffled_control(scores: dict) -> None:
    assert scores["captions"]["class_words"] >= scores["shuffled"]["class_words"] + 0.1, scores
