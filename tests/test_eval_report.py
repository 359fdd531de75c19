"""Report pieces: PCA maps, similarity maps, curves, the comparison table and self-contained HTML."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gramline.eval import report as rep


def regions(n: int = 2, grid: int = 8, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Patch features with four regions (column quarters), each its own random vector: their
    differences span exactly three principal directions."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, dim, generator=g) * 3
    region = np.repeat(np.arange(4), grid // 4)[None, :].repeat(grid, 0)  # [grid, grid] column quarters
    feats = protos[torch.from_numpy(region)][None].repeat(n, 1, 1, 1)
    return feats + 0.01 * torch.randn(feats.shape, generator=g), region


def test_pca_rgb_gives_one_colour_per_region() -> None:
    feats, region = regions()
    rgb = rep.pca_rgb(feats).astype(int)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.int64
    means = [rgb[:, region == r].reshape(-1, 3).mean(0) for r in range(4)]
    for r in range(4):
        spread = np.abs(rgb[:, region == r].reshape(-1, 3) - means[r]).max()
        assert spread <= 12  # the noise is tiny next to the region differences
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(means[a] - means[b]).max() >= 100


def test_cosine_maps_by_hand() -> None:
    patches = torch.zeros(1, 1, 3, 2)
    patches[0, 0, 0] = torch.tensor([1.0, 0.0])
    patches[0, 0, 1] = torch.tensor([0.0, 2.0])
    patches[0, 0, 2] = torch.tensor([-3.0, 3.0])
    maps = rep.cosine_maps(patches, (0, 0, 0))
    assert maps[0, 0].tolist() == pytest.approx([1.0, 0.0, -1 / np.sqrt(2)])


def test_curves_png_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 5.0 - s / 10, "dino_loss": 3.0, "lr": 1e-3} for s in range(0, 50, 10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 50, "lo')
    parsed = rep.read_metrics_jsonl(path)
    assert [r["step"] for r in parsed] == [0, 10, 20, 30, 40]
    png = rep.curves_png(parsed, "m")
    assert png is not None and Image.open(io.BytesIO(png)).format == "PNG"
    assert rep.curves_png([{"step": 1, "note": "x"}], "m") is None
    assert rep.curves_png([{"step": 1, "steps_per_s": 2.0, "data_wait_pct": 3.0}], "m") is None  # telemetry only


def test_metric_names_and_best() -> None:
    assert rep.metric_label("knn_top1_k20") == "k-NN top-1 (k=20)"
    assert rep.metric_order(["gram_mse", "linear_top1", "knn_top1_k20", "knn_top1_k10"]) == [
        "knn_top1_k10", "knn_top1_k20", "linear_top1", "gram_mse"]
    assert rep.best_models("knn_top1_k20", {"a": 0.5, "b": 0.7, "c": 0.7}) == {"b", "c"}
    assert rep.best_models("gram_mse", {"a": 0.5, "b": 0.7}) == {"a"}
    assert rep.best_models("seg_miou", {"a": 0.78712, "b": 0.78688}) == {"a", "b"}  # both show 78.7%
    assert rep.format_value("seg_miou", 0.4567) == "45.7%"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.best: list[str] = []
        self._in_best = False
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "td" and attrs.get("class") == "best":
            self._in_best = True
        if tag in ("link", "script") or (tag == "a" and "href" in attrs):
            self.links.append(tag)

    def handle_data(self, data: str) -> None:
        if self._in_best:
            self.best.append(data)
            self._in_best = False


def sample_report() -> rep.Report:
    feats, _ = regions(n=3)
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    pca = rep.feature_figure(images, [rep.pca_rgb(feats)], tile=32)
    sim = rep.feature_figure(images, [rep.colormap(rep.cosine_maps(feats, (0, 1, 1)))], tile=32, query=(0, 1, 1, 8))
    manifest = {"kind": "Model", "stage": "pretrain", "step": 200, "timm": {"name": "vit_x"},
                "inputs": [{"name": "dataset", "kind": "Dataset", "stage": "curate", "manifest_sha256": "ab" * 32}]}
    a = rep.ModelSection("pre", "Model artifact /x", {"knn_top1_k20": 0.9, "seg_miou": 0.3, "gram_mse": 0.02},
                         {"embed_dim": 96}, rep.lineage_rows(manifest), pca, sim, None, ["a note"])
    b = rep.ModelSection("rand", "random-init tiny", {"knn_top1_k20": 0.2, "seg_miou": 0.4, "gram_mse": 0.01},
                         {}, [], pca, sim)
    return rep.Report("bench", "/data", {"eval images": 3}, [a, b], ["The eval dataset has no labels"], "pre")


def test_html_is_self_contained_with_one_pca_image_per_model() -> None:
    page = rep.render_html(sample_report())
    parser = _Collect()
    parser.feed(page)
    pca = [img for img in parser.images if img.get("class") == "pca"]
    assert sorted(img["data-model"] for img in pca) == ["pre", "rand"]
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        assert decoded.format == "PNG"
    assert not parser.links  # no external stylesheet, script or link
    # best per metric: k-NN -> pre (90.0%), mIoU -> rand (40.0%), Gram MSE (lower) -> rand (0.0100)
    assert parser.best == ["90.0%", "40.0%", "0.0100"]
    assert "The eval dataset has no labels" in page and "pretrain" in page and "abababababab" in page


def test_markdown_bolds_the_best_and_links_figures() -> None:
    md = rep.render_markdown(sample_report())
    table = [line for line in md.splitlines() if line.startswith(("| k-NN", "| Segm"))]
    assert table == ["| k-NN top-1 (k=20) | **90.0%** | 20.0% |", "| Segmentation probe mIoU | 30.0% | **40.0%** |"]
    assert "(images/pca_pre.png)" in md and "(images/sim_rand.png)" in md
    assert set(rep.figure_files(sample_report())) == {"pca_pre.png", "sim_pre.png", "pca_rand.png", "sim_rand.png"}
    assert "images/" not in rep.render_markdown(sample_report(), image_dir=None)


def test_feature_figure_layout() -> None:
    images = torch.full((2, 3, 10, 10), 200, dtype=torch.uint8)
    maps = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    png = rep.feature_figure(images, [maps], tile=20, gap=4, query=(1, 0, 3, 4))
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert im.shape == (20 + 4 + 20, 20 + 4 + 20, 3)
    assert im[30, 5].tolist() == [0, 0, 0]  # a map tile
    assert im[10, 10].tolist() == [200, 200, 200]  # an image tile
    assert im[0, 24 + 15].tolist() == [255, 0, 0]  # query box on image 1, column 3 of 4 (pixels 15..19)


def test_text_metrics_have_labels_order_and_percentages() -> None:
    keys = ["retrieval_t2i_r5", "retrieval_i2t_r5", "zeroshot_seg_miou", "retrieval_i2t_r1", "zeroshot_top1",
            "knn_top1_k10", "retrieval_t2i_r1"]
    assert rep.metric_order(keys) == ["knn_top1_k10", "zeroshot_top1", "zeroshot_seg_miou",
                                      "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1",
                                      "retrieval_t2i_r5"]
    assert rep.metric_label("retrieval_i2t_r5") == "Image→text recall@5"
    assert rep.metric_label("retrieval_t2i_r1") == "Text→image recall@1"
    assert rep.metric_label("zeroshot_seg_pixel_acc") == "Zero-shot segmentation pixel acc."
    assert rep.format_value("retrieval_t2i_r1", 0.25) == "25.0%"
    assert rep.best_models("retrieval_i2t_r1", {"a": 0.2, "b": 0.5}) == {"b"}


def test_text_query_figure_in_html_and_markdown() -> None:
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    maps = np.random.default_rng(0).normal(size=(2, 6, 6)) * 0.05
    queries = ["a photo of a circle.", "a photo of a star."]
    png = rep.text_query_figure(images, maps, queries, tile=32)
    figure = Image.open(io.BytesIO(png))
    assert figure.width == 2 * 32 + 4 and figure.height > 2 * 32 + 4  # a label strip under the maps
    report = sample_report()
    report.models[0].text_png, report.models[0].text_queries = png, queries
    parser = _Collect()
    page = rep.render_html(report)
    parser.feed(page)
    assert [img["data-model"] for img in parser.images if img.get("class") == "text"] == ["pre"]
    assert "a photo of a star." in page
    md = rep.render_markdown(report)
    assert "(images/text_pre.png)" in md and "“a photo of a circle.”" in md
    assert rep.figure_files(report)["text_pre.png"] == png
    assert "text_rand.png" not in rep.figure_files(report)
