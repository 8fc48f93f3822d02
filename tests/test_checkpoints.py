"""checkpoints/ (convert.py, layouts.py): every checkpoint layout loads (strictly, safely) and converts both ways
without changing a tensor; architectures detected from shapes, prefixes stripped, clear refusals."""
import json
import pickle

import pytest
import torch

from modelscope_cnclip import convert, load, read_source
from modelscope_cnclip.checkpoints.convert import (
    check_state_dict,
    hf_to_official,
    infer_config,
    official_to_hf,
    read_checkpoint,
    strip_prefixes,
    to_official,
)
from modelscope_cnclip.config import available_models, get_config
from modelscope_cnclip.model import CLIP

from helpers import TINY_RN, TINY_VIT, assert_same, write_hub_dir, write_official_pt


@pytest.mark.parametrize('name', available_models())
def test_architecture_detected_from_shapes(name):
    with torch.device('meta'):
        sd = CLIP(get_config(name)).state_dict()
    sd['bert.pooler.dense.weight'] = torch.empty(1, device='meta')
    cleaned, layout = to_official({'module.' + k: v for k, v in sd.items()})
    assert layout == 'official'
    assert infer_config(cleaned) == get_config(name)  # head counts included (ViT-H uses 80-wide heads)


@pytest.mark.parametrize('name', [n for n in available_models() if not n.startswith('RN')])
def test_hf_conversion_round_trip_for_real_shapes(name):
    with torch.device('meta'):
        sd = CLIP(get_config(name)).state_dict()
    back = hf_to_official(official_to_hf(sd))
    assert sorted(back) == sorted(sd)
    assert all(back[k].shape == sd[k].shape for k in sd)


def test_prefixes_stripped_in_any_nesting():
    t = torch.zeros(1)
    assert list(strip_prefixes({'module.clip_model.visual.a': t, 'clip_model.module.bert.b': t})) == \
        ['visual.a', 'bert.b']
    with pytest.raises(ValueError, match='collides'):
        strip_prefixes({'module.x': t, 'x': t})


def test_not_a_clip_state_dict_is_named():
    with pytest.raises(ValueError, match=r"not a Chinese CLIP state dict.*first keys: \['encoder.weight'\]"):
        to_official({'encoder.weight': torch.zeros(1)})


@pytest.mark.parametrize('prefix,optimizer', [('module.', True), ('module.', False), ('', False)])
def test_official_pt_loads(tmp_path, vit_sd, prefix, optimizer):
    path = write_official_pt(tmp_path / 'clip_cn_tiny.pt', vit_sd, prefix, optimizer)
    ckpt = read_source(path, config=TINY_VIT)
    assert ckpt.layout == 'official'
    assert_same(ckpt.state_dict, vit_sd)


def test_official_pt_of_a_shipped_size_needs_no_config(tmp_path):
    # A real-size RN50 is small enough to write: its architecture comes from the shapes alone.
    torch.manual_seed(0)
    sd = CLIP(get_config('RN50')).state_dict()
    ckpt = read_source(write_official_pt(tmp_path / 'clip_cn_rn50.pt', sd))
    assert ckpt.name == 'RN50' and ckpt.config == get_config('RN50')


@pytest.mark.parametrize('prefix', ['', 'module.', 'clip_model.'])
def test_hub_dir_and_finetune_output_load(tmp_path, rn_sd, prefix):
    d = write_hub_dir(tmp_path / 'hub', TINY_RN, rn_sd, prefix=prefix, string_layers=True)
    ckpt = read_source(d)
    assert ckpt.layout == 'hub' and ckpt.config == TINY_RN
    assert_same(ckpt.state_dict, rn_sd)  # pooler dropped


def test_weights_only_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('owned',))
    path = tmp_path / 'evil.pt'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {'visual.x': Evil()}}, f)
    with pytest.raises(ValueError, match='refusing to unpickle arbitrary Python objects'):
        read_checkpoint(path)


def test_mismatch_names_keys_and_detected_architecture(tmp_path, vit_sd):
    sd = dict(vit_sd)
    sd['visual.proj'] = torch.zeros(64, 16)
    del sd['visual.ln_post.bias']
    path = write_official_pt(tmp_path / 'bad.pt', sd)
    with pytest.raises(ValueError) as e:
        load(path, config=TINY_VIT)
    msg = str(e.value)
    assert 'weights do not fit the architecture custom' in msg
    assert 'visual.proj: checkpoint (64, 16) vs model (64, 32)' in msg
    assert "missing key(s), first: ['visual.ln_post.bias']" in msg


def test_shipped_arch_mismatch_names_it():
    with torch.device('meta'):
        expected = CLIP(get_config('ViT-B-16')).state_dict()
    sd = dict(expected)
    sd['text_projection'] = torch.empty(768, 256, device='meta')
    sd['extra.weight'] = torch.empty(1, device='meta')
    with pytest.raises(ValueError, match=r"architecture ViT-B-16.*text_projection: checkpoint \(768, 256\).*"
                                         r"unexpected key\(s\), first: \['extra.weight'\]"):
        check_state_dict(expected, sd, 'ViT-B-16')


@pytest.mark.parametrize('to', ['plugin', 'hub', 'hf'])
def test_convert_round_trip_keeps_every_tensor(tmp_path, hub_vit_dir, vit_sd, to):
    out = convert(hub_vit_dir, tmp_path / to, to=to)
    ckpt = read_source(out)
    assert ckpt.layout == to and ckpt.config == TINY_VIT
    assert_same(ckpt.state_dict, vit_sd)
    back = read_source(convert(out, tmp_path / 'plugin-again'))
    assert_same(back.state_dict, vit_sd)


def test_plugin_dir_is_safetensors_with_configuration(plugin_vit_dir):
    files = sorted(p.name for p in plugin_vit_dir.iterdir())
    assert files == ['cnclip_config.json', 'configuration.json', 'model.safetensors', 'vocab.txt']
    conf = json.loads((plugin_vit_dir / 'configuration.json').read_text())
    assert conf['model']['type'] == 'cnclip' and conf['pipeline']['type'] == 'cnclip-multi-modal-embedding'


def test_convert_resnet_to_hf_is_refused_before_writing(tmp_path, rn_sd):
    d = write_hub_dir(tmp_path / 'hub', TINY_RN, rn_sd)
    with pytest.raises(ValueError, match='no ResNet image tower'):
        convert(d, tmp_path / 'hf', to='hf')
    assert not (tmp_path / 'hf').exists()


def test_convert_refuses_to_clobber_and_leaves_no_half_dir(tmp_path, hub_vit_dir, vit_sd):
    dst = tmp_path / 'out'
    dst.mkdir()
    (dst / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='not empty'):
        convert(hub_vit_dir, dst)
    assert (dst / 'keep.txt').exists()
    bad = write_official_pt(tmp_path / 'bad.pt', {k: v for k, v in vit_sd.items() if k != 'logit_scale'})
    with pytest.raises(ValueError, match='missing key'):
        convert(bad, tmp_path / 'never', config=TINY_VIT)
    assert not (tmp_path / 'never').exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []


def test_unknown_source_and_layout_errors(tmp_path, hub_vit_dir):
    with pytest.raises(FileNotFoundError, match='model source .* not found: give a model dir'):
        read_source(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='not a Chinese CLIP model dir'):
        read_source(tmp_path / 'empty')
    with pytest.raises(ValueError, match="unknown target layout 'onnx'"):
        convert(hub_vit_dir, tmp_path / 'x', to='onnx')


def test_builtin_trainer_output_dir_without_model_configs(tmp_path, vit_sd):
    # ModelScope's built-in trainer writes output/ with a configuration.json lacking "model" and clip_model. keys.
    d = tmp_path / 'output'
    d.mkdir()
    (d / 'configuration.json').write_text(json.dumps({'framework': 'pytorch', 'task': 'multi-modal-embedding'}))
    torch.save({'clip_model.' + k: v for k, v in vit_sd.items()}, d / 'pytorch_model.bin')
    ckpt = read_source(d, config=TINY_VIT)
    assert ckpt.layout == 'official'
    assert_same(ckpt.state_dict, vit_sd)
    out = convert(d, tmp_path / 'plugin', config=TINY_VIT)
    assert_same(read_source(out).state_dict, vit_sd)


def test_hub_id_download_failure_names_the_input(monkeypatch):
    import importlib
    hub = importlib.import_module('modelscope.hub.snapshot_download')  # the module (its package re-exports a function)

    def offline(*args, **kwargs):
        raise ConnectionError('Name or service not known')
    monkeypatch.setattr(hub, 'snapshot_download', offline)
    with pytest.raises(OSError, match=r"'someone/model' is not a local path, and downloading it as a ModelScope hub id "
                                      r"failed: Name or service not known"):
        read_source('someone/model')
