"""ModelScope trainer ``cnclip-trainer``: the finetune tutorial's configuration keys, on CPU or GPU(s).

A thin adapter over ModelScope's ``EpochBasedTrainer``: this module supplies the contrastive training step, the
optimizer (AdamW without decay on norms, biases and ``logit_scale``), the warmup + cosine schedule, global
retrieval evaluation and a plugin-layout output dir; ModelScope's hooks do the rest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from modelscope.trainers import EpochBasedTrainer
from modelscope.trainers.builder import TRAINERS
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.hook import Hook
from modelscope.utils.config import Config

from modelscope_cnclip.checkpoints.convert import numpy_safe_globals
from modelscope_cnclip.checkpoints.layouts import default_configuration, write_dir
from modelscope_cnclip.evaluation.retrieval import evaluate_pairs
from modelscope_cnclip.ms import CLAMP_HOOK_TYPE, MODEL_TYPE, PIPELINE_TYPE, PREPROCESSOR_TYPE, TRAINER_TYPE
from modelscope_cnclip.ms.model import CNClipForMultiModalEmbedding, plugin_configuration
from modelscope_cnclip.train.dataset import EpochShuffleSampler, PairDataset, collate_pairs, read_pairs
from modelscope_cnclip.train.loss import contrastive_loss
from modelscope_cnclip.train.schedule import build_optimizer, steps_per_epoch, warmup_cosine

__all__ = ['CNClipTrainer', 'TRAINER_TYPE', 'merge_config']

logger = logging.getLogger(__name__)
LOGIT_SCALE_MAX = math.log(100)
# Tutorial hook names that import ModelScope's CUDA-only CLIP trainer, and this plugin's equivalents.
_HOOK_RENAMES = {'ClipClampLogitScaleHook': CLAMP_HOOK_TYPE}
_EVAL_HOOKS = ('EvaluationHook', 'BestCkptSaverHook')


class _SamplerEpochHook(Hook):
    """Tell the train sampler which epoch starts (also after a resume), for a reproducible order; and seed the
    random generators from (seed, epoch, rank), so an epoch's dropout and masking do not depend on what ran before
    it. ModelScope restores the generators it saved only at the first step of a resumed run, after the epoch's data
    loader has already drawn from them, so a run resumed from ``epoch_N.pth`` would otherwise drift from an
    uninterrupted one as soon as the model has dropout."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_train_epoch(self, trainer: Any) -> None:
        import random

        import numpy as np
        import torch
        sampler = getattr(trainer.train_dataloader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(trainer.epoch)
        seed = (self.seed * 1_000_003 + trainer.epoch * 1009 + int(os.environ.get('RANK', 0))) % (2 ** 32)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # all devices
        for hook in trainer.hooks:  # ModelScope's own restore would now undo this at the first step
            if getattr(hook, 'need_load_rng_state', False):
                hook.need_load_rng_state = False


@HOOKS.register_module(module_name=CLAMP_HOOK_TYPE)
class CNClipClampLogitScaleHook(Hook):
    """Clamp ``logit_scale`` to [0, ln 100] after every optimizer step, as the official training does."""

    def after_train_iter(self, trainer: Any) -> None:
        model = getattr(trainer.model, 'module', trainer.model)
        model.clip.logit_scale.data.clamp_(0, LOGIT_SCALE_MAX)


def merge_config(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` over ``base``: nested dicts merge key by key; any other value (a list of hooks or metrics, a
    scalar, a value of another type) replaces the old one. Unlike ModelScope's ``Config.merge_from_dict``, a
    user's ``train.hooks`` list is taken as written (not merged with the defaults by hook type), and a value whose
    type differs from the default's (the tutorial's ``"preprocessor": []``) is no error."""
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _merged_config(cfg_file: str | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Repo defaults, then the user's configuration file, then explicit overrides (later wins, see
    :func:`merge_config`); the keys the plugin owns (``model``, ``pipeline``, ``preprocessor``) are its own, whatever
    the file says (the tutorial's name ModelScope's built-in CLIP classes)."""
    d = default_configuration()
    for data in (Config.from_file(cfg_file).to_dict() if cfg_file else None, overrides):
        d = merge_config(d, data or {})
    d['model'] = {**(d.get('model') if isinstance(d.get('model'), Mapping) else {}), 'type': MODEL_TYPE}
    d['pipeline'], d['preprocessor'] = {'type': PIPELINE_TYPE}, {'type': PREPROCESSOR_TYPE}
    for hook in d.get('train', {}).get('hooks', []):
        hook['type'] = _HOOK_RENAMES.get(hook['type'], hook['type'])
    # The tutorial names CUDA AMP; on a CPU (or with use_fp16 off) ModelScope's plain optimizer hook does the job.
    opt_hook = d['train'].get('optimizer_hook')
    if opt_hook and opt_hook.get('type') == 'TorchAMPOptimizerHook' and not torch.cuda.is_available():
        opt_hook['type'] = 'OptimizerHook'
    d['train']['lr_scheduler_hook'] = {'type': 'LrSchedulerHook', 'by_epoch': False}
    return d


def _init_distributed(device: str | None) -> str:
    """Join the process group that ``torchrun`` describes: NCCL on GPUs, gloo on CPUs (ModelScope's own
    launcher is CUDA-only). Returns the device this rank trains on."""
    dist = torch.distributed
    cuda = torch.cuda.is_available() and device != 'cpu'
    if not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda:
        local = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local)
        return f'cuda:{local}'
    return 'cpu'


def _numpy_rng_state_allowed() -> Any:
    """ModelScope's trainer state (written by this trainer into work_dir) holds numpy RNG arrays, which
    ``torch.load(weights_only=True)`` refuses; allow exactly numpy's array reconstruction while resuming."""
    return torch.serialization.safe_globals(numpy_safe_globals())


def _check_options(amp: str | None, accum_freq: int, mask_ratio: float) -> None:
    if not 0 <= mask_ratio < 1:
        raise ValueError(f'mask_ratio={mask_ratio}: the share of image patches FLIP drops must be in [0, 1) '
                         f'(0.5 in the FLIP paper; 0 trains on whole images)')
    if amp not in (None, 'bf16', 'fp16'):
        raise ValueError(f"amp={amp!r}: choose None, 'bf16' or 'fp16'")
    if amp == 'fp16' and not torch.cuda.is_available():
        raise ValueError("amp='fp16' needs CUDA (a loss-scaled GPU mode); on a CPU use amp='bf16'")
    if accum_freq < 1:
        raise ValueError(f'accum_freq={accum_freq} must be >= 1')


def _drop_eval_hooks(cfg: dict[str, Any]) -> None:
    """Without evaluation data the evaluation hooks would only fail later, mid-training: disable them."""
    hooks = cfg['train'].get('hooks', [])
    dropped = [h['type'] for h in hooks if h['type'] in _EVAL_HOOKS]
    cfg['train']['hooks'] = [h for h in hooks if h['type'] not in _EVAL_HOOKS]
    if dropped:
        logger.info('no eval_dataset: %s disabled', dropped)


def _optimizer_and_schedule(cfg: dict[str, Any], clip: torch.nn.Module,
                            steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW from ``train.optimizer_hparams`` and warmup + cosine over the run's ``steps`` scheduler steps (the
    schedule steps once per training iteration)."""
    hp = cfg['train']['optimizer_hparams']
    optimizer = build_optimizer(clip, hp['lr'], hp['weight_decay'], (hp['beta1'], hp['beta2']), hp['eps'])
    warmup = int(cfg['train'].get('lr_scheduler', {}).get('warmup_proportion', 0.1) * steps)
    return optimizer, warmup_cosine(optimizer, max(1, steps), warmup)


@TRAINERS.register_module(module_name=TRAINER_TYPE)
class CNClipTrainer(EpochBasedTrainer):
    """Finetune Chinese CLIP with ModelScope's trainer machinery.

    Args:
        model: a :class:`CNClipForMultiModalEmbedding` or any source it loads (dir of any layout, ``.pt``, hub id);
            default: the configuration's ``pretrained_model.model_name``.
        cfg_file: a configuration.json (e.g. the finetune tutorial's); its keys override the repo defaults.
        train_dataset / eval_dataset: an ``MsDataset`` or list of dict rows (columns named by
            ``dataset.column_map``), an official-format dir, or a jsonl of ``{"image", "text"}`` lines.
        work_dir: where logs, checkpoints and ``output/`` (a loadable plugin model dir) go.
        cfg_overrides: dict of config keys to override, e.g. ``{'train': {'max_epochs': 3}}``.
        mask_ratio: FLIP patch masking ratio during training (ViT only); freeze_vision: train the text tower only;
        grad_checkpointing: trade compute for activation memory; full_grad_gather: all-gather with gradients.
        skip_errors: skip unreadable images (each reported once) instead of stopping.
        accum_freq: split each batch into this many chunks that go through the network one at a time, while the
            loss still contrasts every pair of the whole batch (features of the other chunks are cached, as the
            official training does): the memory of a chunk, the negatives of the batch.
        amp: ``'bf16'`` runs forward passes under autocast in bfloat16 (CPUs with AVX512-BF16/AMX, and GPUs; no
            loss scaling needed); ``'fp16'`` is ModelScope's ``use_fp16`` (CUDA AMP with a loss scaler).
    """

    def __init__(self, model: Any = None, cfg_file: str | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, work_dir: str | None = None, cfg_overrides: Mapping | None = None,
                 mask_ratio: float = 0.0, freeze_vision: bool = False, grad_checkpointing: bool = False,
                 full_grad_gather: bool = False, skip_errors: bool = False, device: str | None = None,
                 accum_freq: int = 1, amp: str | None = None, **kwargs: Any) -> None:
        _check_options(amp, accum_freq, mask_ratio)
        cfg = _merged_config(cfg_file, cfg_overrides)
        if model is None:  # the tutorial's configuration names the model to start from
            model = (cfg.get('pretrained_model') or {}).get('model_name')
            if not model:
                raise ValueError('no model to train: pass model=... (a model dir, weights file or hub id) or set '
                                 'pretrained_model.model_name in the configuration')
        if not isinstance(model, CNClipForMultiModalEmbedding):
            model = CNClipForMultiModalEmbedding(str(model), device=device or 'cpu')
        if model.clip is None:
            model.to_checkpoint()  # raises: an exported model has no weights to train (the message names the source)
        if amp == 'fp16':
            kwargs['use_fp16'] = True
        self.amp, self.accum_freq, self.mask_ratio = amp, accum_freq, mask_ratio
        self.full_grad_gather, self.freeze_vision = full_grad_gather, freeze_vision

        if eval_dataset is None:
            _drop_eval_hooks(cfg)
        work_dir = work_dir or cfg['train'].get('work_dir', './work')
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        merged_file = Path(work_dir) / 'configuration.json'
        merged_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding='utf-8')

        column_map = cfg.get('dataset', {}).get('column_map')
        self.train_pairs, self.eval_pairs = (
            PairDataset(read_pairs(data, split, column_map), model.transform, model.tokenizer, skip_errors)
            if data is not None else None for data, split in ((train_dataset, 'train'), (eval_dataset, 'valid')))

        model.clip.set_grad_checkpointing(grad_checkpointing)
        if freeze_vision:
            for p in model.clip.visual.parameters():
                p.requires_grad_(False)
        world = int(os.environ.get('WORLD_SIZE', 1))
        if world > 1 and not kwargs.get('launcher'):
            device = _init_distributed(device)
            model.to(device)
        loader = cfg['train']['dataloader']
        self.steps_per_epoch = 0 if self.train_pairs is None else steps_per_epoch(
            len(self.train_pairs), loader['batch_size_per_gpu'], world, bool(loader.get('drop_last', False)))
        optimizers = _optimizer_and_schedule(cfg, model.clip, cfg['train']['max_epochs'] * self.steps_per_epoch)
        samplers = None
        if self.train_pairs is not None:
            samplers = {'train': EpochShuffleSampler(len(self.train_pairs), kwargs.get('seed', 42),
                                                     int(os.environ.get('RANK', 0)), world,
                                                     cfg['train']['dataloader'].get('shuffle', True)), 'val': None}

        # ModelScope asks the hub whether a local model dir is up to date (slow or hanging offline); a model
        # object without model_dir skips that check.
        model_dir = model.__dict__.pop('model_dir', None)
        try:
            super().__init__(model=model, cfg_file=str(merged_file), train_dataset=self.train_pairs,
                             eval_dataset=self.eval_pairs, data_collator=collate_pairs, work_dir=work_dir,
                             optimizers=optimizers, device=device, samplers=samplers, **kwargs)
        finally:
            model.model_dir = model_dir
        self.register_hook(_SamplerEpochHook(kwargs.get('seed', 42)))
        self.ddp_clip = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and not kwargs.get('launcher'):
            # Only the network is wrapped, so the ModelScope model (and what it saves) keeps plain names.
            ids = [torch.cuda.current_device()] if next(model.clip.parameters()).is_cuda else None
            self.ddp_clip = torch.nn.parallel.DistributedDataParallel(model.clip, device_ids=ids)
        self.global_batch_size = cfg['train']['dataloader']['batch_size_per_gpu'] * world

    def build_dataset(self, datasets: Any = None, model_cfg: Any = None, mode: Any = None, preprocessor: Any = None,
                      **kwargs: Any) -> Any:
        """The datasets were built in ``__init__`` (:class:`PairDataset`); none is built from the config."""
        return datasets

    # --- training -----------------------------------------------------------------------------------------------

    def train_step(self, model: Any, inputs: Mapping[str, torch.Tensor]) -> None:
        model.train()
        clip = self.ddp_clip or getattr(model, 'module', model).clip
        if self.freeze_vision:
            getattr(clip, 'module', clip).visual.eval()  # keeps RN50's BatchNorm statistics frozen too
        with self._autocast(inputs['input_ids'].device):
            if self.accum_freq == 1:
                img, txt, scale = clip(inputs['pixel_values'], inputs['input_ids'], mask_ratio=self.mask_ratio)
                loss, _ = contrastive_loss(img.float(), txt.float(), scale, gather=True,
                                           full_grad=self.full_grad_gather)
            else:
                loss = self._accumulated_step(clip, inputs)
        self.train_outputs = {'loss': loss}
        scale = getattr(clip, 'module', clip).logit_scale
        self.log_buffer.update({'loss': float(loss.detach()), 'logit_scale': float(scale.detach()),
                                'global_batch_size': self.global_batch_size})

    def train(self, *args: Any, **kwargs: Any) -> None:
        """Train, then make ``work_dir/output`` a complete plugin model dir with the final weights (ModelScope's
        own output step writes a ``.bin`` beside it, which is replaced)."""
        with _numpy_rng_state_allowed():
            super().train(*args, **kwargs)
        if self._dist_rank0():
            model = getattr(self.model, 'module', self.model)
            out = Path(self.work_dir) / 'output'
            model.save_pretrained(out, config=self.cfg.to_dict())
            logger.info('finetuned model written to %s', out)
            self._write_best_output(model)

    def _write_best_output(self, model: Any) -> None:
        """Make ``output_best`` a plugin dir holding the best checkpoint's weights. ModelScope fills it with the
        starting weights and later links a ``.bin`` beside them; a stale dir would look loadable, so it is removed
        when no best checkpoint was saved."""
        best_dir = Path(self.work_dir) / 'output_best'
        best = next((h for h in self.hooks if type(h).__name__ == 'BestCkptSaverHook'), None)
        prefix = getattr(best, '_best_ckpt_file', None)
        if not prefix:
            if best_dir.exists():
                shutil.rmtree(best_dir)
            return
        state = torch.load(f'{prefix}.pth', map_location='cpu', weights_only=True)
        state = state.get('state_dict', state)
        ckpt = model.to_checkpoint()
        ckpt.state_dict = {k[len('clip.'):]: v for k, v in state.items() if k.startswith('clip.')}
        write_dir(ckpt, best_dir, to='plugin', overwrite=True, configuration=plugin_configuration(self.cfg))
        logger.info('best checkpoint (%s) written to %s', Path(prefix).name, best_dir)

    @staticmethod
    def _dist_rank0() -> bool:
        return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_rank() == 0

    def _autocast(self, device: torch.device) -> Any:
        """The step's forward runs here, not through ModelScope's model.forward wrapper, so autocast is ours
        (fp16 losses are still scaled by ModelScope's AMP optimizer hook)."""
        if self.amp:
            return torch.autocast(device.type, dtype=torch.bfloat16 if self.amp == 'bf16' else torch.float16)
        return contextlib.nullcontext()

    def _accumulated_step(self, clip: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Backward chunk by chunk against cached features of the whole batch; returns a graph-less loss for the
        optimizer hook (whose backward then has nothing left to do)."""
        if getattr(self, 'use_fp16', False) or any(type(h).__name__ == 'TorchAMPOptimizerHook' for h in self.hooks):
            raise ValueError('accum_freq > 1 does not combine with fp16 AMP (the loss scaler needs one backward); '
                             'use accum_freq=1 or train without use_fp16')
        pixels = inputs['pixel_values'].chunk(self.accum_freq)
        ids = inputs['input_ids'].chunk(self.accum_freq)
        with torch.no_grad():
            cached = [clip(p, i, mask_ratio=self.mask_ratio)[:2] for p, i in zip(pixels, ids)]
        total = torch.zeros((), device=inputs['input_ids'].device)
        for j, (p, i) in enumerate(zip(pixels, ids)):
            img_j, txt_j, scale = clip(p, i, mask_ratio=self.mask_ratio)
            img = torch.cat([img_j if k == j else c[0] for k, c in enumerate(cached)])
            txt = torch.cat([txt_j if k == j else c[1] for k, c in enumerate(cached)])
            # logit_scale takes its gradient once, not once per chunk
            loss, _ = contrastive_loss(img, txt, scale if j == 0 else scale.detach(), gather=True,
                                       full_grad=self.full_grad_gather)
            loss.backward()
            total += loss.detach()
        # Not a leaf: ModelScope's optimizer hook divides the loss in place (cumulative_iters) before its backward,
        # which then reaches only a throwaway zero leaf; the gradients are already in place.
        return torch.zeros((), device=total.device, requires_grad=True) + total / self.accum_freq

    # --- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.eval_pairs is None:
            raise ValueError('no eval_dataset was given to the trainer; pass eval_dataset=... to evaluate')
        return super().evaluate(*args, **kwargs)

    def evaluation_loop(self, data_loader: Any, metric_classes: Any) -> dict[str, float]:
        """Global retrieval metrics over the distinct images and texts of the evaluation pairs, plus the tutorial's
        in-batch recall over consecutive chunks of ``evaluation.dataloader.batch_size_per_gpu`` pairs.

        The pairs are read directly (each image and text embedded once, images streamed through the threaded
        decode), not through ``data_loader``: its ``shuffle``/``drop_last`` and the dataset's skip_errors
        replacement would change which pairs are scored. With skip_errors, unreadable images and their pairs are
        left out (logged, and added to ``eval_dataset.skipped``); without it they stop evaluation naming the image.
        """
        model = getattr(self.model, 'module', self.model)
        model.eval()
        batch_size = int(self.cfg.safe_get('evaluation.dataloader.batch_size_per_gpu', 64))
        try:
            scores = evaluate_pairs(model.core, self.eval_pairs.pairs, batch_size, self.eval_pairs.skip_errors)
        finally:
            model.train()
        if scores['skipped']:
            self.eval_pairs.skipped.extend(i for i in scores['skipped'] if i not in self.eval_pairs.skipped)
            logger.warning('evaluation: %d unreadable images and their pairs left out: %s', len(scores['skipped']),
                           scores['skipped'][:10])
        metrics = {f'{d}_recall_at_{k[1:]}' if k != 'mr' else f'{d}_mean_recall': v
                   for d in ('t2i', 'i2t') for k, v in scores[d].items()}
        metrics.update(scores['inbatch'])
        return metrics
