"""The ModelScope model cards in model_cards/: front matter, API names and published numbers (no network)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import modelscope_cnclip

CARDS = Path(__file__).resolve().parent.parent / 'model_cards'

# Source of truth: MUGE text-to-image (valid) R@1 / R@5 / R@10 / MR, as published by the Chinese CLIP authors.
PUBLISHED = {
    'RN50': {'zero-shot': (42.6, 68.6, 77.9, 63.0), 'finetuned': (48.6, 75.1, 84.0, 69.2)},
    'ViT-B-16': {'zero-shot': (52.1, 76.7, 84.4, 71.1), 'finetuned': (58.4, 83.6, 90.0, 77.4)},
    'ViT-L-14': {'zero-shot': (56.3, 79.8, 86.2, 74.1), 'finetuned': (63.3, 85.6, 91.3, 80.1)},
    'ViT-L-14-336': {'zero-shot': (59.0, 81.4, 87.8, 76.1), 'finetuned': (65.3, 86.7, 92.1, 81.3)},
    'ViT-H-14': {'zero-shot': (63.0, 84.1, 89.2, 78.8), 'finetuned': (68.9, 88.7, 93.1, 83.6)},
}
# Published parameter counts (all / vision / text; ViT-L-14-336 only has a total).
PARAMS = {
    'RN50': ('77.0M', '38.3M', '37.9M'),
    'ViT-B-16': ('188.3M', '86.2M', '101.7M'),
    'ViT-L-14': ('406.2M', '304.0M', '101.7M'),
    'ViT-L-14-336': ('406.6M',),
    'ViT-H-14': ('957.6M', '632.1M', '324.5M'),
}
POKEMON_PROBS = '[1.2687e-03, 5.4369e-02, 6.7958e-04, 9.4368e-01]'

REQUIRED = {
    'tasks': ['multi-modal-embedding', 'image-text-retrieval'],
    'frameworks': ['pytorch'],
    'domain': ['multi-modal'],
    'language': ['zh'],
    'license': 'Apache License 2.0',
    'metrics': ['R@1', 'R@5', 'R@10', 'MR'],
    'tags': ['Chinese CLIP', 'image-text retrieval', 'zero-shot classification', 'modelscope_cnclip'],
    'datasets': {'evaluation': ['MUGE']},
    'model-type': ['clip'],
}


def _scalar(text: str) -> str | list[str]:
    text = text.strip()
    if text.startswith('[') and text.endswith(']'):
        return [item.strip() for item in text[1:-1].split(',') if item.strip()]
    return text


def parse_front_matter(card: str) -> tuple[dict, str]:
    """A tiny YAML subset: ``key: scalar``, ``key: [a, b]``, ``key:`` + ``  - item`` lines, one nested mapping level."""
    lines = card.splitlines()
    assert lines and lines[0].strip() == '---', 'card must start with a --- front matter line'
    end = next(i for i in range(1, len(lines)) if lines[i].strip() == '---')
    meta: dict = {}
    key = sub = None
    for raw in lines[1:end]:
        if not raw.strip() or raw.lstrip().startswith('#'):
            continue
        indent = len(raw) - len(raw.lstrip())
        line = raw.strip()
        if line.startswith('- '):
            target = meta[key] if sub is None else meta[key][sub]
            if isinstance(target, dict) and not target:  # first item of an empty block: it is a list
                target = []
                if sub is None:
                    meta[key] = target
                else:
                    meta[key][sub] = target
            target.append(line[2:].strip())
            continue
        k, _, v = line.partition(':')
        if indent == 0:
            key, sub = k.strip(), None
            meta[key] = _scalar(v) if v.strip() else {}
        else:
            sub = k.strip()
            meta[key][sub] = _scalar(v) if v.strip() else {}
    return meta, '\n'.join(lines[end + 1:])


def load(name: str) -> tuple[dict, str]:
    return parse_front_matter((CARDS / f'{name}.md').read_text(encoding='utf-8'))


def section(body: str, title: str) -> str:
    m = re.search(rf'^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)', body, re.M | re.S)
    assert m, f'missing section "## {title}"'
    return m.group(1)


NAMES = sorted(modelscope_cnclip.available_models())


def test_one_card_per_architecture():
    assert set(PUBLISHED) == set(NAMES)
    assert sorted(p.stem for p in CARDS.glob('*.md')) == NAMES


def test_parser_agrees_with_yaml():
    yaml = pytest.importorskip('yaml')
    for name in NAMES:
        text = (CARDS / f'{name}.md').read_text(encoding='utf-8')
        assert yaml.safe_load(text.split('---')[1]) == load(name)[0]


@pytest.mark.parametrize('name', NAMES)
def test_front_matter(name):
    meta, _ = load(name)
    for key, value in REQUIRED.items():
        assert meta.get(key) == value, key
    assert meta['architecture'] == name
    assert isinstance(meta['backbone'], list) and len(meta['backbone']) == 2


@pytest.mark.parametrize('name', NAMES)
def test_published_results(name):
    _, body = load(name)
    rows = {}
    for line in section(body, 'Published results').splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if cells and cells[0].lower() in ('zero-shot', 'finetuned'):
            assert cells[0].lower() not in rows, f'duplicate {cells[0]} row'
            rows[cells[0].lower()] = tuple(float(c) for c in cells[1:])
    assert rows == PUBLISHED[name]
    for r1, r5, r10, mr in rows.values():
        assert abs((r1 + r5 + r10) / 3 - mr) <= 0.1  # MR is the mean of the three recalls


@pytest.mark.parametrize('name', NAMES)
def test_description_and_usage(name):
    _, body = load(name)
    cfg = modelscope_cnclip.get_config(name)
    desc = section(body, 'Model description')
    for count in PARAMS[name]:
        assert count in desc
    assert f'{cfg.vision.image_size} x {cfg.vision.image_size}' in desc
    assert f'embedding dimension: {cfg.embed_dim}' in desc

    usage = section(body, 'How to use with this plugin')
    assert 'pip install modelscope_cnclip' in usage and 'import modelscope_cnclip' in usage
    assert ("pipeline_name='cnclip-multi-modal-embedding'" in usage
            or re.search(r"cnclip convert \S+ --out (\S+)", usage))
    assert "p.forward({'img': " in usage and "['img_embedding']" in usage
    assert "p({'text': [" in usage and "['text_embedding']" in usage
    assert 'probs = ((img / p.model.temperature) @ txt.t()).softmax(-1)' in usage
    assert re.search(r'^cnclip similarity \S+ \S+ 杰尼龟 妙蛙种子 小火龙 皮卡丘$', usage, re.M)
    assert 'arXiv:2211.01335' in section(body, 'Citation')
    for title in ('Intended use', 'Limitations'):
        section(body, title)


def test_rn50_uses_a_converted_plugin_dir():
    usage = section(load('RN50')[1], 'How to use with this plugin')
    assert 'cnclip convert clip_cn_rn50.pt --out rn50-plugin' in usage
    assert "pipeline(task=Tasks.multi_modal_embedding, model='rn50-plugin')" in usage
    assert "model='damo/" not in usage


def test_vit_b_16_gives_the_pokemon_example():
    _, body = load('ViT-B-16')
    assert POKEMON_PROBS in section(body, 'Published results')
    assert "model='damo/multi-modal_clip-vit-base-patch16_zh'" in body
