"""config.py: architectures as data: scanning, published parameter counts, strict parsing, hub config round trips."""
import json

import pytest
import torch

from modelscope_cnclip.config import (
    CLIPConfig,
    VisionConfig,
    available_models,
    config_from_hub,
    config_to_hub,
    get_config,
    match_architecture,
)
from modelscope_cnclip.model import CLIP

# Published parameter counts in millions (all / vision / text tower without projection), REFERENCE.md §1.
PUBLISHED = {
    'RN50': (77.0, 38.3, 37.9),
    'ViT-B-16': (188.3, 86.2, 101.7),
    'ViT-L-14': (406.2, 304.0, 101.7),
    'ViT-L-14-336': (406.6, None, None),
    'ViT-H-14': (957.6, 632.1, 324.5),
}


def test_all_five_architectures_are_found_by_scanning():
    assert sorted(available_models()) == sorted(PUBLISHED)


def test_names_sort_naturally():
    # A plain sort of the file names gives ViT-L-14-336 before ViT-L-14 ('-' < '.').
    assert available_models() == ['RN50', 'ViT-B-16', 'ViT-H-14', 'ViT-L-14', 'ViT-L-14-336']


def test_natural_order_compares_numbers_by_value(tmp_path, monkeypatch):
    import modelscope_cnclip.config as config_mod
    text = (config_mod.CONFIG_DIR / 'ViT-B-16.json').read_text()
    for name in ['ViT-L-14-336', 'ViT-L-9', 'ViT-L-14', 'RN101', 'RN50', 'ViT-B-32', 'ViT-B-16']:
        (tmp_path / f'{name}.json').write_text(text)
    monkeypatch.setattr(config_mod, 'CONFIG_DIR', tmp_path)
    config_mod._registry.cache_clear()
    try:
        assert available_models() == ['RN50', 'RN101', 'ViT-B-16', 'ViT-B-32', 'ViT-L-9', 'ViT-L-14', 'ViT-L-14-336']
    finally:
        monkeypatch.undo()
        config_mod._registry.cache_clear()


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_counts_equal_published(name):
    with torch.device('meta'):
        model = CLIP(get_config(name))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    vision = sum(p.numel() for p in model.visual.parameters()) / 1e6
    text = sum(p.numel() for p in model.bert.parameters()) / 1e6
    want_total, want_vision, want_text = PUBLISHED[name]
    assert round(total, 1) == want_total
    if want_vision is not None:
        assert (round(vision, 1), round(text, 1)) == (want_vision, want_text)


def test_published_head_counts():
    assert get_config('ViT-H-14').vision.heads == 16 and get_config('ViT-H-14').text.num_attention_heads == 16
    assert get_config('ViT-B-16').vision.heads == 12
    assert get_config('RN50').vision.heads == 32 and get_config('RN50').text.num_hidden_layers == 3
    assert get_config('ViT-L-14-336').vision.image_size == 336


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match=r"Model 'ViT-X' not found; available models = \[.*'ViT-B-16'"):
        get_config('ViT-X')


def test_unknown_key_fails_loudly():
    d = get_config('ViT-B-16').to_dict()
    d['vision']['patchsize'] = 16
    with pytest.raises(ValueError, match=r"config.vision: unknown key\(s\) \['patchsize'\]"):
        CLIPConfig.from_dict(d)


def test_invalid_values_are_explained():
    with pytest.raises(ValueError, match='patch_size=15 must divide'):
        VisionConfig(image_size=224, patch_size=15)
    with pytest.raises(ValueError, match='four positive block counts'):
        VisionConfig(layers=[3, 4, 6])


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_dict_and_hub_round_trips(name, tmp_path):
    cfg = get_config(name)
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    vision, text = config_to_hub(cfg)
    assert config_from_hub(json.loads(json.dumps(vision)), text) == cfg
    assert match_architecture(cfg) == name
    cfg.save(tmp_path / 'c.json', name=name)
    assert CLIPConfig.from_file(tmp_path / 'c.json') == cfg


def test_resnet_layers_stored_as_list_and_string_form_parsed_without_eval():
    vision, text = config_to_hub(get_config('RN50'))
    assert vision['vision_layers'] == [3, 4, 6, 3]
    vision['vision_layers'] = '[3,4,6,3]'  # cn_clip's own RN50.json
    assert config_from_hub(vision, text) == get_config('RN50')
    vision['vision_layers'] = '__import__("os")'
    with pytest.raises(ValueError, match='cannot parse'):
        config_from_hub(vision, text)


def test_hub_config_unknown_key_is_named():
    vision, text = config_to_hub(get_config('ViT-B-16'))
    with pytest.raises(ValueError, match=r"unknown text key\(s\) \['text_foo'\]"):
        config_from_hub(vision, {**text, 'text_foo': 1})
