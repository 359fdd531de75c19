"""Step 4a, embed: the space hierarchical k-means clusters the train pool in, from a configurable backbone.

- "layout": a colour layout (YCbCr means on an 8x8 grid, in [-1, 1]; like MPEG-7's Colour Layout
  descriptor). No network, works offline, computed during ingest. It groups images by colour and
  composition, not by meaning; use it for CI and when no trained backbone is at hand. (The
  copy-detection descriptor of gramline.curate.dedup is deliberately blind to global colour, so it
  is no clustering space.)
- "timm:<name>": a timm model, with a local weights file (`weights`) or timm's own download
  (`pretrained: true`; not possible offline), built with `kwargs`.
- "model:<dir>": the backbone of a gramline Model artifact (e.g. an earlier pretrain run).

Network embeddings: shorter side resized to `img_size`, centre crop, the model's normalisation,
pooled features, L2-normalised. Batched, with progress lines; each ingest chunk's embeddings are
saved in the work directory, so a resumed run embeds only what is missing. The model runs on
`embed.device` (auto: the task's GPU when it has one, in bf16 autocast, else the CPU in float32);
images are decoded and resized on `embed.workers` threads (PIL releases the GIL), which is what
keeps a GPU fed.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gramline.curate.log import log
from gramline.curate.split import Selection
from gramline.curate.workdir import PartDir, WorkDir, save_npy
from gramline.errors import InputError
from gramline.progress import Progress


class Embedder:
    """Turns encoded images into L2-normalised float32 vectors."""

    dim: int
    name: str

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        raise NotImplementedError


LAYOUT_CELLS = 8
LAYOUT_DIM = 3 * LAYOUT_CELLS**2


def colour_layout(image: Image.Image) -> np.ndarray:
    """[192] float32: YCbCr means on an 8x8 grid, scaled to [-1, 1]."""
    thumb = image.convert("RGB").resize((LAYOUT_CELLS, LAYOUT_CELLS), Image.Resampling.BOX, reducing_gap=2.0)
    return ((np.asarray(thumb.convert("YCbCr"), dtype=np.float32) - 128.0) / 128.0).ravel()


class LayoutEmbedder(Embedder):
    """Colour layout. Curation itself uses the vectors stored at ingest instead of decoding again."""

    name = "layout"
    dim = LAYOUT_DIM

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        out = [colour_layout(_decode(data)) for data in images]
        return np.stack(out) if out else np.zeros((0, self.dim), np.float32)


def resolve_device(device: str) -> str:
    """`embed.device` as a torch device string: auto is the GPU when there is one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device):
        if device != "cpu" and not torch.cuda.is_available():
            raise InputError(f"embed.device {device!r}", "names a GPU, and this task has none",
                             "auto or cpu on a task without a GPU")
        return device
    raise InputError(f"embed.device {device!r}", "is not a device", "auto, cpu, cuda or cuda:N")


class TorchEmbedder(Embedder):
    def __init__(self, model: Any, name: str, img_size: int, batch_size: int, threads: int = 0,
                 device: str = "cpu", workers: int = 1) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.name, self.img_size, self.batch_size = name, img_size, batch_size
        self.pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32,
                                 device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32,
                                device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            probe = self._forward(torch.zeros(1, 3, img_size, img_size, device=self.device))
        self.dim = int(probe.shape[-1])

    def _forward(self, x: Any) -> Any:
        out = self.model(x)
        if isinstance(out, dict):  # gramline Backbone-style outputs
            out = out.get("cls", next(iter(out.values())))
        if out.ndim == 3:  # unpooled tokens: take the class token
            out = out[:, 0]
        return out

    def _prepare(self, data: bytes) -> np.ndarray:
        image = _decode(data)
        scale = self.img_size / min(image.size)
        w, h = max(self.img_size, round(image.width * scale)), max(self.img_size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
        image = image.crop((left, top, left + self.img_size, top + self.img_size))
        return np.asarray(image, dtype=np.uint8)

    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        import torch

        prepare = self.pool.map if self.pool is not None else map
        on_gpu = self.device.type == "cuda"
        outs = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack(list(prepare(self._prepare, images[start:start + self.batch_size])))
            x = torch.from_numpy(batch).to(self.device, non_blocking=on_gpu).permute(0, 3, 1, 2).float().div_(255)
            x = (x - self.mean) / self.std
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                feats = self._forward(x).float()
            outs.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def build_embedder(backbone: str, weights: str | None = None, pretrained: bool = False,
                   kwargs: dict[str, Any] | None = None, img_size: int = 224, batch_size: int = 64,
                   threads: int = 0, device: str = "cpu", workers: int = 1) -> Embedder:
    """The embedder `embed.backbone` names, its network on `device` (`embed.device`, auto included)
    with `workers` decoding threads (0: one per CPU); a model that cannot be built is an InputError."""
    if backbone == "layout":
        return LayoutEmbedder()
    device, workers = resolve_device(device), workers or os.cpu_count() or 1
    if backbone.startswith("model:"):
        from gramline.models.io import load_backbone

        model, _manifest = load_backbone(Path(backbone[len("model:"):]), flag="embed.backbone")
        return TorchEmbedder(model, backbone, img_size, batch_size, threads, device, workers)
    if backbone.startswith("timm:"):
        name = backbone[len("timm:"):]
        extra = dict(kwargs or {})
        if pretrained and weights is None:
            import timm

            try:
                model = timm.create_model(name, pretrained=True, **{"num_classes": 0, **extra})
            except Exception as err:  # hub errors come in many types
                raise InputError(f"embed.backbone {backbone!r}",
                                 f"pretrained weights could not be loaded ({type(err).__name__}: {err})",
                                 "network access to the model hub, or a local file in embed.weights") from err
        else:
            from gramline.models.io import load_timm_backbone

            model = load_timm_backbone(name, weights, **extra)
        return TorchEmbedder(model, backbone, img_size, batch_size, threads, device, workers)
    raise InputError(f"embed.backbone {backbone!r}", "is not a known kind", "layout, timm:<name> or model:<dir>")



def _iter_chunk_images(work: WorkDir, n_chunks: int, rows_wanted: np.ndarray) -> Iterator[tuple[int, list[bytes]]]:
    """(chunk id, image bytes of the wanted rows in that chunk), chunk by chunk."""
    wanted = set(rows_wanted.tolist())
    offset = 0
    for i in range(n_chunks):
        table = pq.read_table(work.chunk(i), columns=["image"])
        rows = [r for r in range(table.num_rows) if offset + r in wanted]
        images = table.column("image").take(pa.array(rows, pa.int64())).to_pylist() if rows else []
        yield i, images
        offset += table.num_rows


def embed_part(part: PartDir, n_chunks: int, embedder: Embedder, what: str = "") -> None:
    """Embed every valid image of the partition's chunks into `chunk-N.emb.npy` (its rows as in the
    chunk's layout file) for embed.where=partitions; a chunk embedded before is skipped."""
    todo = [i for i in range(n_chunks) if not part.embedding(i).is_file()]
    progress = Progress(prefix="curate", what=f"embed ({embedder.name}){what}", total=n_chunks, unit="chunks",
                        stream=sys.stderr, start_at=n_chunks - len(todo))
    for i in todo:
        table = pq.read_table(part.chunk(i), columns=["status", "image"])
        images = [image for status, image in zip(table.column("status").to_pylist(), table.column("image").to_pylist())
                  if status == "ok"]
        emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
        save_npy(part.embedding(i), emb.astype(np.float32))
        progress.update(i + 1)
    progress.finish()


def embed_pool(work: WorkDir, sel: Selection, n_chunks: int, embedder: Embedder | None,
               stored: str | None = None) -> np.ndarray:
    """[n_pool, dim] float32 embeddings of the train pool, in row order: the network embeddings the
    partitions stored when `stored` names their backbone, else `embedder`'s, or with `embedder`
    None the colour layouts stored at ingest."""
    pool_rows = np.flatnonzero(sel.pool_mask)
    if embedder is None or stored:
        row_of_valid = np.full(len(sel.valid), -1, np.int64)
        row_of_valid[sel.valid_rows] = np.arange(len(sel.valid_rows))
        files = work.partition_embedding if stored else work.layout
        vectors = np.concatenate([np.load(files(i)) for i in range(n_chunks)])
        log(f"embed: {stored or 'colour-layout'} embeddings for {len(pool_rows)} images (computed in the partitions)")
        return vectors[row_of_valid[pool_rows]].astype(np.float32)
    progress = Progress(prefix="curate", what=f"embed ({embedder.name})", total=len(pool_rows), unit="img",
                        stream=sys.stderr)
    outs, done = [], 0
    for chunk_id, images in _iter_chunk_images(work, n_chunks, pool_rows):
        path = work.embedding(chunk_id)
        if path.is_file():
            emb = np.load(path)
        else:
            emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
            save_npy(path, emb.astype(np.float32))
        outs.append(emb)
        done += len(images)
        progress.update(done)
    progress.finish()
    return np.concatenate(outs) if outs else np.zeros((0, embedder.dim), np.float32)
