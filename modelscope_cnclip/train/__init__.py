"""Finetuning: the ModelScope trainer ``cnclip-trainer`` and the pieces it is made of."""
from .dataset import PairDataset, collate_pairs, read_pairs
from .loss import contrastive_loss, gather_features
from .trainer import TRAINER_TYPE, CNClipTrainer, build_optimizer, steps_per_epoch, warmup_cosine

__all__ = ['CNClipTrainer', 'TRAINER_TYPE', 'PairDataset', 'collate_pairs', 'read_pairs', 'contrastive_loss',
           'gather_features', 'build_optimizer', 'warmup_cosine', 'steps_per_epoch']
