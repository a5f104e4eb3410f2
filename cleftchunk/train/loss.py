"""The training loss: the original class-rebalanced BCE, with an optional Dice term."""

from __future__ import annotations


import torch
from torch.nn import functional as F



# -- loss ------------------------------------------------------------------------------------------
def weighted_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, max_weight: float | None = None) -> torch.Tensor:
    """The original class-rebalanced BCE, on logits, averaged over valid voxels.

    Per sample: wf = clamp(mean(y), min=0.01), weight = y·(1 − wf)/wf + (1 − y); ``max_weight``
    caps the positive weight (1: plain BCE, whose probabilities are calibrated instead of pushed
    towards 1 on every dark voxel).
    """
    logits, target = logits.float(), target.float()
    mask = torch.ones_like(target) if mask is None else mask.float()
    dims = tuple(range(1, target.ndim))
    valid = mask.sum(dims, keepdim=True).clamp(min=1)
    wf = ((target * mask).sum(dims, keepdim=True) / valid).clamp(min=0.01)
    positive = (1 - wf) / wf
    if max_weight is not None:
        positive = positive.clamp(max=max_weight)
    weight = (target * positive + (1 - target)) * mask
    total = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return total / mask.sum().clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice over valid voxels, averaged over samples."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    mask = torch.ones_like(target) if mask is None else mask.float()
    dims = tuple(range(1, target.ndim))
    inter = (prob * target * mask).sum(dims)
    total = (prob * mask).sum(dims) + (target * mask).sum(dims)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def training_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, dice: float = 0.0,
                  max_weight: float | None = None) -> torch.Tensor:
    loss = weighted_bce(logits, target, mask, max_weight)
    if dice:
        loss = loss + dice * dice_loss(logits, target, mask)
    return loss


def loss_name(dice: float = 0.0, max_weight: float | None = None) -> str:
    """How reports name the loss that :func:`training_loss` computes with these settings."""
    if max_weight is None:
        bce = "class-rebalanced BCE"
    elif max_weight <= 1:
        bce = "BCE"
    else:
        bce = f"BCE with positive weight ≤ {max_weight:g}"
    return f"{bce} + {dice:g}·Dice" if dice else bce
