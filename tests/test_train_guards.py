"""train/ and ms/trainer.py with configurations and data as users have them: ModelScope's finetune tutorial
configuration as published, training that cannot learn, the schedule sized from the real steps, gradient
accumulation end to end, and datasets in DataLoader workers started with spawn."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from modelscope.trainers import build_trainer
from PIL import Image

import modelscope_cnclip  # noqa: F401  (registers the trainer)
from modelscope_cnclip.checkpoints.layouts import Checkpoint, default_configuration, read_source, write_dir
from modelscope_cnclip.cli import main
from modelscope_cnclip.data import make_synthetic_split, open_split, write_lmdb_split
from modelscope_cnclip.ms.trainer import merge_config
from modelscope_cnclip.train import read_pairs, steps_per_epoch

from helpers import TINY_VIT_NO_DROPOUT as CFG
from helpers import random_state_dict


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory) -> Path:
    return write_dir(Checkpoint(random_state_dict(CFG), CFG), tmp_path_factory.mktemp('m') / 'model')


def colour_rows(n: int) -> list[dict]:
    """MUGE-style rows (``image``, ``query``), as an MsDataset of MUGE iterates."""
    return [{'image': Image.new('RGB', (64, 64), (i * 5 % 256, 255 - i * 5 % 256, 90)), 'query': f'颜色{i}'}
            for i in range(n)]


def tutorial_config(work_dir: Path, eval_loader: dict | None = None) -> dict:
    """ModelScope's published finetune configuration for Chinese CLIP (its tests/trainers/test_clip_trainer.py),
    with a small batch for the CPU."""
    loader = {'batch_size_per_gpu': 8, 'workers_per_gpu': 0, 'shuffle': True, 'drop_last': True}
    return {
        'framework': 'pytorch', 'task': 'multi-modal-embedding', 'pipeline': {'type': 'multi-modal-embedding'},
        'pretrained_model': {'model_name': 'damo/multi-modal_clip-vit-base-patch16_zh'},
        'dataset': {'column_map': {'img': 'image', 'text': 'query'}},
        'train': {'work_dir': str(work_dir), 'max_epochs': 1, 'use_fp16': True, 'dataloader': dict(loader),
                  'lr_scheduler': {'name': 'cosine', 'warmup_proportion': 0.01},
                  'lr_scheduler_hook': {'type': 'LrSchedulerHook', 'by_epoch': False},
                  'optimizer': {'type': 'AdamW'}, 'optimizer_hparams': {'lr': 5e-05, 'weight_decay': 0.01},
                  'optimizer_hook': {'type': 'TorchAMPOptimizerHook', 'cumulative_iters': 1, 'loss_keys': 'loss'},
                  'loss_cfg': {'aggregate': True},
                  'hooks': [{'type': 'BestCkptSaverHook', 'metric_key': 'inbatch_t2i_recall_at_1', 'interval': 100},
                            {'type': 'TextLoggerHook', 'interval': 1}, {'type': 'IterTimerHook'},
                            {'type': 'EvaluationHook', 'by_epoch': True, 'interval': 1},
                            {'type': 'ClipClampLogitScaleHook'}]},
        'evaluation': {'dataloader': dict(eval_loader or loader), 'metrics': [{'type': 'inbatch_recall'}]},
        'preprocessor': []}


# --- the tutorial's configuration -------------------------------------------------------------------------------------

def test_tutorial_configuration_runs_as_published(model_dir, tmp_path):
    cfg_file = tmp_path / 'configuration.json'
    cfg_file.write_text(json.dumps(tutorial_config(tmp_path / 'ws')))
    rows = colour_rows(44)
    # the tutorial's call, with only the trainer name changed (and a local model)
    trainer = build_trainer(name='cnclip-trainer', default_args=dict(
        model=str(model_dir), work_dir=str(tmp_path / 'ws'), train_dataset=rows, eval_dataset=rows[:20],
        metrics=['inbatch_recall'], cfg_file=str(cfg_file)))
    trainer.train()
    merged = json.loads((tmp_path / 'ws' / 'configuration.json').read_text())
    assert merged['preprocessor'] == {'type': 'cnclip-preprocessor'} and merged['model']['type'] == 'cnclip'
    # the user's hooks as written (not type-merged with the defaults), the tutorial's clamp hook mapped
    assert [h['type'] for h in merged['train']['hooks']] == [
        'BestCkptSaverHook', 'TextLoggerHook', 'IterTimerHook', 'EvaluationHook', 'CNClipClampLogitScaleHook']
    assert merged['train']['hooks'][3] == {'type': 'EvaluationHook', 'by_epoch': True, 'interval': 1}
    # evaluation scores each of the 20 pairs once, whatever the loader's shuffle/drop_last (20 is not a multiple of 8)
    shuffled = trainer.evaluate()
    plain_cfg = tutorial_config(tmp_path / 'ws2', {'batch_size_per_gpu': 8, 'workers_per_gpu': 0, 'shuffle': False,
                                                    'drop_last': False})
    (tmp_path / 'plain.json').write_text(json.dumps(plain_cfg))
    plain = build_trainer(name='cnclip-trainer', default_args=dict(
        model=trainer.model, work_dir=str(tmp_path / 'ws2'), eval_dataset=rows[:20], cfg_file=str(tmp_path /
                                                                                                   'plain.json')))
    assert plain.evaluate() == shuffled


def test_model_from_the_configurations_pretrained_model(model_dir, tmp_path):
    cfg = tutorial_config(tmp_path / 'ws')
    cfg['pretrained_model']['model_name'] = str(model_dir)
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    trainer = build_trainer('cnclip-trainer', dict(cfg_file=str(tmp_path / 'c.json'), train_dataset=colour_rows(16)))
    assert trainer.model.arch == 'custom' and trainer.steps_per_epoch == 2
    del cfg['pretrained_model']
    (tmp_path / 'c.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'no model to train: pass model=.* or set pretrained_model.model_name'):
        build_trainer('cnclip-trainer', dict(cfg_file=str(tmp_path / 'c.json'), train_dataset=colour_rows(16)))


def test_merge_config_replaces_lists_and_mismatched_types():
    base = default_configuration()
    merged = merge_config(base, {'preprocessor': [], 'train': {'hooks': [{'type': 'TextLoggerHook'}],
                                                               'dataloader': {'batch_size_per_gpu': 4}},
                                 'evaluation': {'metrics': []}})
    assert merged['preprocessor'] == [] and merged['train']['hooks'] == [{'type': 'TextLoggerHook'}]
    assert merged['train']['dataloader'] == {**base['train']['dataloader'], 'batch_size_per_gpu': 4}
    assert merged['evaluation']['metrics'] == [] and merged['train']['max_epochs'] == base['train']['max_epochs']
    assert base == default_configuration()  # not modified in place


# --- training that cannot learn ---------------------------------------------------------------------------------------

def test_steps_per_epoch_and_refusals(caplog):
    assert steps_per_epoch(44, 8, 1, drop_last=True) == 5 and steps_per_epoch(44, 8, 1, drop_last=False) == 6
    assert steps_per_epoch(45, 8, 2, drop_last=True) == 2  # 23 per process
    with pytest.raises(ValueError, match=r'a global batch of 1 pair\(s\) \(train.dataloader.batch_size_per_gpu=1 on '
                                         r'1 process\(es\)\) has no negatives: the contrastive loss is 0'):
        steps_per_epoch(100, 1)
    assert steps_per_epoch(100, 1, world_size=2) == 50  # the gathered batch has 2 pairs
    with pytest.raises(ValueError, match=r'5 training pairs on 1 process\(es\) make no batch of 8 with '
                                         r'drop_last=true.*at most 5 \(--batch-size\) or set '
                                         r'train.dataloader.drop_last to false'):
        steps_per_epoch(5, 8, drop_last=True)
    with pytest.raises(ValueError, match='the training data holds no pairs'):
        steps_per_epoch(0, 8)
    with caplog.at_level(logging.WARNING):
        assert steps_per_epoch(17, 8) == 3
    assert 'the last batch of every epoch holds 1 pair' in caplog.text


def test_trainer_refuses_training_that_cannot_learn(model_dir, tmp_path):
    def trainer(rows, batch, drop_last=True):
        return build_trainer('cnclip-trainer', dict(model=str(model_dir), work_dir=str(tmp_path), train_dataset=rows,
                                                    cfg_overrides={'train': {'dataloader': {
                                                        'batch_size_per_gpu': batch, 'drop_last': drop_last,
                                                        'workers_per_gpu': 0}}}))
    with pytest.raises(ValueError, match='has no negatives'):
        trainer(colour_rows(8), 1)
    with pytest.raises(ValueError, match='5 training pairs .* no batch of 8 with drop_last=true'):
        trainer(colour_rows(5), 8)
    with pytest.raises(ValueError, match='holds no pairs'):
        trainer([], 8)
    assert trainer(colour_rows(5), 8, drop_last=False).steps_per_epoch == 1


def test_schedule_is_sized_from_the_real_steps(model_dir, tmp_path):
    # 44 pairs in batches of 8 with drop_last: 5 steps an epoch, not ceil(44 / 8) = 6
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(model_dir), work_dir=str(tmp_path), train_dataset=colour_rows(44),
        cfg_overrides={'train': {'max_epochs': 2, 'dataloader': {'batch_size_per_gpu': 8, 'drop_last': True,
                                                                 'workers_per_gpu': 0},
                                 'lr_scheduler': {'warmup_proportion': 0.1}}}))
    trainer.train()
    assert trainer.iter == 10
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at the end


# --- spawned DataLoader workers ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_in_spawned_workers_on_official_and_lmdb_data(model_dir, tmp_path):
    data = tmp_path / 'data'
    make_synthetic_split(data, 'train', 32, seed=1)
    make_synthetic_split(data, 'valid', 16, seed=2)
    write_lmdb_split(open_split(data, 'train'), tmp_path / 'lmdb', 'train')
    write_lmdb_split(open_split(data, 'valid'), tmp_path / 'lmdb', 'valid')
    script = tmp_path / 'spawn_train.py'
    script.write_text(textwrap.dedent(f'''
        import json, multiprocessing, sys
        from modelscope_cnclip.cli import main

        if __name__ == '__main__':
            multiprocessing.set_start_method('spawn', force=True)  # macOS/Windows; 3.14 Linux uses forkserver
            for name, source in (('tsv', {str(data)!r}), ('lmdb', {str(tmp_path / 'lmdb')!r})):
                work = {str(tmp_path)!r} + '/w-' + name
                code = main(['train', {str(model_dir)!r}, '--data', source, '--out', work,
                             '--max-epochs', '1', '--batch-size', '8', '--loader-workers', '2', '--device', 'cpu'])
                if code:
                    sys.exit(code)
    '''))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ('tsv', 'lmdb'):
        assert (tmp_path / f'w-{name}' / 'output' / 'model.safetensors').is_file()
    metrics = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{')]
    assert len(metrics) == 2 and all('t2i_recall_at_1' in m for m in metrics)


def test_jsonl_pairs_saved_on_windows(tmp_path):
    """A {"image", "text"} jsonl with a UTF-8 BOM and CRLF line ends reads like a plain one; a bad line is named."""
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    lines = [json.dumps({'image': 'a.png', 'text': '红色'}, ensure_ascii=False), json.dumps({'image': 'a.png',
                                                                                          'text': '蓝色', 'id': 7})]
    (tmp_path / 'train.jsonl').write_bytes(('\ufeff' + '\r\n'.join(lines) + '\r\n').encode('utf-8'))
    pairs = read_pairs(tmp_path / 'train.jsonl')
    want = [('a.png', '红色', str(tmp_path / 'a.png')), ('a.png', '蓝色', 7)]
    assert [(Path(p).name, t, i) for p, t, i in pairs] == want
    (tmp_path / 'bad.jsonl').write_text('{"image": "a.png"}\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r'bad.jsonl:1: expected \{"image": path, "text": ...\}, got \[\'image\'\]'):
        read_pairs(tmp_path / 'bad.jsonl')


def test_gradient_accumulation_trains_end_to_end_like_one_big_batch(model_dir, tmp_path, capsys):
    """accum_freq through ModelScope's whole loop (its optimizer hook divides the loss in place before backward):
    the weights after two steps equal those of plain steps on the same batches."""
    weights = {}
    for accum in (1, 2):
        trainer = build_trainer('cnclip-trainer', dict(
            model=str(model_dir), work_dir=str(tmp_path / f'w{accum}'), train_dataset=colour_rows(16),
            accum_freq=accum, cfg_overrides={'train': {'max_epochs': 1, 'dataloader': {
                'batch_size_per_gpu': 8, 'workers_per_gpu': 0, 'drop_last': True},
                'optimizer_hparams': {'lr': 1e-3}}}))
        trainer.train()
        weights[accum] = trainer.model.clip.state_dict()
    start = read_source(model_dir).state_dict
    keys = [k for k, v in start.items() if v.is_floating_point()]
    # the same updates (Adam turns float noise in near-zero gradients into +-lr, so compare the update directions)
    step1, step2 = (torch.cat([(weights[a][k] - start[k]).flatten() for k in keys]) for a in (1, 2))
    assert step1.norm() > 0 and torch.nn.functional.cosine_similarity(step1, step2, dim=0) > 0.999
    data = tmp_path / 'data'
    make_synthetic_split(data, 'train', 16, seed=3)
    make_synthetic_split(data, 'valid', 8, seed=4)
    assert main(['train', str(model_dir), '--data', str(data), '--eval-data', str(data), '--out',
                 str(tmp_path / 'cli'), '--max-epochs', '1', '--batch-size', '8', '--loader-workers', '0',
                 '--accum-freq', '2']) == 0


def test_mask_ratio_outside_0_1_is_refused(model_dir, tmp_path):
    for ratio in (1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf'mask_ratio={ratio}: the share of image patches FLIP drops must be '
                                             r'in \[0, 1\)'):
            build_trainer('cnclip-trainer', dict(model=str(model_dir), work_dir=str(tmp_path),
                                                 train_dataset=colour_rows(8), mask_ratio=ratio))


def test_cli_train_takes_the_work_dir_of_the_cfg_file(model_dir, tmp_path, monkeypatch):
    data = tmp_path / 'data'
    make_synthetic_split(data, 'train', 16, seed=3)
    make_synthetic_split(data, 'valid', 8, seed=4)
    cfg = tutorial_config(tmp_path / 'from-cfg')
    cfg['train']['dataloader']['batch_size_per_gpu'] = 8
    cfg['train']['hooks'] = [h for h in cfg['train']['hooks'] if h['type'] != 'BestCkptSaverHook']
    (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(['train', str(model_dir), '--data', str(data), '--cfg', str(tmp_path / 'cfg.json'),
                 '--loader-workers', '0']) == 0
    assert (tmp_path / 'from-cfg' / 'output' / 'model.safetensors').is_file() and not (tmp_path / 'work').exists()
