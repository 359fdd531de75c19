"""DINOv3 losses as plain functions over tensors (DINOv3 paper §3-4; official `dinov3/loss/`).

All compute in fp32 (autocast is switched off inside) and treat teacher inputs as constants.
`sinkhorn_knopp` and `koleo_loss_distributed` use collectives when torch.distributed is
initialised, so every rank must call them.
"""

from gramline.losses.dino import dino_loss
from gramline.losses.gram import gram_loss
from gramline.losses.ibot import ibot_loss, ibot_mask_weights
from gramline.losses.koleo import koleo_loss, koleo_loss_distributed
from gramline.losses.sinkhorn import sinkhorn_knopp
from gramline.losses.total import LossWeights, combine_losses, dino_pair_weights

__all__ = [
    "LossWeights",
    "combine_losses",
    "dino_loss",
    "dino_pair_weights",
    "gram_loss",
    "ibot_loss",
    "ibot_mask_weights",
    "koleo_loss",
    "koleo_loss_distributed",
    "sinkhorn_knopp",
]
