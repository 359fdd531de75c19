"""Text-tower measures: retrieval recall, zero-shot segmentation, and their wiring into the benchmark."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from gramline.data.synthetic import write_synthetic_dataset
from gramline.eval import benchmark as bench
from gramline.eval.features import LoadedModel, ModelSpec, forward_tokens
from gramline.eval.zeroshot import (
    TextAligned,
    retrieval_recall,
    seg_class_embeddings,
    text_query_maps,
    zero_shot_segmentation,
)
from gramline.stages import benchmark

FAST = ["--set", "seg.steps=20", "--set", "linear.epochs=10", "--set", "dense.images=8",
        "--set", "report.images=4"]


# --------------------------------------------------------------------------- retrieval


def test_retrieval_recall_by_hand() -> None:
    text = torch.eye(3)  # caption i embeds as e_i
    image = torch.tensor([[0.6, 0.8, 0.0],  # its own caption 2nd (after caption 1)
                          [0.0, 1.0, 0.0],  # its own caption 1st
                          [0.8, 0.0, 0.6]])  # caption 0 first, its own 2nd
    got = retrieval_recall(image, text, ["cat", "dog", "fox"], ks=(1, 2, 5))
    # text -> image: caption 0 ranks image 2 (0.8) before image 0 (0.6); captions 1 and 2 find theirs first
    assert got == pytest.approx({"i2t_r1": 1 / 3, "t2i_r1": 2 / 3, "i2t_r2": 1.0, "t2i_r2": 1.0,
                                 "i2t_r5": 1.0, "t2i_r5": 1.0})


def test_retrieval_counts_an_identical_caption_as_a_hit() -> None:
    captions = ["cat", "dog", "cat"]  # images 0 and 2 share a caption
    text = torch.tensor([[1.0, 0.01], [0.0, 1.0], [1.0, 0.0]])  # caption 0 a hair closer to image 2 than 2 is
    image = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.8, 0.6]])
    got = retrieval_recall(image, text, captions, ks=(1, 2))
    # image 2 retrieves caption 0 first: not its own pair, but the same string, so a hit.
    # image 1 ("dog") sees both "cat" captions first: a miss even at k=2. image 0 finds "cat" 2nd.
    # caption "cat" (0 and 2) ranks image 1 first, image 2 second; "dog" ranks images 0 and 2 first.
    assert got == pytest.approx({"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "t2i_r1": 0.0, "t2i_r2": 2 / 3})
    with pytest.raises(ValueError):
        retrieval_recall(image[:2], text, captions)


# --------------------------------------------------------------------------- segmentation

NAMES = ["circle", "square"]


class ClassIndexTower:
    """Reads each 4 px patch's class from channel 0 of the image and embeds it as the one-hot text
    embedding of class `perm[c]` (texts: one-hot over background + NAMES)."""

    def __init__(self, perm: Sequence[int] = (0, 1, 2)) -> None:
        self.perm = torch.tensor(perm)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        vocab = ["background", *NAMES]
        index = torch.tensor([next(i for i, w in enumerate(vocab) if w in t) for t in texts])
        return nn.functional.one_hot(index, 3).float()

    def encode_patches(self, images: Tensor) -> Tensor:
        cls = images[:, 0, ::4, ::4].round().long()
        return nn.functional.one_hot(self.perm[cls], 3).float()

    def encode_image(self, images: Tensor) -> Tensor:
        return self.encode_patches(images).mean(dim=(1, 2))


def class_world() -> tuple[Tensor, Tensor]:
    """Two 16 px images whose 4x4 patch grids hold classes 0..2; masks at pixel resolution. The layouts
    (quadrants, stripes) keep the argmax of the bilinearly upsampled maps exact: no patch has its side
    and its upper or lower neighbour both of one other class, which would round its corner off."""
    grid = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]],
                         [[1, 0, 0, 2]] * 4])
    masks = grid.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    images = masks.float()[:, None].repeat(1, 3, 1, 1)
    return images, masks


def test_zero_shot_segmentation_is_perfect_when_patches_embed_as_their_class_text() -> None:
    images, masks = class_world()
    tower = ClassIndexTower()
    assert isinstance(tower, TextAligned)
    class_emb = seg_class_embeddings(tower, NAMES)
    assert torch.allclose(class_emb, torch.eye(3))
    result = zero_shot_segmentation([(tower.encode_patches(images), masks)], class_emb)
    assert result.miou == pytest.approx(1.0) and result.pixel_acc == pytest.approx(1.0)
    assert set(result.iou_by_class) == {0, 1, 2}
    # in two batches, from one confusion matrix: the same
    halves = [(tower.encode_patches(images[i:i + 1]), masks[i:i + 1]) for i in range(2)]
    assert zero_shot_segmentation(halves, class_emb).miou == pytest.approx(1.0)


def test_zero_shot_segmentation_drops_when_the_classes_are_permuted() -> None:
    images, masks = class_world()
    tower = ClassIndexTower(perm=(0, 2, 1))  # circle patches embed as "square" and back
    batches = [(tower.encode_patches(images), masks)]
    class_emb = seg_class_embeddings(tower, NAMES)
    result = zero_shot_segmentation(batches, class_emb)
    assert result.miou < 0.5 and result.pixel_acc < 1.0
    assert result.iou_by_class[0] == pytest.approx(1.0) and result.iou_by_class[1] == 0.0
    wider = zero_shot_segmentation(batches, class_emb, num_classes=5)  # absent classes are skipped
    assert wider.miou == pytest.approx(result.miou)


def test_text_query_maps_pick_each_images_own_query() -> None:
    patches = torch.zeros(2, 1, 2, 2)
    patches[:, 0, 0] = torch.tensor([1.0, 0.0])
    patches[:, 0, 1] = torch.tensor([0.0, 3.0])
    maps = text_query_maps(patches, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert maps.tolist() == [[[1.0, 0.0]], [[0.0, 1.0]]]


# --------------------------------------------------------------------------- the benchmark


class BackboneTower:
    """A stand-in text-aligned model: patch tokens of the backbone through a fixed random projection;
    texts as a deterministic hash embedding. Meaningless, but it exercises every code path."""

    def __init__(self, module: nn.Module, dim: int = 16) -> None:
        self.module = module
        width = int(module.embed_dim)  # type: ignore[arg-type]
        self.proj = torch.randn(width, dim, generator=torch.Generator().manual_seed(0))

    def encode_patches(self, images: Tensor) -> Tensor:
        return forward_tokens(self.module, images)[1] @ self.proj

    def encode_image(self, images: Tensor) -> Tensor:
        return self.encode_patches(images).mean(dim=(1, 2))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        dim = self.proj.shape[1]
        return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes"
    write_synthetic_dataset(out, n_train=4, n_eval=32, size=64, seed=0)
    return out


def test_benchmark_text_metrics_and_figure_stand_in(tmp_path: Path, captioned: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = bench.load_model

    def load_model(spec: ModelSpec, random_img_size: int, seed: int = 0) -> LoadedModel:
        model = real_load(spec, random_img_size, seed)
        if spec.name == "aligned":
            model.text_tower = BackboneTower(model.module)
        return model

    monkeypatch.setattr(bench, "load_model", load_model)
    out = tmp_path / "out"
    code = benchmark.main(["--model", "aligned=random:tiny", "--model", "plain=random:tiny",
                           "--eval-dataset", str(captioned), "--out-metrics", str(out / "m"),
                           "--out-report", str(out / "r"), *FAST])
    assert code == 0
    metrics = json.loads((out / "m" / "metrics.json").read_text())
    aligned, plain = metrics["models"]["aligned"], metrics["models"]["plain"]
    text_keys = {"zeroshot_top1", "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1",
                 "retrieval_t2i_r5", "zeroshot_seg_miou", "zeroshot_seg_pixel_acc"}
    assert text_keys <= set(aligned)
    for key in text_keys:
        assert 0.0 <= aligned[key] <= 1.0, key
    assert aligned["retrieval_i2t_r1"] <= aligned["retrieval_i2t_r5"]
    assert not text_keys & set(plain)  # the model without a tower: unchanged, with its skip note
    assert any("zero-shot skipped for plain" in n and "no text tower" in n for n in metrics["notes"])
    assert "zeroshot_seg_iou_by_class" in metrics["details"]["aligned"]
    # the text-query figure: a PNG under images/, inlined in the HTML, linked from the Markdown
    figure = out / "r" / "images" / "text_aligned.png"
    assert Image.open(figure).format == "PNG"
    assert not (out / "r" / "images" / "text_plain.png").exists()
    html = (out / "r" / "report.html").read_text()
    assert "class='text' data-model='aligned'" in html and "data-model='plain'" in html
    assert "a photo of a circle." in html and "Image→text recall@1" in html
    md = (out / "r" / "report.md").read_text()
    assert "(images/text_aligned.png)" in md and "a photo of a circle." in md
    assert "| Text→image recall@5 |" in md and "| Zero-shot segmentation mIoU |" in md
