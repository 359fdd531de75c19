"""The benchmark report: one self-contained HTML page (images inlined as base64 PNG) and Markdown.

Contents: a comparison table (metric by metric, best in bold), DINOv3-style PCA feature maps (the
first 3 principal components of the patch features of a fixed set of images, as RGB), a cosine
similarity map for one query patch, for a model with a text tower the map a text query lights up,
training curves from each model's `metrics.jsonl`, and each model's lineage from its manifest.
Figures are PNG bytes so the stage can also write them as files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

# --------------------------------------------------------------------------- metrics


_FIXED_METRICS: dict[str, tuple[str, bool]] = {
    "linear_top1": ("Linear probe top-1", True),
    "seg_miou": ("Segmentation probe mIoU", True),
    "seg_pixel_acc": ("Segmentation probe pixel acc.", True),
    "corr_top1": ("Patch correspondence", True),
    "gram_corr": ("Gram correlation to reference", True),
    "gram_mse": ("Gram MSE to reference (lower is better)", False),
    "zeroshot_top1": ("Zero-shot top-1", True),
    "zeroshot_seg_miou": ("Zero-shot segmentation mIoU", True),
    "zeroshot_seg_pixel_acc": ("Zero-shot segmentation pixel acc.", True),
}
_PERCENT = ("knn_", "linear_top1", "seg_", "corr_", "zeroshot_", "retrieval_")
_RETRIEVAL = re.compile(r"retrieval_(i2t|t2i)_r(\d+)")
_DIRECTION = {"i2t": "Image→text", "t2i": "Text→image"}


def metric_label(key: str) -> str:
    match = re.fullmatch(r"knn_top1_k(\d+)", key)
    if match:
        return f"k-NN top-1 (k={match.group(1)})"
    match = _RETRIEVAL.fullmatch(key)
    if match:
        return f"{_DIRECTION[match.group(1)]} recall@{match.group(2)}"
    return _FIXED_METRICS.get(key, (key, True))[0]


def higher_is_better(key: str) -> bool:
    return key.startswith(("knn_", "retrieval_")) or _FIXED_METRICS.get(key, (key, True))[1]


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key.startswith(_PERCENT):
        return f"{100 * value:.1f}%"
    return f"{value:.4f}"


def metric_order(keys: Sequence[str]) -> list[str]:
    def rank(key: str) -> tuple[int, int, int, str]:
        match = re.fullmatch(r"knn_top1_k(\d+)", key)
        if match:
            return (0, 0, int(match.group(1)), key)
        match = _RETRIEVAL.fullmatch(key)
        if match:
            return (2, list(_DIRECTION).index(match.group(1)), int(match.group(2)), key)
        fixed = list(_FIXED_METRICS)
        return (1, 0, fixed.index(key), key) if key in fixed else (3, 0, 0, key)

    return sorted(set(keys), key=rank)


def best_models(key: str, values: dict[str, float]) -> set[str]:
    """Names holding the best value of `key` at the precision shown (ties all count)."""
    if not values:
        return set()
    digits = 3 if key.startswith(_PERCENT) else 4
    shown = {name: round(v, digits) for name, v in values.items()}
    best = (max if higher_is_better(key) else min)(shown.values())
    return {name for name, v in shown.items() if v == best}


# --------------------------------------------------------------------------- figures


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def pca_rgb(patches: Tensor) -> np.ndarray:
    """[n,h,w,D] -> uint8 [n,h,w,3]: the first 3 principal components (fitted on all n images
    together, by SVD of the centred features), each scaled by its 1st..99th percentile to 0..255."""
    n, h, w, d = patches.shape
    flat = patches.reshape(-1, d).double()
    flat = flat - flat.mean(dim=0, keepdim=True)
    _u, _s, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = (flat @ vh[:3].T).numpy()
    if proj.shape[1] < 3:
        proj = np.concatenate([proj, np.zeros((proj.shape[0], 3 - proj.shape[1]))], axis=1)
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    scaled = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    return (scaled.reshape(n, h, w, 3) * 255).round().astype(np.uint8)


def cosine_maps(patches: Tensor, query: tuple[int, int, int]) -> np.ndarray:
    """Cosine similarity [n,h,w] of every patch of every image to patch (image, row, col)."""
    image, row, col = query
    x = F.normalize(patches.float(), dim=-1)
    return torch.einsum("nhwd,d->nhw", x, x[image, row, col]).numpy()


def colormap(values: np.ndarray, vmin: float = -1.0, vmax: float = 1.0) -> np.ndarray:
    """float [...] -> uint8 [..., 3] through matplotlib's viridis."""
    from matplotlib import colormaps

    scaled = np.clip((values - vmin) / (vmax - vmin), 0, 1)
    return (colormaps["viridis"](scaled)[..., :3] * 255).round().astype(np.uint8)


def _tile(array: np.ndarray, tile: int) -> Image.Image:
    return Image.fromarray(array).resize((tile, tile), Image.Resampling.NEAREST)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


_LINE = 14  # pixel height of a label line (11 px text)


def feature_figure(images: Tensor, rows: Sequence[np.ndarray], tile: int = 96, gap: int = 4,
                   query: tuple[int, int, int, int] | None = None,
                   labels: Sequence[str] | None = None) -> bytes:
    """A grid PNG: the images on top, then one row per map ([n,h,w,3] uint8 each).

    `query` = (image, row, col, grid side) draws a red square on that patch of the image row;
    `labels` (one per image) are written, word-wrapped, under each column.
    """
    n = images.shape[0]
    font = ImageFont.load_default(size=11) if labels else None  # bundled (a bitmap font without FreeType)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, tile, font) for label in labels] if labels else []
    text_height = (gap + _LINE * max(len(w) for w in wrapped)) if wrapped else 0
    height = (1 + len(rows)) * tile + len(rows) * gap + text_height
    canvas = Image.new("RGB", (n * tile + (n - 1) * gap, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x = i * (tile + gap)
        canvas.paste(Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((tile, tile), Image.Resampling.BICUBIC), (x, 0))
        for r, maps in enumerate(rows, start=1):
            canvas.paste(_tile(maps[i], tile), (x, r * (tile + gap)))
        for line_no, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, (1 + len(rows)) * (tile + gap) + line_no * _LINE), line, fill=(0, 0, 0), font=font)
    if query is not None:
        image, row, col, grid = query
        cell = tile / grid
        x0 = image * (tile + gap) + col * cell
        draw.rectangle([x0, row * cell, x0 + cell - 1, (row + 1) * cell - 1], outline=(255, 0, 0), width=2)
    return png_bytes(canvas)


def text_query_figure(images: Tensor, maps: np.ndarray, queries: Sequence[str], tile: int = 96) -> bytes:
    """The images, the patch-text cosine similarity map [n,h,w] of each one's query (each map scaled
    to its own min..max: patch-text similarities span a narrow range), and the queries as labels."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    scaled = (maps - lo) / np.maximum(hi - lo, 1e-8)
    return feature_figure(images, [colormap(scaled, 0.0, 1.0)], tile, labels=queries)


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line of a running job
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


_TELEMETRY = ("_per_s", "_pct", "elapsed_s")  # throughput logged next to the losses: not a training curve


def _curve_rank(key: str) -> tuple[int, str]:
    """Total loss first, then the loss terms, then schedules and the rest."""
    if key in ("loss", "total", "total_loss"):
        return (0, key)
    if any(term in key for term in ("loss", "dino", "ibot", "koleo", "gram", "clip")):
        return (1, key)
    return (2, key)


def curves_png(rows: Sequence[dict[str, Any]], title: str) -> bytes | None:
    """One subplot per logged scalar (losses first, throughput left out), against step; None when
    nothing is plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.endswith(_TELEMETRY)},
                  key=_curve_rank)[:8]
    if not keys:
        return None
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- report content


@dataclass
class ModelSection:
    name: str
    description: str
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    pca_png: bytes | None = None
    sim_png: bytes | None = None
    curves_png: bytes | None = None
    notes: list[str] = field(default_factory=list)
    text_png: bytes | None = None  # text-query similarity maps (models with a text tower)
    text_queries: list[str] = field(default_factory=list)  # their queries, left to right


@dataclass
class Report:
    title: str
    dataset: str
    dataset_info: dict[str, Any]
    models: list[ModelSection]
    notes: list[str] = field(default_factory=list)  # skipped measures and why, data fixes
    reference: str | None = None
    created_at: str = ""


def lineage_rows(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What the report shows about where a Model came from."""
    if not manifest:
        return []
    timm_spec = manifest.get("timm") or {}
    own = {"artifact": "this model", "kind": manifest.get("kind"), "stage": manifest.get("stage"),
           "step": manifest.get("step"), "arch": manifest.get("arch") or timm_spec.get("name"),
           "created_at": manifest.get("created_at")}
    rows = [own]
    for entry in manifest.get("inputs") or []:
        if isinstance(entry, dict):
            rows.append({"artifact": entry.get("name"), "kind": entry.get("kind"), "stage": entry.get("stage"),
                         "manifest_sha256": str(entry.get("manifest_sha256", ""))[:12], "path": entry.get("path")})
    return rows


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _table(report: Report) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    keys = metric_order([k for m in report.models for k in m.metrics])
    rows = []
    for key in keys:
        values = {m.name: m.metrics[key] for m in report.models if key in m.metrics}
        best = best_models(key, values) if len(values) > 1 else set()
        rows.append([(metric_label(key), False)] +
                    [(format_value(key, values.get(m.name)), m.name in best) for m in report.models])
    return keys, rows


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th:first-child,td:first-child,table.lineage td,table.lineage th{text-align:left}th{background:#f3f3f3}td.best{font-weight:bold;background:#eef7ee}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.3em 0}
.model{margin-bottom:2em}img{image-rendering:pixelated;max-width:100%}small{color:#666}
"""


def render_html(report: Report) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(report.title)}</h1>",
           f"<p>Eval dataset: <code>{esc(report.dataset)}</code> — "
           + ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in report.dataset_info.items())
           + (f"<br><small>created {esc(report.created_at)}</small>" if report.created_at else "") + "</p>"]
    for note in report.notes:
        out.append(f"<div class='note'>{esc(note)}</div>")
    out.append("<h2>Comparison</h2>")
    _keys, rows = _table(report)
    if rows:
        out.append("<table><tr><th>metric</th>" + "".join(f"<th>{esc(m.name)}</th>" for m in report.models) + "</tr>")
        for row in rows:
            cells = [f"<td>{esc(row[0][0])}</td>"]
            cells += [f"<td class='best'>{esc(v)}</td>" if best else f"<td>{esc(v)}</td>" for v, best in row[1:]]
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        if report.reference:
            out.append(f"<p><small>Gram metrics compare each model with the reference model "
                       f"<b>{esc(report.reference)}</b>.</small></p>")
    else:
        out.append("<p>No metric could be measured.</p>")
    for m in report.models:
        out.append(f"<div class='model' id='model-{esc(safe_name(m.name))}'><h2>{esc(m.name)}</h2>")
        out.append(f"<p>{esc(m.description)}<br><small>"
                   + ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in m.info.items()) + "</small></p>")
        for note in m.notes:
            out.append(f"<div class='note'>{esc(note)}</div>")
        if m.pca_png:
            out.append("<h3>PCA feature maps</h3><p><small>Top: eval images. Bottom: first three principal "
                       "components of the patch features as RGB.</small></p>")
            out.append(f"<img class='pca' data-model='{esc(m.name)}' alt='PCA feature maps of {esc(m.name)}' "
                       f"src='{_data_uri(m.pca_png)}'>")
        if m.sim_png:
            out.append("<h3>Cosine similarity to a query patch</h3><p><small>The red square marks the query "
                       "patch; brighter = more similar (viridis, -1..1).</small></p>")
            out.append(f"<img class='sim' data-model='{esc(m.name)}' alt='similarity map of {esc(m.name)}' "
                       f"src='{_data_uri(m.sim_png)}'>")
        if m.text_png:
            queries = "; ".join(f"“{q}”" for q in m.text_queries)
            out.append("<h3>Text queries</h3><p><small>Cosine similarity of each patch embedding to the "
                       "text query written under the image (viridis, each map scaled to its own min..max). "
                       f"Queries, left to right: {esc(queries)}.</small></p>")
            out.append(f"<img class='text' data-model='{esc(m.name)}' alt='text query maps of {esc(m.name)}: "
                       f"{esc(queries)}' src='{_data_uri(m.text_png)}'>")
        if m.curves_png:
            out.append("<h3>Training curves</h3>")
            out.append(f"<img class='curves' data-model='{esc(m.name)}' alt='training curves of {esc(m.name)}' "
                       f"src='{_data_uri(m.curves_png)}'>")
        if m.lineage:
            cols = list(dict.fromkeys(k for r in m.lineage for k in r))
            out.append("<h3>Lineage</h3><table class='lineage'><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
            for r in m.lineage:
                out.append("<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in cols) + "</tr>")
            out.append("</table>")
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(report: Report, image_dir: str | None = "images") -> str:
    """Markdown twin of the HTML; figures are linked from `image_dir` (relative) when given."""
    lines = [f"# {report.title}", "", f"Eval dataset: `{report.dataset}` — "
             + ", ".join(f"{k}: {v}" for k, v in report.dataset_info.items()), ""]
    for note in report.notes:
        lines.append(f"> **Note:** {note}")
    if report.notes:
        lines.append("")
    lines += ["## Comparison", ""]
    _keys, rows = _table(report)
    if rows:
        lines.append("| metric | " + " | ".join(m.name for m in report.models) + " |")
        lines.append("|---|" + "---:|" * len(report.models))
        for row in rows:
            cells = [row[0][0]] + [f"**{v}**" if best else v for v, best in row[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        if report.reference:
            lines += ["", f"Gram metrics compare each model with the reference model **{report.reference}**."]
    else:
        lines.append("No metric could be measured.")
    for m in report.models:
        lines += ["", f"## {m.name}", "", m.description, ""]
        if m.info:
            lines.append(", ".join(f"{k}: {v}" for k, v in m.info.items()))
            lines.append("")
        for note in m.notes:
            lines.append(f"> **Note:** {note}")
        if image_dir:
            stem = safe_name(m.name)
            for png, kind, title in ((m.pca_png, "pca", "PCA feature maps"),
                                     (m.sim_png, "sim", "query-patch similarity"),
                                     (m.text_png, "text", "text-query similarity"),
                                     (m.curves_png, "curves", "training curves")):
                if png:
                    lines.append(f"![{title} of {m.name}]({image_dir}/{kind}_{stem}.png)")
                    if kind == "text":
                        lines.append("")
                        queries = "; ".join(f"“{q}”" for q in m.text_queries)
                        lines.append(f"Text queries, left to right: {queries} (patch-text cosine similarity, "
                                     "each map scaled to its own min..max).")
                        lines.append("")
        if m.lineage:
            cols = list(dict.fromkeys(k for r in m.lineage for k in r))
            lines += ["", "Lineage:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in m.lineage:
                lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def figure_files(report: Report) -> dict[str, bytes]:
    """Relative file name -> PNG bytes for every figure (what `render_markdown` links to)."""
    files = {}
    for m in report.models:
        stem = safe_name(m.name)
        for png, kind in ((m.pca_png, "pca"), (m.sim_png, "sim"), (m.text_png, "text"),
                          (m.curves_png, "curves")):
            if png:
                files[f"{kind}_{stem}.png"] = png
    return files
