"""The optimizer and learning-rate schedule of the official Chinese-CLIP training, and the number of steps an
epoch really has (refusing training that cannot learn)."""
from __future__ import annotations

import logging
import math

import torch

__all__ = ['build_optimizer', 'warmup_cosine', 'steps_per_epoch']

logger = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D parameters (norms, biases), embeddings' gains and ``logit_scale``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or 'logit_scale' in name or '.bn' in name or 'ln_' in name else decay).append(p)
    return torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.0},
                              {'params': decay, 'weight_decay': weight_decay}], lr=lr, betas=betas, eps=eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr, then cosine decay to 0 (per optimizer step)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(n_pairs: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Training steps in one epoch: each of ``world_size`` processes draws ``ceil(n_pairs / world_size)`` pairs
    (:class:`EpochShuffleSampler`) in batches of ``batch_size``, the last one dropped when short with ``drop_last``.

    Raises:
        ValueError: training that cannot learn: no pairs, a global batch of 1 (no negatives: the contrastive loss
            is 0 at every step), or no step at all in an epoch (fewer pairs than one batch with ``drop_last``).
    """
    if n_pairs < 1:
        raise ValueError('the training data holds no pairs; check the dataset and dataset.column_map')
    if batch_size < 1 or batch_size * world_size < 2:
        raise ValueError(f'a global batch of {batch_size * world_size} pair(s) (train.dataloader.batch_size_per_gpu='
                         f'{batch_size} on {world_size} process(es)) has no negatives: the contrastive loss is 0 at '
                         f'every step and nothing is learned; use a batch of at least 2 (the official models train '
                         f'with 128-180 pairs per GPU)')
    per_rank = -(-n_pairs // world_size)
    steps = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    if steps == 0:
        raise ValueError(f'{n_pairs} training pairs on {world_size} process(es) make no batch of {batch_size} with '
                         f'drop_last=true, so an epoch would train nothing; lower train.dataloader.batch_size_per_gpu'
                         f' to at most {per_rank} (--batch-size) or set train.dataloader.drop_last to false')
    if not drop_last and per_rank % batch_size == 1 and world_size == 1:
        logger.warning('%d training pairs in batches of %d: the last batch of every epoch holds 1 pair, whose '
                       'contrastive loss is 0; set train.dataloader.drop_last to true or change the batch size',
                       n_pairs, batch_size)
    return steps
