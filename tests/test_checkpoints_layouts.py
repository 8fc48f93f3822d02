"""checkpoints/layouts.py (with convert.py): every layout this project writes or meets loads back: a cnclip-trainer
run's checkpoint files, state dicts under any one model prefix, sharded weights, and custom sizes whose guessed
fields stay visible."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope.trainers.hooks import CheckpointHook
from modelscope.utils.constant import Tasks

import modelscope_cnclip  # noqa: F401  (registers the plugin)
from modelscope_cnclip import convert, load, read_source
from modelscope_cnclip.checkpoints.convert import (
    GUESSED_FIELDS,
    find_prefix,
    guess_config,
    official_to_hf,
    read_checkpoint,
    shard_plan,
    to_official,
)
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
from modelscope_cnclip.cli import main
from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig, available_models, get_config
from modelscope_cnclip.data import make_synthetic_split
from modelscope_cnclip.model import CLIP

from helpers import TINY_RN, TINY_VIT, assert_same, random_state_dict, write_hub_dir, write_official_pt

# 64-wide heads: the shapes alone give the right config (still a custom size, so its head counts are "guessed").
TINY64 = CLIPConfig(
    embed_dim=32, vision=VisionConfig(image_size=64, layers=1, width=64, patch_size=32, head_width=64),
    text=TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=1,
                    max_position_embeddings=64))
PIPELINE = 'cnclip-multi-modal-embedding'
TEXTS = ['杰尼龟', '一只橘猫趴在窗台上晒太阳']


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- a real cnclip-trainer run's files ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A 2-epoch, 4-step run on 16 generated pairs: epoch_N.pth, iter_N.pth and best_*.pth with their
    *_trainer_state.pth, as ModelScope's CheckpointHook (by epoch and by iteration) and BestCkptSaverHook write them."""
    root = tmp_path_factory.mktemp('run')
    make_synthetic_split(root / 'data', 'train', 16, seed=1)
    make_synthetic_split(root / 'data', 'valid', 8, seed=2)
    write_dir(Checkpoint(random_state_dict(TINY64), TINY64), root / 'model')
    hooks = [{'type': 'BestCkptSaverHook', 'metric_key': 'inbatch_t2i_recall_at_1', 'interval': 2, 'by_epoch': False},
             {'type': 'CheckpointHook', 'by_epoch': True, 'interval': 1},
             {'type': 'EvaluationHook', 'by_epoch': False, 'interval': 2}]
    loader = {'batch_size_per_gpu': 8, 'workers_per_gpu': 0}
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(root / 'model'), work_dir=str(root / 'work'), train_dataset=str(root / 'data'),
        eval_dataset=str(root / 'data'), device='cpu',
        cfg_overrides={'train': {'max_epochs': 2, 'dataloader': loader, 'hooks': hooks},
                       'evaluation': {'dataloader': loader}}))
    trainer.register_hook(CheckpointHook(by_epoch=False, interval=2))
    trainer.train()
    return root / 'work'


def trainer_files(work: Path) -> dict[str, Path]:
    weights = [p for p in work.glob('*.pth') if not p.stem.endswith('_trainer_state')]
    pick = {'epoch': work / 'epoch_2.pth', 'iter': next(p for p in weights if p.name.startswith('iter_')),
            'best': next(p for p in weights if p.name.startswith('best_'))}
    assert all(p.is_file() for p in pick.values()), sorted(p.name for p in work.iterdir())
    return pick


def expected_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under the ModelScope model's ``clip.`` submodule, as ModelScope saved them."""
    raw = torch.load(path, map_location='cpu', weights_only=True)
    assert all(k.startswith('clip.') for k in raw), list(raw)[:5]
    return {k[len('clip.'):]: v for k, v in raw.items()}


@pytest.mark.parametrize('kind', ['epoch', 'iter', 'best'])
def test_trainer_checkpoint_loads_in_load_pipeline_info_and_convert(work, kind, tmp_path, capsys, images):
    path = trainer_files(work)[kind]
    want = expected_weights(path)

    model = load(path)
    assert model.config == TINY64
    assert_same({k: v for k, v in model.model.state_dict().items() if k in want}, want)
    img, txt = model.model.encode_image(model.transform.batch(images)), model.model.encode_text(
        model.tokenizer(TEXTS)['input_ids'])

    p = pipeline(Tasks.multi_modal_embedding, model=str(path), pipeline_name=PIPELINE, device='cpu')
    out = p({'img': images, 'text': TEXTS})
    assert torch.allclose(out['img_embedding'], torch.nn.functional.normalize(img, dim=-1), atol=1e-6)
    assert torch.allclose(out['text_embedding'], torch.nn.functional.normalize(txt, dim=-1), atol=1e-6)

    code, stdout, _ = run_cli(capsys, 'info', path)
    info = json.loads(stdout)
    assert code == 0 and info['layout'] == 'official' and info['config'] == TINY64.to_dict()
    assert info['guessed'] == list(GUESSED_FIELDS)  # a custom size: its head counts come from no config
    assert info['parameters'] == sum(v.numel() for v in want.values())

    code, stdout, _ = run_cli(capsys, 'convert', path, '--out', tmp_path / 'plugin')
    assert code == 0 and stdout.strip() == str(tmp_path / 'plugin')
    assert_same(read_source(tmp_path / 'plugin').state_dict, want)


def test_last_epoch_and_best_checkpoints_match_the_trainer_outputs(work):
    # work/output holds the final weights and work/output_best the best checkpoint's, written by the trainer itself
    files = trainer_files(work)
    assert_same(read_source(files['epoch']).state_dict, read_source(work / 'output').state_dict)
    assert_same(read_source(files['best']).state_dict, read_source(work / 'output_best').state_dict)


def test_trainer_checkpoint_with_explicit_config_file(work, capsys):
    TINY64.save(work.parent / 'arch.json')
    code, stdout, _ = run_cli(capsys, 'info', trainer_files(work)['epoch'], '--config', work.parent / 'arch.json')
    assert code == 0 and json.loads(stdout)['guessed'] == []


@pytest.mark.parametrize('kind', ['epoch', 'iter', 'best'])
def test_trainer_state_file_points_at_the_weights_beside_it(work, kind, capsys):
    weights = trainer_files(work)[kind]
    state = weights.with_name(weights.stem + '_trainer_state.pth')
    assert state.is_file()  # ModelScope's naming: X.pth and X_trainer_state.pth
    msg = f"{state} is a ModelScope trainer state .* The checkpoint's weights are in {weights.name} \\(beside it\\)"
    with pytest.raises(ValueError, match=msg.replace('.pth', r'\.pth').replace('[', r'\[')):
        read_source(state)
    code, _, err = run_cli(capsys, 'convert', state, '--out', work.parent / 'never')
    assert code == 2 and f'load {weights}' in err
    assert not (work.parent / 'never').exists()


def test_trainer_state_without_its_weights_says_so(work, tmp_path):
    state = tmp_path / 'epoch_2_trainer_state.pth'
    shutil.copyfile(work / 'epoch_2_trainer_state.pth', state)
    with pytest.raises(ValueError, match=r'weights are in epoch_2\.pth \(beside it, which is missing there\)'):
        load(state)


def test_renamed_trainer_state_is_recognised_by_content(work, tmp_path):
    renamed = shutil.copyfile(work / 'epoch_1_trainer_state.pth', tmp_path / 'finetuned.pth')  # numpy RNG state
    with pytest.raises(ValueError, match=r'finetuned\.pth holds a ModelScope trainer state .* no model weights.*'
                                         r'epoch_2\.pth beside epoch_2_trainer_state\.pth'):
        read_source(renamed)
    plain = tmp_path / 'plain.pth'  # without RNG arrays: readable with weights_only=True as it is
    torch.save({'meta': {'epoch': 2, 'iter': 4}, 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {'last_epoch': 3}}, plain)
    with pytest.raises(ValueError, match=r'plain\.pth holds a ModelScope trainer state'):
        read_checkpoint(plain)


def test_other_pickled_objects_are_still_refused(tmp_path):
    import numpy as np
    path = tmp_path / 'numpy.pt'  # numpy arrays, but not a trainer state: the weights_only refusal stands
    torch.save({'state_dict': {'visual.x': np.zeros(3)}}, path)
    with pytest.raises(ValueError, match='refusing to unpickle arbitrary Python objects'):
        read_checkpoint(path)


def test_modelscope_checkpoint_with_meta_and_optimizer(tmp_path, vit_sd):
    from modelscope.utils.checkpoint import save_checkpoint

    class Holder(torch.nn.Module):  # the ModelScope model class holds the network as self.clip
        def __init__(self):
            super().__init__()
            self.clip = CLIP(TINY_VIT)
            self.clip.load_state_dict(vit_sd)
    holder = Holder()
    optimizer = torch.optim.AdamW(holder.parameters())
    path = tmp_path / 'ckpt.pth'
    save_checkpoint(holder, str(path), optimizer, meta={'epoch': 2})  # {'meta', 'optimizer', 'state_dict'}
    assert set(torch.load(path, weights_only=True)) == {'meta', 'optimizer', 'state_dict'}
    assert_same(read_source(path, config=TINY_VIT).state_dict, vit_sd)


# --- one common model prefix, at any depth -----------------------------------------------------------------------

@pytest.mark.parametrize('prefix', ['', 'module.', 'clip_model.', 'clip.', 'model.clip.', 'module.clip.',
                                    'clip.module.', 'student.', 'ema.model.'])
def test_any_one_prefix_is_removed(vit_sd, prefix):
    sd, layout = to_official({prefix + k: v for k, v in vit_sd.items()})
    assert layout == 'official'
    assert_same(sd, vit_sd)
    hf = official_to_hf(vit_sd)
    back, layout = to_official({prefix + k: v for k, v in hf.items()})
    assert layout == 'hf'
    assert_same(back, vit_sd)


def test_hub_dir_with_a_model_prefix_loads(tmp_path, rn_sd):
    d = write_hub_dir(tmp_path / 'hub', TINY_RN, rn_sd, prefix='model.clip.')
    assert_same(read_source(d).state_dict, rn_sd)


@pytest.mark.parametrize('prefixes,named', [
    (('student.', 'teacher.'), r"'student\.' \(e\.g\. 'student\.[^']+'\), 'teacher\.' \(e\.g\. 'teacher\."),
    (('', 'clip.'), r"'' \(no prefix, e\.g\. '[^']+'\), 'clip\.' \(e\.g\. 'clip\."),
])
def test_weights_under_two_prefixes_are_refused_by_name(vit_sd, prefixes, named):
    sd = {p + k: v for p in prefixes for k, v in vit_sd.items()}
    with pytest.raises(ValueError, match=f'weights sit under 2 different key prefixes: {named}.*more than one model'):
        to_official(sd)


def test_keys_outside_the_prefix_are_named_by_the_strict_load(tmp_path, vit_sd):
    sd = {'clip.' + k: v for k, v in vit_sd.items()}
    sd['head.weight'] = torch.zeros(2, 2)
    assert find_prefix(sd) == 'clip.'
    torch.save(sd, tmp_path / 'w.pth')
    with pytest.raises(ValueError, match=r"unexpected key\(s\), first: \['head.weight'\]"):
        load(tmp_path / 'w.pth', config=TINY_VIT)


# --- custom sizes: what was guessed stays visible ------------------------------------------------------------------

def test_custom_size_warning_reaches_the_terminal_from_the_cli(tmp_path, vit_sd):
    pt = write_official_pt(tmp_path / 'custom.pt', vit_sd)
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'convert', str(pt), '--out',
                          str(tmp_path / 'out')],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'WARNING modelscope_cnclip.checkpoints.convert: weights match no shipped architecture; assuming 64-wide ' \
           'attention heads' in res.stderr
    assert '--config my_arch.json' in res.stderr


def test_load_of_a_custom_size_warns(tmp_path, vit_sd, caplog):
    pt = write_official_pt(tmp_path / 'custom.pt', vit_sd)
    with caplog.at_level(logging.WARNING, logger='modelscope_cnclip'):
        load(pt)
    assert any(r.levelno == logging.WARNING and 'assuming 64-wide attention heads' in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize('cfg', [TINY_VIT, TINY_RN], ids=['vit', 'resnet'])
def test_info_marks_guessed_fields_and_a_converted_dir_remembers(tmp_path, cfg, capsys):
    pt = write_official_pt(tmp_path / 'custom.pt', random_state_dict(cfg))
    code, stdout, _ = run_cli(capsys, 'info', pt)
    assert code == 0 and json.loads(stdout)['guessed'] == list(GUESSED_FIELDS)
    assert run_cli(capsys, 'convert', pt, '--out', tmp_path / 'plugin')[0] == 0
    stored = json.loads((tmp_path / 'plugin' / 'cnclip_config.json').read_text())
    assert stored['guessed'] == ['vision.head_width', 'text.num_attention_heads']
    code, stdout, _ = run_cli(capsys, 'info', tmp_path / 'plugin')
    assert code == 0 and json.loads(stdout)['guessed'] == list(GUESSED_FIELDS)
    assert read_source(tmp_path / 'plugin').guessed == GUESSED_FIELDS
    # the converted dir's config file still works as --config, and a truly unknown key is still refused
    CLIPConfig.from_file(tmp_path / 'plugin' / 'cnclip_config.json')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        CLIPConfig.from_dict({**stored, 'bogus': 1})


def test_a_given_config_guesses_nothing(tmp_path, vit_sd, capsys):
    pt = write_official_pt(tmp_path / 'custom.pt', vit_sd)
    TINY_VIT.save(tmp_path / 'arch.json')
    code, stdout, _ = run_cli(capsys, 'info', pt, '--config', tmp_path / 'arch.json')
    assert code == 0 and json.loads(stdout)['guessed'] == []
    out = convert(pt, tmp_path / 'plugin', config=TINY_VIT)
    assert 'guessed' not in json.loads((out / 'cnclip_config.json').read_text())


@pytest.mark.parametrize('name', available_models())
def test_shipped_architectures_guess_nothing(name):
    with torch.device('meta'):
        sd = CLIP(get_config(name)).state_dict()
    assert guess_config(sd) == (get_config(name), ())


def test_self_describing_dirs_guess_nothing(tmp_path, hub_vit_dir, plugin_vit_dir, capsys):
    hf = convert(hub_vit_dir, tmp_path / 'hf', to='hf')
    for d in (hub_vit_dir, plugin_vit_dir, hf):
        code, stdout, _ = run_cli(capsys, 'info', d)
        assert code == 0 and json.loads(stdout)['guessed'] == [], d


# --- sharded weights ---------------------------------------------------------------------------------------------

def save_shards(sd, d: Path, fmt: str, size: str = '300KB') -> list[str]:
    """Shards + index the way transformers 4.x save_pretrained wrote them (huggingface_hub's writer)."""
    from huggingface_hub import save_torch_state_dict
    save_torch_state_dict(sd, d, max_shard_size=size, safe_serialization=fmt == 'safetensors')
    names = sorted(p.name for p in d.iterdir() if '-of-' in p.name)
    assert len(names) > 1
    return names


@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
@pytest.mark.parametrize('prefix', ['', 'clip_model.'])
def test_sharded_hub_dir_loads(tmp_path, vit_sd, fmt, prefix):
    d = write_hub_dir(tmp_path / 'hub', TINY_VIT, vit_sd)
    sd = torch.load(d / 'pytorch_model.bin', weights_only=True)
    (d / 'pytorch_model.bin').unlink()
    save_shards({prefix + k: v for k, v in sd.items()}, d, fmt)
    ckpt = read_source(d)
    assert ckpt.layout == 'hub' and ckpt.config == TINY_VIT
    assert_same(ckpt.state_dict, vit_sd)


@pytest.fixture
def sharded(tmp_path, vit_sd) -> Path:
    """A hub dir whose weights are safetensors shards and their index."""
    d = write_hub_dir(tmp_path / 'hub', TINY_VIT, vit_sd)
    (d / 'pytorch_model.bin').unlink()
    assert len(save_shards(dict(vit_sd), d, 'safetensors')) >= 3
    return d


def shards_of(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob('model-*-of-*.safetensors'))


def test_index_file_itself_is_a_source(sharded, vit_sd, capsys):
    index = sharded / 'model.safetensors.index.json'
    assert_same(read_source(index, config=TINY_VIT).state_dict, vit_sd)
    TINY_VIT.save(sharded.parent / 'arch.json')
    code, stdout, _ = run_cli(capsys, 'info', index, '--config', sharded.parent / 'arch.json')
    assert code == 0 and json.loads(stdout)['parameters'] == sum(v.numel() for v in vit_sd.values())


def test_missing_shard_is_named(sharded):
    shards = shards_of(sharded)
    (sharded / shards[1]).rename(sharded / 'elsewhere.bak')
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: lists shard '{shards[1]}', which is "
                                                rf"missing .* copy or download all {len(shards)} shards"):
        read_source(sharded)


def test_shard_with_unlisted_or_missing_tensors_is_refused(sharded):
    from safetensors.torch import load_file, save_file
    shard = sharded / shards_of(sharded)[2]
    part = load_file(shard)
    save_file({**part, 'visual.extra': torch.zeros(1)}, shard)
    with pytest.raises(ValueError, match=rf"{shard.name}: holds 1 tensor\(s\) that model.safetensors"
                                         r".index.json does not list for it \(first: \['visual.extra'\]\); the "
                                         r"index and the shards come from different saves"):
        read_source(sharded)
    dropped = sorted(part)[0]
    save_file({k: v for k, v in part.items() if k != dropped}, shard)
    with pytest.raises(ValueError, match=rf"lacks 1 tensor\(s\) that model.safetensors.index.json lists for it "
                                         rf"\(first: \['{dropped}'\]\)"):
        read_source(sharded)


@pytest.mark.parametrize('text,match', [
    ('{"weight_map": {', r'index.json: not valid JSON .*copy or download the index again'),
    ('{"metadata": {}}', r'index.json: no "weight_map" object'),
    ('{"weight_map": {"visual.proj": "../model-00001-of-00003.safetensors"}}', r"is not a file name"),
])
def test_bad_index_is_explained(sharded, text, match):
    (sharded / 'model.safetensors.index.json').write_text(text)
    with pytest.raises(ValueError, match=match):
        read_source(sharded)


def test_shards_without_index_or_a_single_shard_are_explained(sharded):
    shards = shards_of(sharded)
    with pytest.raises(ValueError, match=rf'{shards[1]} is shard 2 of {len(shards)} of sharded weights; give the '
                                         rf'directory'):
        read_source(sharded / shards[1], config=TINY_VIT)
    (sharded / 'model.safetensors.index.json').unlink()
    with pytest.raises(FileNotFoundError, match=r'holds weight shards .* but not their index'):
        read_source(sharded)


@pytest.mark.parametrize('to', ['plugin', 'hf'])
def test_convert_writes_shards_that_load_back(tmp_path, hub_vit_dir, vit_sd, to, capsys):
    code, _, err = run_cli(capsys, 'convert', hub_vit_dir, '--out', tmp_path / to, '--to', to, '--max-shard-size',
                           '500KB')
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / to).iterdir())
    shards = [n for n in names if n.startswith('model-')]
    assert len(shards) > 1 and 'model.safetensors.index.json' in names and 'model.safetensors' not in names
    index = json.loads((tmp_path / to / 'model.safetensors.index.json').read_text())
    assert sorted(set(index['weight_map'].values())) == shards and index['metadata']['total_size'] > 0
    per_shard = {n: sum(1 for f in index['weight_map'].values() if f == n) for n in shards}
    for n in shards:  # at most 500 KB (+ header), unless one tensor alone is larger (the word embeddings: 4 MB)
        assert (tmp_path / to / n).stat().st_size <= 500_000 + 20_000 or per_shard[n] == 1
    ckpt = read_source(tmp_path / to)
    assert ckpt.layout == to and ckpt.config == TINY_VIT
    assert_same(ckpt.state_dict, vit_sd)
    code, stdout, _ = run_cli(capsys, 'info', tmp_path / to)
    assert code == 0 and json.loads(stdout)['parameters'] == sum(v.numel() for v in vit_sd.values())


def test_hub_layout_refuses_sharding(tmp_path, hub_vit_dir, capsys):
    with pytest.raises(ValueError, match=r"hub layout cannot be sharded: ModelScope's built-in CLIP class reads "
                                         r"exactly one pytorch_model.bin"):
        convert(hub_vit_dir, tmp_path / 'hub', to='hub', max_shard_size='2GB')
    code, _, err = run_cli(capsys, 'convert', hub_vit_dir, '--out', tmp_path / 'hub', '--to', 'hub',
                           '--max-shard-size', '2GB')
    assert code == 2 and 'cannot be sharded' in err
    assert not (tmp_path / 'hub').exists()
    with pytest.raises(ValueError, match=r"max_shard_size='2G': give a size like \"2GB\""):
        convert(hub_vit_dir, tmp_path / 'x', to='hf', max_shard_size='2G')


@pytest.mark.parametrize('to', ['plugin', 'hf'])
def test_vit_h_would_be_sharded_at_2gb(to):
    with torch.device('meta'):  # the real ViT-H-14 shapes, no memory
        sd = CLIP(get_config('ViT-H-14')).state_dict()
        if to == 'hf':  # q/k/v views of one meta in_proj would each count its whole storage: fresh tensors
            sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in official_to_hf(sd).items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    assert total > 3.8e9  # ~958M fp32 parameters
    plan = shard_plan(sd, '2GB')
    assert plan.is_sharded and len(plan.filename_to_tensors) == 2
    assert sorted(plan.filename_to_tensors) == ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    assert sorted(plan.tensor_to_filename) == sorted(sd) and plan.metadata['total_size'] == total
    for keys in plan.filename_to_tensors.values():
        assert sum(sd[k].numel() * sd[k].element_size() for k in keys) <= 2e9
    assert not shard_plan(sd, '5GB').is_sharded


def test_a_saved_model_keeps_its_guessed_fields(tmp_path, vit_sd):
    """What the trainer writes (save_pretrained of the ModelScope model) still says which fields were guessed."""
    from modelscope_cnclip.ms import CNClipForMultiModalEmbedding
    pt = write_official_pt(tmp_path / 'custom.pt', vit_sd)
    model = CNClipForMultiModalEmbedding(str(pt), device='cpu')
    model.save_pretrained(tmp_path / 'saved')
    assert read_source(tmp_path / 'saved').guessed == GUESSED_FIELDS


# --- files that are not (whole) weights --------------------------------------------------------------------------

def test_truncated_or_corrupt_weights_are_named_with_the_fix(tmp_path, sharded, plugin_vit_dir, capsys):
    plugin = tmp_path / 'plugin'
    shutil.copytree(plugin_vit_dir, plugin)
    weights = plugin / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    code, _, err = run_cli(capsys, 'info', plugin)
    assert code == 2 and 'model.safetensors: not a readable safetensors file' in err and 'download or copy it ' \
        'again' in err
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        load(plugin)
    shard = sharded / shards_of(sharded)[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf'{shard.name}: not a readable safetensors file .*download or copy it'):
        read_source(sharded)
    pt = tmp_path / 'half.pt'
    torch.save({'state_dict': {'visual.proj': torch.zeros(64, 32)}}, pt)
    pt.write_bytes(pt.read_bytes()[:300])
    with pytest.raises(ValueError, match=r'half.pt: not a readable torch checkpoint .*download or copy it again'):
        read_source(pt)


@pytest.mark.parametrize('content', [b'\xff\xd8\xff\xe0 a JPEG', b'', b'hello, not weights'])
def test_a_file_that_is_not_weights_says_so(tmp_path, content, capsys):
    path = tmp_path / 'model.pt'
    path.write_bytes(content)
    code, _, err = run_cli(capsys, 'info', path)
    assert code == 2 and 'model.pt: not a weights file (it starts with' in err
    assert 'refusing to unpickle' not in err


def test_info_refuses_a_config_that_does_not_fit(plugin_vit_dir, capsys):
    code, _, err = run_cli(capsys, 'info', plugin_vit_dir, '--config', 'ViT-B-16')
    assert code == 2 and 'weights do not fit the architecture ViT-B-16' in err


def test_a_trainer_work_dir_points_at_its_outputs(work, tmp_path):
    with pytest.raises(FileNotFoundError, match=r'is a cnclip-trainer work dir: load .*output \(the final model, '
                                                r'a plugin dir\), .*output_best, or one checkpoint such as'):
        read_source(work)


def test_json_files_saved_with_a_bom(tmp_path, sharded, hub_vit_dir, vit_sd):
    index = sharded / 'model.safetensors.index.json'
    index.write_bytes(b'\xef\xbb\xbf' + index.read_bytes())
    assert_same(read_source(sharded).state_dict, vit_sd)
    hub = tmp_path / 'hub-bom'
    shutil.copytree(hub_vit_dir, hub)
    for name in ('vision_model_config.json', 'text_model_config.json'):
        (hub / name).write_bytes(b'\xef\xbb\xbf' + (hub / name).read_bytes())
    assert read_source(hub).config == read_source(hub_vit_dir).config
