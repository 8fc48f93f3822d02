"""checkpoints/hf.py: interop with transformers' ChineseCLIPModel: its dirs load here, ours load there, same
embeddings."""
import json

import pytest
import torch
from transformers import AutoTokenizer, ChineseCLIPConfig, ChineseCLIPModel

from modelscope_cnclip import convert, load, read_source
from modelscope_cnclip.checkpoints.hf import config_to_hf
from modelscope_cnclip.cli import main

from helpers import TINY_VIT

TEXTS = ['杰尼龟', '一只橘猫趴在窗台上晒太阳', 'Pikachu 皮卡丘!']


def _features(hf_model, pixels, ids):
    with torch.no_grad():
        img = hf_model.get_image_features(pixel_values=pixels)
        txt = hf_model.get_text_features(input_ids=ids, attention_mask=ids.ne(0).long())
    # transformers 5 returns model outputs; 4.x returned tensors
    img = getattr(img, 'pooler_output', img)
    txt = getattr(txt, 'pooler_output', txt)
    return img, txt


def test_transformers_dir_loads_with_same_embeddings(tmp_path, images):
    torch.manual_seed(0)
    hf = ChineseCLIPModel(ChineseCLIPConfig(**config_to_hf(TINY_VIT))).eval()
    hf.save_pretrained(tmp_path / 'hf')
    ours = load(tmp_path / 'hf')
    assert ours.config == TINY_VIT
    pixels = ours.transform.batch(images)
    ids = ours.tokenizer(TEXTS)['input_ids']
    want_img, want_txt = _features(hf, pixels, ids)
    got_img = ours.model.encode_image(pixels)
    got_txt = ours.model.encode_text(ids)
    assert torch.allclose(got_img, want_img, atol=1e-5, rtol=0)
    assert torch.allclose(got_txt, want_txt, atol=1e-5, rtol=0)


def test_to_hf_dir_loads_in_transformers(tmp_path, hub_vit_dir, images):
    out = convert(hub_vit_dir, tmp_path / 'hf', to='hf')
    hf, info = ChineseCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    ours = load(hub_vit_dir)
    pixels = ours.transform.batch(images)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXTS, padding=True, return_tensors='pt')['input_ids']
    assert torch.equal(ids, ours.tokenizer(TEXTS)['input_ids'])
    want_img, want_txt = _features(hf.eval(), pixels, ids)
    assert torch.allclose(ours.model.encode_image(pixels), want_img, atol=1e-5, rtol=0)
    assert torch.allclose(ours.model.encode_text(ids), want_txt, atol=1e-5, rtol=0)
    proc = json.loads((out / 'preprocessor_config.json').read_text())
    assert proc['size'] == {'height': 64, 'width': 64} and proc['do_center_crop'] is False
    # as model.save_pretrained writes it; serving tools (infinity-emb) dispatch on it
    assert json.loads((out / 'config.json').read_text())['architectures'] == ['ChineseCLIPModel']
    assert (out / 'vocab.txt').is_file()


def test_hf_config_must_be_chinese_clip_shaped(tmp_path):
    from modelscope_cnclip.checkpoints.hf import config_from_hf
    bad = config_to_hf(TINY_VIT)
    bad['vision_config']['intermediate_size'] = 100
    with pytest.raises(ValueError, match='intermediate_size = 4 x hidden_size'):
        config_from_hf(bad)


def _save_sharded(hf, d, fmt):
    """A sharded transformers dir: transformers' own save_pretrained (safetensors), or the .bin form that
    transformers 4.x wrote with safe_serialization=False (transformers 5 writes safetensors only, so the .bin form
    comes from huggingface_hub's writer, which transformers 4.x used)."""
    hf.save_pretrained(d, max_shard_size='200KB', safe_serialization=fmt == 'safetensors')
    if fmt == 'bin' and not (d / 'pytorch_model.bin.index.json').is_file():
        from huggingface_hub import save_torch_state_dict
        for f in d.glob('model*.safetensors*'):
            f.unlink()
        save_torch_state_dict(hf.state_dict(), d, max_shard_size='200KB', safe_serialization=False)
    index = {'safetensors': 'model.safetensors.index.json', 'bin': 'pytorch_model.bin.index.json'}[fmt]
    weight_map = json.loads((d / index).read_text())['weight_map']
    assert len(set(weight_map.values())) > 1


@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
def test_sharded_transformers_dir_loads_like_the_single_file(tmp_path, images, fmt):
    torch.manual_seed(0)
    hf = ChineseCLIPModel(ChineseCLIPConfig(**config_to_hf(TINY_VIT))).eval()
    hf.save_pretrained(tmp_path / 'single')
    _save_sharded(hf, tmp_path / 'sharded', fmt)
    single, sharded = load(tmp_path / 'single'), load(tmp_path / 'sharded')
    assert sharded.config == TINY_VIT and read_source(tmp_path / 'sharded').layout == 'hf'
    pixels = single.transform.batch(images)
    ids = single.tokenizer(TEXTS)['input_ids']
    assert torch.equal(sharded.model.encode_image(pixels), single.model.encode_image(pixels))
    assert torch.equal(sharded.model.encode_text(ids), single.model.encode_text(ids))
    want_img, _ = _features(hf, pixels, ids)
    assert torch.allclose(sharded.model.encode_image(pixels), want_img, atol=1e-5, rtol=0)


def test_our_sharded_hf_dir_loads_in_transformers(tmp_path, hub_vit_dir, images, capsys):
    out = convert(hub_vit_dir, tmp_path / 'hf', to='hf', max_shard_size='300KB')
    assert not (out / 'model.safetensors').exists() and len(list(out.glob('model-*-of-*.safetensors'))) > 1
    hf, info = ChineseCLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    ours = load(hub_vit_dir)
    pixels = ours.transform.batch(images)
    ids = ours.tokenizer(TEXTS)['input_ids']
    want_img, want_txt = _features(hf.eval(), pixels, ids)
    assert torch.allclose(ours.model.encode_image(pixels), want_img, atol=1e-5, rtol=0)
    assert torch.allclose(ours.model.encode_text(ids), want_txt, atol=1e-5, rtol=0)
    again = load(out)
    assert torch.equal(again.model.encode_image(pixels), ours.model.encode_image(pixels))
    assert main(['info', str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown['layout'] == 'hf' and shown['guessed'] == [] and shown['config'] == TINY_VIT.to_dict()
