"""ModelScope-free training pieces: pair datasets from every data source, the contrastive loss, the optimizer and
its schedule. The ModelScope trainer ``cnclip-trainer`` that drives them lives in :mod:`modelscope_cnclip.ms.trainer`.
"""
from modelscope_cnclip.train.checkpoints import latest_checkpoint
from modelscope_cnclip.train.dataset import EpochShuffleSampler, PairDataset, SplitImage, collate_pairs, read_pairs
from modelscope_cnclip.train.loss import contrastive_loss, gather_features
from modelscope_cnclip.train.schedule import build_optimizer, steps_per_epoch, warmup_cosine

__all__ = ['PairDataset', 'SplitImage', 'EpochShuffleSampler', 'collate_pairs', 'read_pairs', 'contrastive_loss',
           'gather_features', 'build_optimizer', 'warmup_cosine', 'steps_per_epoch', 'latest_checkpoint']
