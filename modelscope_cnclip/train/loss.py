"""Symmetric InfoNCE over features gathered from every rank (local gradient by default, full gradient by choice)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ['gather_features', 'contrastive_loss']


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(img: torch.Tensor, txt: torch.Tensor, full_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``(B, D)`` features as ``(world * B, D)``. With ``full_grad`` the gradient flows through the
    gather to every rank; otherwise (the official default) only this rank's slice keeps its gradient."""
    rank, world = _world()
    if world == 1:
        return img, txt
    if full_grad:
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(img)), torch.cat(all_gather(txt))
    out = []
    for local in (img, txt):
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach())
        parts[rank] = local
        out.append(torch.cat(parts))
    return out[0], out[1]


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True,
                     full_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP loss on L2-normalised ``(B, D)`` features: mean of image->text and text->image cross entropy with the
    matching pair as the label. Returns ``(loss, logits_per_image)`` (this rank's rows)."""
    rank, world = _world()
    all_img, all_txt = gather_features(img, txt, full_grad) if gather else (img, txt)
    logits_img = logit_scale * img @ all_txt.T  # (B, world*B)
    logits_txt = logit_scale * txt @ all_img.T
    labels = torch.arange(img.shape[0], device=img.device) + (rank * img.shape[0] if gather and world > 1 else 0)
    loss = (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2
    return loss, logits_img
