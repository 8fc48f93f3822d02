"""train/ (datasets, loss, optimizer and schedule) and ms/trainer.py: finetuning through ModelScope's trainer on
CPU: learning on generated data, the tutorial's config, data sources, gradient accumulation, resumption, DDP, an
output dir that the pipeline loads as is, and the trainer's evaluation, which scores exactly the evaluation pairs,
each image and text embedded once, whatever the evaluation loader does (the finetune tutorial shuffles it and drops
the last batch) and whichever images are unreadable. Configurations and data as users have them:
test_train_guards.py."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope.utils.constant import Tasks
from PIL import Image

import modelscope_cnclip  # noqa: F401
from modelscope_cnclip import load
from modelscope_cnclip.checkpoints.layouts import Checkpoint, read_source, write_dir
from modelscope_cnclip.cli import main
from modelscope_cnclip.data import make_synthetic_split, write_official_split
from modelscope_cnclip.evaluation.retrieval import evaluate_split
from modelscope_cnclip.train import build_optimizer, contrastive_loss, warmup_cosine

from helpers import TINY_VIT, random_state_dict, train_overrides
from helpers import TINY_VIT_NO_DROPOUT as CFG

overrides = train_overrides


@pytest.fixture(scope='module')
def setup(train_root):
    """The session's training root (conftest.py): data/ (train 512, valid 64 pairs), model/, work/."""
    return train_root


@pytest.mark.slow
def test_training_learns_the_generated_task(trained):
    _, before, after = trained
    chance_r1, chance_r10 = 100 / 64, 1000 / 64  # 64 held-out pairs
    assert before['t2i_recall_at_1'] < 3 * chance_r1
    assert after['t2i_recall_at_1'] >= 4 * chance_r1
    assert after['t2i_recall_at_10'] >= 4 * chance_r10 and after['i2t_recall_at_10'] >= 4 * chance_r10
    assert set(after) >= {'t2i_mean_recall', 'i2t_mean_recall', 'inbatch_t2i_recall_at_1'}


@pytest.mark.slow
def test_output_is_a_plugin_dir_the_pipeline_loads(trained, setup):
    trainer, _, _ = trained
    out = setup / 'work' / 'output'
    assert sorted(p.name for p in out.iterdir()) == ['cnclip_config.json', 'configuration.json',
                                                     'model.safetensors', 'vocab.txt']
    p = pipeline(Tasks.multi_modal_embedding, model=str(out), device='cpu')
    img = Image.new('RGB', (64, 64), (220, 40, 40))
    model = trainer.model
    want = F.normalize(model.clip.encode_image(model.transform(img)[None]).float(), dim=-1)
    assert torch.allclose(p({'img': img})['img_embedding'], want, atol=1e-6)
    # no optimizer state in the weights: exactly the model's tensors
    assert sorted(read_source(out).state_dict) == sorted(model.clip.state_dict())
    conf = json.loads((out / 'configuration.json').read_text())
    assert conf['model']['type'] == 'cnclip' and conf['pipeline']['type'] == 'cnclip-multi-modal-embedding'


def test_tutorial_config_runs_with_only_the_trainer_name_changed(setup, tmp_path):
    tutorial = {
        'framework': 'pytorch', 'task': 'multi-modal-embedding',
        'pipeline': {'type': 'multi-modal-embedding'}, 'model': {'type': 'clip-multi-modal-embedding'},
        'pretrained_model': {'model_name': 'damo/multi-modal_clip-vit-base-patch16_zh'},
        'dataset': {'column_map': {'img': 'image', 'text': 'query'}},
        'train': {'work_dir': str(tmp_path / 'w'), 'max_epochs': 1, 'use_fp16': True,
                  'dataloader': {'batch_size_per_gpu': 16, 'workers_per_gpu': 0, 'shuffle': True, 'drop_last': True},
                  'lr_scheduler': {'name': 'cosine', 'warmup_proportion': 0.01},
                  'optimizer': {'type': 'AdamW'},
                  'optimizer_hparams': {'lr': 2.5e-05, 'weight_decay': 0.001, 'beta1': 0.9, 'beta2': 0.999,
                                        'eps': 1e-08},
                  'optimizer_hook': {'type': 'TorchAMPOptimizerHook', 'cumulative_iters': 1},
                  'loss_cfg': {'aggregate': True},
                  'hooks': [{'type': 'BestCkptSaverHook', 'metric_key': 'inbatch_t2i_recall_at_1', 'interval': 1},
                            {'type': 'TextLoggerHook', 'interval': 1}, {'type': 'IterTimerHook'},
                            {'type': 'EvaluationHook', 'by_epoch': False, 'interval': 1},
                            {'type': 'ClipClampLogitScaleHook'}]},
        'evaluation': {'dataloader': {'batch_size_per_gpu': 16, 'workers_per_gpu': 0, 'shuffle': False,
                                      'drop_last': False}, 'metrics': [{'type': 'inbatch_recall'}]}}
    cfg_file = tmp_path / 'configuration.json'
    cfg_file.write_text(json.dumps(tutorial))
    # MUGE-style rows (an MsDataset iterates the same way), columns mapped by dataset.column_map
    images = [Image.new('RGB', (64, 64), (i * 5, 255 - i * 5, 90)) for i in range(48)]
    rows = [{'image': im, 'query': f'颜色{i}'} for i, im in enumerate(images)]
    trainer = build_trainer('cnclip-trainer', dict(model=str(setup / 'model'), cfg_file=str(cfg_file),
                                                   train_dataset=rows, eval_dataset=rows[:16]))
    trainer.model.clip.logit_scale.data.fill_(6.0)  # above ln 100: the clamp hook must bring it back
    trainer.train()
    assert trainer.model.clip.logit_scale.item() <= math.log(100) + 1e-6
    assert (tmp_path / 'w' / 'output' / 'model.safetensors').is_file()
    # BestCkptSaverHook keyed on the tutorial's in-batch recall: output_best holds that checkpoint's weights
    best = next((tmp_path / 'w').glob('best_*_inbatch_t2i_recall_at_1*[0-9].pth'))
    state = torch.load(best, map_location='cpu', weights_only=True)
    saved = read_source(tmp_path / 'w' / 'output_best').state_dict
    assert all(torch.equal(saved[k[len('clip.'):]], v) for k, v in state.items() if k.startswith('clip.'))


def test_jsonl_source_corrupt_images_and_clear_errors(setup, tmp_path):
    good = tmp_path / 'a.png'
    Image.new('RGB', (32, 32), 'red').save(good)
    (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg')
    lines = [{'image': 'a.png', 'text': '红色'}, {'image': 'bad.jpg', 'text': '坏图', 'id': 'bad-1'}] * 8
    (tmp_path / 'train.jsonl').write_text('\n'.join(json.dumps(x, ensure_ascii=False) for x in lines))
    kw = dict(model=str(setup / 'model'), work_dir=str(tmp_path / 'w'), train_dataset=str(tmp_path / 'train.jsonl'),
              cfg_overrides=overrides(1, batch=4))
    with pytest.raises(ValueError, match=r"image 'bad-1': cannot decode image .* pass skip_errors=True"):
        build_trainer('cnclip-trainer', kw).train()
    trainer = build_trainer('cnclip-trainer', dict(kw, skip_errors=True))
    trainer.train()
    assert trainer.train_pairs.skipped == ['bad-1']
    with pytest.raises(KeyError, match='set dataset.column_map'):
        build_trainer('cnclip-trainer', dict(kw, train_dataset=[{'picture': None, 'caption': 'x'}]))


def test_freeze_vision_flip_masking_checkpointing_and_bf16_amp(setup, tmp_path):
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(setup / 'model'), work_dir=str(tmp_path / 'w'), train_dataset=str(setup / 'data'),
        cfg_overrides=overrides(1), freeze_vision=True, mask_ratio=0.5, grad_checkpointing=True, amp='bf16'))
    before = {k: v.clone() for k, v in trainer.model.clip.visual.state_dict().items()}
    text_before = trainer.model.clip.text_projection.detach().clone()
    trainer.train()
    after = trainer.model.clip.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(text_before, trainer.model.clip.text_projection)
    assert trainer.model.clip.text_projection.dtype == torch.float32  # autocast: fp32 master weights


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only refusal')
def test_fp16_amp_is_refused_on_cpu_with_the_fix(setup, tmp_path):
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA .* on a CPU use amp='bf16'"):
        build_trainer('cnclip-trainer', dict(model=str(setup / 'model'), work_dir=str(tmp_path / 'x'),
                                             train_dataset=str(setup / 'data'), amp='fp16'))


def test_optimizer_groups_schedule_and_loss():
    from modelscope_cnclip.model import CLIP
    model = CLIP(CFG)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6)
    no_decay, decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay['weight_decay'] == 0 and decay['weight_decay'] == 0.1
    assert {names[id(p)] for p in no_decay['params']} >= {'logit_scale', 'visual.ln_post.bias', 'visual.ln_post.weight'}
    assert all(p.dim() >= 2 for p in decay['params'])
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] < 1e-4
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    loss, logits = contrastive_loss(img, txt, torch.tensor(10.0))
    labels = torch.arange(4)
    manual = (F.cross_entropy(10 * img @ txt.T, labels) + F.cross_entropy(10 * txt @ img.T, labels)) / 2
    assert torch.allclose(loss, manual)


def test_cli_train_then_eval(setup, tmp_path, capsys):
    assert main(['train', str(setup / 'model'), '--data', str(setup / 'data'), '--out', str(tmp_path / 'w'),
                 '--max-epochs', '1', '--batch-size', '32', '--loader-workers', '0', '--device', 'cpu']) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 't2i_recall_at_1' in metrics
    assert main(['eval', str(tmp_path / 'w' / 'output'), '--data', str(setup / 'data'), '--split', 'valid']) == 0
    assert set(json.loads(capsys.readouterr().out)) == {'t2i', 'i2t'}


def test_accumulation_keeps_whole_batch_negatives(setup, tmp_path):
    """accum_freq=4 gives the gradient of the whole batch's loss (within float noise), not of 4 small batches."""
    grads = {}
    for accum in (1, 4):
        trainer = build_trainer('cnclip-trainer', dict(
            model=str(setup / 'model'), work_dir=str(tmp_path / f'w{accum}'), train_dataset=str(setup / 'data'),
            cfg_overrides=overrides(1), accum_freq=accum))
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.zero_grad()
        trainer.train_step(trainer.model, batch)
        loss = trainer.train_outputs['loss']
        if accum == 1:
            loss.backward()
        grads[accum] = {n: p.grad.clone() for n, p in trainer.model.clip.named_parameters() if p.grad is not None}
        grads[accum]['loss'] = loss.detach()
    assert torch.allclose(grads[1]['loss'], grads[4]['loss'], atol=1e-5)
    assert grads[1].keys() == grads[4].keys()
    for name in grads[1]:
        assert torch.allclose(grads[1][name], grads[4][name], atol=1e-5, rtol=1e-3), name


def test_resume_after_interruption_equals_an_uninterrupted_run(setup, tmp_path):
    from modelscope.trainers.hooks.hook import Hook

    class Interrupt(Hook):
        def after_train_epoch(self, trainer):
            trainer._stop_training = True

    def make(work):
        return build_trainer('cnclip-trainer', dict(model=str(setup / 'model'), work_dir=str(tmp_path / work),
                                                    train_dataset=str(setup / 'data'), cfg_overrides=overrides(3)))
    full = make('full')
    full.train()
    interrupted = make('resumed')
    interrupted.register_hook(Interrupt())
    interrupted.train()
    assert interrupted.epoch == 1
    resumed = make('resumed')
    resumed.train(checkpoint_path=str(tmp_path / 'resumed' / 'epoch_1.pth'))
    a, b = full.model.clip.state_dict(), resumed.model.clip.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize('gather', ['local', 'full'])
def test_ddp_on_cpu_with_torchrun_keeps_ranks_in_sync(setup, tmp_path, gather):
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path
    root = tmp_path / 'ddp'
    shutil.copytree(setup / 'data', root / 'data')
    shutil.copytree(setup / 'model', root / 'model')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / 'scripts' / 'ddp_train.py'
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                          '--master_addr', '127.0.0.1', '--master_port', str(port), str(script), str(root), gather],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(
                             [str(script.parents[2]), os.environ.get('PYTHONPATH', '')])})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((root / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['digest'] == ranks[1]['digest']  # gradients were averaged: identical weights
    assert ranks[0]['world'] == 2 and ranks[0]['global_batch'] == 32
    assert ranks[0]['iters'] == 2 * 16  # 512 pairs / (16 per rank x 2 ranks) x 2 epochs
    assert (root / 'work' / 'output' / 'model.safetensors').is_file()


def test_official_lmdb_form_trains(setup, tmp_path):
    import pickle

    from modelscope_cnclip.data import LmdbSplit, OfficialSplit, write_lmdb_split
    from modelscope_cnclip.train import read_pairs
    write_lmdb_split(OfficialSplit(setup / 'data', 'train'), tmp_path / 'lmdb', 'train')
    official = list(OfficialSplit(setup / 'data', 'train').pairs())
    lm = LmdbSplit(tmp_path / 'lmdb', 'train')
    assert list(lm.pairs()) == official
    pairs = read_pairs(tmp_path / 'lmdb', 'train')
    assert [(t, i) for _, t, i in pairs] == [(t, i) for _, t, i in official]
    assert pairs[0][0]() == OfficialSplit(setup / 'data', 'train').image_bytes(official[0][2])
    trainer = build_trainer('cnclip-trainer', dict(model=str(setup / 'model'), work_dir=str(tmp_path / 'w'),
                                                   train_dataset=str(tmp_path / 'lmdb'), cfg_overrides=overrides(1)))
    trainer.train()
    # a pair that pickles code is refused
    import lmdb

    class Evil:
        def __reduce__(self):
            return (print, ('owned',))
    write_lmdb_split(OfficialSplit(setup / 'data', 'train'), tmp_path / 'evil', 'train')
    with lmdb.open(str(tmp_path / 'evil' / 'train' / 'pairs'), map_size=1 << 24) as env, env.begin(write=True) as txn:
        txn.put(b'0', pickle.dumps(Evil()))
    with pytest.raises(ValueError, match=r'pairs\[0\]: not an \(image_id, text_id, text\) pair .*refusing to load'):
        LmdbSplit(tmp_path / 'evil', 'train')


def test_msdataset_with_muge_columns(setup, tmp_path):
    import datasets
    from modelscope.msdatasets import MsDataset
    paths = []
    for i in range(32):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.new('RGB', (64, 64), (i * 7, 90, 255 - i * 7)).save(paths[-1])
    ms = MsDataset.to_ms_dataset(datasets.Dataset.from_dict({'image': paths, 'query': [f'颜色{i}' for i in range(32)]}))
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(setup / 'model'), work_dir=str(tmp_path / 'w'), train_dataset=ms, eval_dataset=ms,
        cfg_overrides={**overrides(1, batch=16), 'dataset': {'column_map': {'img': 'image', 'text': 'query'}}}))
    trainer.train()
    assert len(trainer.train_pairs) == 32 and trainer.train_pairs.pairs[3][1] == '颜色3'
    assert 't2i_recall_at_1' in trainer.evaluate()


@pytest.mark.slow
def test_bf16_mode_keeps_retrieval_metrics_of_a_trained_model(trained, setup):
    """Issue 3's fast-mode criterion on a model that has learned something: R@1/5/10 within 0.5 points of exact."""
    from modelscope_cnclip import load
    from modelscope_cnclip.evaluation.retrieval import evaluate_split
    out = setup / 'work' / 'output'
    # every scene once: duplicated captions would be exact ties that any rounding may reorder
    make_synthetic_split(setup / 'unique', 'test', 36, seed=5, unique=True)
    exact = evaluate_split(load(out, precision='fp32'), str(setup / 'unique'), 'test')
    fast = evaluate_split(load(out, precision='bf16'), str(setup / 'unique'), 'test')
    assert exact['t2i']['r1'] > 10 * 100 / 36 and exact['i2t']['r1'] > 10 * 100 / 36  # far above chance
    for direction in ('t2i', 'i2t'):
        for k in ('r1', 'r5', 'r10'):
            assert abs(exact[direction][k] - fast[direction][k]) <= 0.5, (direction, k, exact, fast)


def test_training_without_eval_data_skips_evaluation_hooks(setup, tmp_path):
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(setup / 'model'), work_dir=str(tmp_path / 'w'), train_dataset=str(setup / 'data'),
        cfg_overrides={**overrides(1), 'train': {**overrides(1)['train'], 'hooks': [
            {'type': 'EvaluationHook', 'by_epoch': False, 'interval': 1},
            {'type': 'BestCkptSaverHook', 'metric_key': 't2i_recall_at_1', 'interval': 1}]}}))
    trainer.train()  # the default hooks evaluate; without eval data they are disabled instead of failing
    assert (tmp_path / 'w' / 'output' / 'model.safetensors').is_file()
    with pytest.raises(ValueError, match='no eval_dataset was given'):
        trainer.evaluate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('amp', [None, 'bf16', 'fp16'])
def test_training_on_one_gpu(setup, tmp_path, amp):
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(setup / 'model'), work_dir=str(tmp_path / 'w'), train_dataset=str(setup / 'data'),
        eval_dataset=str(setup / 'data'), device='cuda', amp=amp, cfg_overrides=overrides(2)))
    before = trainer.model.clip.text_projection.detach().clone()
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    assert not torch.equal(before, trainer.model.clip.text_projection.detach())
    assert 't2i_recall_at_1' in trainer.evaluate()
    p = pipeline(Tasks.multi_modal_embedding, model=str(tmp_path / 'w' / 'output'), device='cpu')
    assert p({'text': '红色的圆形'})['text_embedding'].shape == (1, 32)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 GPUs')
def test_ddp_on_two_gpus_with_torchrun(setup, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = tmp_path / 'ddp'
    shutil.copytree(setup / 'data', root / 'data')
    shutil.copytree(setup / 'model', root / 'model')
    script = Path(__file__).parent / 'scripts' / 'ddp_train.py'
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', str(script),
                          str(root), 'local', 'cuda'], capture_output=True, text=True, timeout=900,
                         env={**os.environ, 'PYTHONPATH': str(script.parents[2])})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((root / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0]['digest'] == ranks[1]['digest'] and ranks[0]['world'] == 2


def test_trainer_evaluation_scores_a_text_against_all_its_images(setup, tmp_path):
    # One caption for two images: the official scoring counts either image as correct for that text.
    from modelscope_cnclip.data import TextRecord, write_official_split
    imgs = {i: Image.new('RGB', (64, 64), (i * 30, 60, 90)) for i in range(1, 5)}
    write_official_split(tmp_path / 'd', 'valid', imgs, [TextRecord(1, '两张图', (1, 2)), TextRecord(2, '第三张', (3,)),
                                                         TextRecord(3, '第四张', (4,))])
    trainer = build_trainer('cnclip-trainer', dict(model=str(setup / 'model'), work_dir=str(tmp_path / 'w'),
                                                   eval_dataset=str(tmp_path / 'd'), cfg_overrides=overrides(1)))
    metrics = trainer.evaluate()
    model = trainer.model
    pixels = torch.stack([model.transform(imgs[i]) for i in (1, 2, 3, 4)])
    with torch.no_grad():
        img = F.normalize(model.clip.encode_image(pixels), dim=-1)
        txt = F.normalize(model.clip.encode_text(model.tokenizer(['两张图', '第三张', '第四张'])['input_ids']), dim=-1)
    from modelscope_cnclip.evaluation.retrieval import retrieval_metrics
    want = retrieval_metrics(img, [1, 2, 3, 4], txt, [[1, 2], [3], [4]])
    assert metrics['t2i_recall_at_1'] == pytest.approx(want['t2i']['r1'], abs=1e-3)
    assert metrics['i2t_recall_at_1'] == pytest.approx(want['i2t']['r1'], abs=1e-3)


# --- the trainer's evaluation: exactly the evaluation pairs, whatever the loader ------------------------------------

KEYS = {f'{d}_{k}' for d in ('t2i', 'i2t') for k in ('recall_at_1', 'recall_at_5', 'recall_at_10', 'mean_recall')}
INBATCH = {'inbatch_t2i_recall_at_1', 'inbatch_i2t_recall_at_1'}


@pytest.fixture(scope='module')
def eval_model_dir(tmp_path_factory):
    """A tiny model (with its dropout) that only evaluates."""
    return write_dir(Checkpoint(random_state_dict(TINY_VIT, seed=4), TINY_VIT), tmp_path_factory.mktemp('m') / 'model')


def evaluate(model_dir, work, data, loader=None, **kwargs) -> dict:
    overrides = {'evaluation': {'dataloader': {'batch_size_per_gpu': 8, 'workers_per_gpu': 0, **(loader or {})}}}
    trainer = build_trainer('cnclip-trainer', dict(model=str(model_dir), work_dir=str(work), eval_dataset=str(data),
                                                   cfg_overrides=overrides, **kwargs))
    return trainer, trainer.evaluate()


def test_evaluation_does_not_depend_on_the_loader_options(eval_model_dir, tmp_path):
    make_synthetic_split(tmp_path / 'd', 'valid', 30, seed=8, unique=True)  # 30 pairs: batches of 8 leave 6
    _, plain = evaluate(eval_model_dir, tmp_path / 'a', tmp_path / 'd', {'shuffle': False, 'drop_last': False})
    _, tutorial = evaluate(eval_model_dir, tmp_path / 'b', tmp_path / 'd', {'shuffle': True, 'drop_last': True})
    assert set(plain) == KEYS | INBATCH
    assert tutorial == plain
    # the global numbers are `cnclip eval`'s on the same split
    split = evaluate_split(load(eval_model_dir), tmp_path / 'd', 'valid', batch_size=8)
    for d in ('t2i', 'i2t'):
        assert [plain[f'{d}_recall_at_{k}'] for k in (1, 5, 10)] + [plain[f'{d}_mean_recall']] == \
            [split[d][k] for k in ('r1', 'r5', 'r10', 'mr')]


def test_skip_errors_evaluation_equals_the_split_without_that_pair(eval_model_dir, tmp_path):
    split = make_synthetic_split(tmp_path / 'full', 'valid', 20, seed=9, unique=True)
    images = {i: split.image_bytes(i) for i in split.image_ids}
    bad = split.image_ids[5]
    write_official_split(tmp_path / 'corrupt', 'valid', {**images, bad: b'not a jpeg'}, split.texts)
    write_official_split(tmp_path / 'without', 'valid', {i: b for i, b in images.items() if i != bad},
                         [t for t in split.texts if bad not in t.image_ids])
    trainer, skipped = evaluate(eval_model_dir, tmp_path / 'a', tmp_path / 'corrupt', skip_errors=True)
    _, without = evaluate(eval_model_dir, tmp_path / 'b', tmp_path / 'without')
    assert skipped == without and trainer.eval_pairs.skipped == [bad]
    with pytest.raises(ValueError, match=rf'1 of 20 images cannot be read \(image {bad}: ValueError: cannot decode '
                                         rf'image .*skip_errors=True'):
        evaluate(eval_model_dir, tmp_path / 'c', tmp_path / 'corrupt')
