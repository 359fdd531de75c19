"""Batching of `CropSet`s into crop-major tensors plus the iBOT masks of the global crops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from gramline.data.augment import CropSet
from gramline.data.config import MaskingConfig
from gramline.data.masking import sample_batch_masks
from gramline.data.photometric_batch import BatchOps, DeferredOps
from gramline.errors import InputError


@dataclass
class CropBatch:
    """Crop-major: rows [c*B:(c+1)*B] of each tensor are crop c of every image."""

    global_crops: torch.Tensor  # [n_g*B, 3, G, G]
    local_crops: torch.Tensor  # [n_l*B, 3, L, L]; shape [0, 3, 0, 0] when there are no local crops
    gram_crops: torch.Tensor | None  # [n_g*B, 3, Gg, Gg]
    masks: torch.Tensor  # [n_g*B, N] bool, True = masked patch of the student's global crop
    batch_size: int
    # set when the crops are uint8 with their photometrics still to run: `to(device)` runs them there
    deferred: DeferredOps | None = None

    @property
    def n_global(self) -> int:
        return self.global_crops.shape[0] // self.batch_size

    @property
    def n_local(self) -> int:
        return self.local_crops.shape[0] // self.batch_size

    def _map(self, fn) -> CropBatch:  # type: ignore[no-untyped-def]
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        """The batch on `device`; deferred photometrics are run there, so the result is always the
        normalised float32 crops."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        if self.deferred is None:
            return moved
        global_crops, local_crops, gram_crops = self.deferred.to(device, non_blocking).finish(
            moved.global_crops, moved.local_crops, moved.gram_crops)
        return replace(moved, global_crops=global_crops, local_crops=local_crops, gram_crops=gram_crops,
                       deferred=None)

    def pin_memory(self) -> CropBatch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return self._map(lambda t: t.pin_memory())


def _stack_crop_major(per_image: Sequence[Sequence[torch.Tensor]], name: str) -> torch.Tensor:
    n_crops = len(per_image[0])
    if any(len(crops) != n_crops for crops in per_image):
        raise InputError(name, "differ in number between images", "the same number of crops for every image")
    shapes = {tuple(t.shape) for crops in per_image for t in crops}
    if len(shapes) > 1:
        raise InputError(name, f"have different shapes {sorted(shapes)}", "one crop size per batch")
    return torch.stack([crops[c] for c in range(n_crops) for crops in per_image])


def collate_crops(items: Sequence[CropSet], patch_size: int, masking: MaskingConfig, seed: int,
                  mask_batch_size: int | None = None) -> CropBatch:
    """Stack a list of CropSets crop-major and sample the global crops' masks from `seed` (for
    `mask_batch_size` images per global crop, default this batch's: a caller taking a slice of a
    larger batch's masks asks for that batch's)."""
    if not items:
        raise InputError("batch", "is empty", "at least one CropSet")
    batch_size = len(items)
    global_crops = _stack_crop_major([it.global_crops for it in items], "global crops")
    size = global_crops.shape[-1]
    if patch_size <= 0 or size % patch_size:
        raise InputError("patch_size", f"is {patch_size}", f"a positive divisor of the global crop size {size}")
    if items[0].local_crops:
        local_crops = _stack_crop_major([it.local_crops for it in items], "local crops")
    else:
        local_crops = torch.empty(0, 3, 0, 0, dtype=global_crops.dtype)
    gram_crops = None
    if items[0].gram_crops is not None:
        if any(it.gram_crops is None for it in items):
            raise InputError("gram crops", "are missing for some images", "gram crops for all images or none")
        gram_crops = _stack_crop_major([it.gram_crops for it in items], "gram crops")  # type: ignore[misc]
    grid = (size // patch_size, size // patch_size)
    n_masks = global_crops.shape[0] // batch_size * (mask_batch_size or batch_size)
    masks = sample_batch_masks(n_masks, grid, masking.sample_probability, masking.min_ratio,
                               masking.max_ratio, rng=np.random.default_rng(seed))
    return CropBatch(global_crops, local_crops, gram_crops, torch.from_numpy(masks), batch_size,
                     _deferred_ops(items))


def _deferred_ops(items: Sequence[CropSet]) -> DeferredOps | None:
    """The crop-major per-row ops of a batch of deferred CropSets (None when they are finished)."""
    pending = items[0].pending
    if pending is None:
        if any(it.pending is not None for it in items):
            raise InputError("crops", "are partly finished", "photometrics deferred for all images or none")
        return None
    n_global, n_local = len(items[0].ops.global_ops), len(items[0].ops.local_ops)
    global_ops = [it.ops.global_ops[c] for c in range(n_global) for it in items]
    local_ops = [it.ops.local_ops[c] for c in range(n_local) for it in items]
    return DeferredOps(BatchOps.of(global_ops), BatchOps.of(local_ops),
                       BatchOps.of(global_ops) if pending.gram_photometric else None, pending.mean, pending.std)
