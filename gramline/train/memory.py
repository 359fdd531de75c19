"""What a DINO training step holds per GPU: the model state (exact, from parameter counts) and the
activations (measured), and from them the largest per-GPU batch that fits a given memory.

Activations are measured on one student forward and backward (through its heads and the DINO and
iBOT losses) of the real architecture: on CUDA with `torch.cuda.max_memory_allocated`, elsewhere
by counting every tensor the step allocates and frees (torch's MemTracker) over fake tensors, which
stand for tensors of the same sizes but run no arithmetic, so even a 7B block measures in seconds
on a CPU. Activations per image are the peak with 2 images minus the peak with 1. For a backbone
deeper than a ViT-L they are extrapolated: a0 + d·a1 for d blocks, a line through 2 and 4 blocks
extended to the full depth (on vits16 this formula is 9% under the full-depth measurement without
checkpointing and 25% over it with full checkpointing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gramline.losses.dino import dino_loss
from gramline.losses.ibot import ibot_loss
from gramline.models.archs import ARCHS
from gramline.train.recipes.dino.config import DinoConfig
from gramline.train.recipes.dino.model import DinoModel

GIB = 1 << 30
USABLE_FRACTION = 0.9  # of a GPU's memory: the rest for the CUDA context, NCCL buffers, fragmentation


@dataclass(frozen=True)
class ModelSizes:
    student: int  # backbone + DINO and iBOT heads (the EMA teacher is the same)
    backbone: int  # a Gram teacher's size
    largest_unit: int  # the largest FSDP2 unit (a block, a head, the backbone's own parameters)

    @classmethod
    def of(cls, config: DinoConfig) -> ModelSizes:
        with torch.device("meta"):
            model = DinoModel(config.backbone, config.heads)
        count = lambda module: sum(p.numel() for p in module.parameters())
        units = [count(b) for b in model.backbone.vit.blocks] + [count(h) for h in model.heads().values()]
        blocks = sum(count(b) for b in model.backbone.vit.blocks)
        return cls(count(model), count(model.backbone), max([*units, count(model.backbone) - blocks]))


def state_bytes(sizes: ModelSizes, world: int, fsdp: bool, gram_teacher: bool) -> float:
    """Parameters, gradients, AdamW moments and teachers per GPU, all fp32. Under FSDP2 all of it is
    sharded over `world`, plus the units being gathered (the current and the prefetched one: bf16
    parameters and fp32 gradients before their reduce-scatter); under DDP it is replicated, the
    gradients have a second copy in DDP's buckets and autocast keeps a bf16 copy of every weight
    for backward (under FSDP2 the gathered parameters are already bf16)."""
    per_param = 4 + 4 + 8 + 4  # student, its gradient, AdamW's two moments, EMA teacher
    total = sizes.student * per_param + (sizes.backbone * 4 if gram_teacher else 0)
    if fsdp:
        return total / world + 2 * sizes.largest_unit * (2 + 4)
    return total + sizes.student * (4 + 2)


@dataclass(frozen=True)
class Activations:
    per_image: float  # bytes of the student step per image at the backbone's full depth
    depths: tuple[int, ...]  # the depths measured (the full one, or two from which it is extrapolated)


def measure_activations(config: DinoConfig, checkpointing: str, device: torch.device,
                        dtype: torch.dtype | None = torch.bfloat16, max_measured_depth: int = 24) -> Activations:
    """Activations of the student step per image (see the module doc) under autocast to `dtype`:
    the difference between 2 images and 1 at the full depth up to `max_measured_depth` blocks; for
    deeper backbones, per-image cost a0 + d·a1 fitted at 2 and 4 blocks and extended to the full depth."""
    depth = ARCHS[config.backbone.arch].depth
    peak = lambda b, d: step_peak_bytes(config, b, d, checkpointing, device, dtype)
    if depth <= max_measured_depth:
        return Activations(peak(2, None) - peak(1, None), (depth,))
    low, high = 2, 4
    per_image = {d: peak(2, d) - peak(1, d) for d in (low, high)}
    a1 = (per_image[high] - per_image[low]) / (high - low)
    return Activations(per_image[low] + (depth - low) * a1, (low, high))


def step_peak_bytes(config: DinoConfig, batch: int, depth: int | None, checkpointing: str, device: torch.device,
                    dtype: torch.dtype | None = torch.bfloat16) -> int:
    """Peak bytes allocated by one student forward + backward on `batch` images, the backbone cut to
    its first `depth` blocks (None: all), with `checkpointing` (none, selective, full)."""
    with torch.device("meta"):
        model = DinoModel(config.backbone, config.heads)
    if depth is not None:
        model.backbone.vit.blocks = model.backbone.vit.blocks[:depth]
    model.backbone.activation_checkpointing = checkpointing
    if device.type == "cuda":
        model = model.to_empty(device=device)
        return _cuda_peak(device, lambda: _student_step(model, config, batch, device, dtype))
    return _tracked_peak(model, lambda fake: _student_step(fake, config, batch, device, dtype))


def _student_step(model: nn.Module, config: DinoConfig, batch: int, device: torch.device,
                  dtype: torch.dtype | None) -> None:
    crops, n_local = config.crops, config.crops.n_local
    side = crops.global_size // model.backbone.patch_size
    masking = config.masking
    n_masked = round(2 * batch * side * side * masking.sample_probability * (masking.min_ratio + masking.max_ratio) / 2)
    images = torch.randn(2 * batch, 3, crops.global_size, crops.global_size, device=device)
    local = torch.randn(n_local * batch, 3, crops.local_size, crops.local_size, device=device)
    masks = torch.zeros(2 * batch, side * side, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        out = model(images, local, masks, torch.arange(n_masked, device=device))
    targets = torch.softmax(torch.randn_like(out["dino_global"], dtype=torch.float32), -1).view(2, batch, -1)
    loss = dino_loss(out["dino_global"].float().view(2, batch, -1), targets, ignore_diagonal=True)
    if n_local:
        loss = loss + dino_loss(out["dino_local"].float().view(n_local, batch, -1), targets)
    ibot_targets = torch.softmax(torch.randn_like(out["ibot"], dtype=torch.float32), -1)
    weights = torch.full((n_masked,), 1.0 / max(n_masked, 1), device=device)
    loss = loss + ibot_loss(out["ibot"].float(), ibot_targets, weights, n_crops=2 * batch)
    loss.backward()


def _cuda_peak(device: torch.device, step: Callable[[], None]) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


def _tracked_peak(model: nn.Module, step: Callable[[nn.Module], None]) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with _quiet(), FakeTensorMode(allow_non_fake_inputs=True):
        fake = model.to_empty(device="cpu")
        tracker = MemTracker()
        tracker.track_external(fake)
        with tracker:
            step(fake)
        snapshot = tracker.get_tracker_snapshot("peak")
    return int(sum(stats["Total"] for stats in snapshot.values()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def largest_batch(memory_bytes: float, state: float, activations: Activations) -> int:
    """The most images per GPU whose step fits `memory_bytes` (of which USABLE_FRACTION is used)."""
    return max(0, math.floor((memory_bytes * USABLE_FRACTION - state) / activations.per_image))
