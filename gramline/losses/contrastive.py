"""The LiT / CLIP contrastive loss over the global batch (dino.txt, DINOv3 paper §6; official
`dinov3/eval/text/clip_loss.py`), through open_clip's `ClipLoss`.

Symmetric InfoNCE: image i's positive is text i among every text of the global batch, and text i's
is image i. Features are L2-normalised here; the logits are exp(logit_scale) x cosine, with no bias.
Under torch.distributed each rank scores its own rows against the texts and images gathered from
every rank (gathered with their gradients), so memory grows with local x global batch, not global²;
the mean of the ranks' losses is the global loss, and the gradient on a rank's features is
world_size times the global loss's, which DDP's mean over ranks turns into the global gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss  # type: ignore[import-untyped]
from torch import Tensor


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """This rank's loss; `image` [B, E] and `text` [B, E] are pairs, row by row."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    with torch.autocast(image.device.type, enabled=False):
        return loss(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), logit_scale.float().exp())
