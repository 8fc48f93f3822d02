"""evaluation/zeroshot.py: zero-shot classification: the official templates as data, ImageFolder semantics, parity
with the official ``zeroshot_evaluation.py`` on a tiny golden model, known answers from a stub model, and
``cnclip zeroshot``."""
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip import load
from modelscope_cnclip.cli import main
from modelscope_cnclip.data import COLORS, _draw
from modelscope_cnclip.evaluation.zeroshot import (
    ImageFolder,
    classify,
    elevater_output,
    evaluate_zeroshot,
    read_classnames,
    template_sets,
    templates,
    templates_for_dataset,
    zeroshot_classifier,
)

from golden.weights import load_spec, make_state_dict
from helpers import GOLDEN

ZS = json.loads((GOLDEN / 'zeroshot' / 'golden.json').read_text(encoding='utf-8'))


# --- templates and class names -------------------------------------------------------------------------------------

def test_official_template_sets():
    assert template_sets() == {'aircraft': 100, 'caltech101': 16, 'cars': 7, 'cifar100': 11, 'country211': 4,
                               'dtd': 6, 'eurosat': 24, 'fer': 5, 'flower': 32, 'food': 21, 'hatefulmemes': 2,
                               'kitti': 3, 'normal': 1, 'openai': 183, 'patch': 3, 'pet': 6, 'openai_imagenet': 80}
    openai = templates('openai')
    assert openai[:3] == ['{}的照片', '质量差的{}的照片', '许多{}的照片'] and openai[-1] == '{}的卫星照片'
    assert templates('flower')[0] == '一种叫{}的花的照片' and templates('caltech101')[11] == '一个豪华的{}.'
    assert templates('openai_imagenet')[0] == '{}的照片。'
    for name in template_sets():
        for t in templates(name):
            assert t.count('{}') == 1 and '{' not in t.replace('{}', '') and '}' not in t.replace('{}', '')


def test_dataset_to_template_set_is_the_official_table():
    assert templates_for_dataset('food-101') == ('food', templates('food'))
    assert templates_for_dataset('resisc45_clip')[0] == 'eurosat'  # the official table's choice
    assert templates_for_dataset('fgvc-aircraft-2013b-variants102')[0] == 'aircraft'
    assert templates_for_dataset('imagenet') == ('openai', templates('openai'))  # any other dataset
    assert templates('oxford-flower-102') == templates('flower')


def test_template_file_and_errors(tmp_path):
    f = tmp_path / 't.txt'
    f.write_text('一张{}的照片\n\n  {}的画  \n', encoding='utf-8')
    assert templates(f) == ['一张{}的照片', '{}的画']
    f.write_text('一张{}的照片\n没有占位符\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r't.txt:2: template .* has no \{\}'):
        templates(f)
    with pytest.raises(ValueError, match=r"templates 'opnai': not a file, a template set \[.*'openai'"):
        templates('opnai')


def test_imagenet_classnames_and_label_files(tmp_path):
    names = read_classnames('imagenet')
    assert len(names) == 1000 and names[:3] == ['丁鲷', '金鱼', '大白鲨'] and names[-1] == '卫生纸'
    f = tmp_path / 'labels.txt'
    f.write_text('猫\n狗\n\n', encoding='utf-8')
    assert read_classnames(f) == ['猫', '狗']
    f.write_text('猫\n\n狗\n', encoding='utf-8')
    with pytest.raises(ValueError, match=r'labels.txt:2: empty class name'):
        read_classnames(f)
    with pytest.raises(FileNotFoundError, match='"imagenet"'):
        read_classnames(tmp_path / 'nope.txt')


# --- the official evaluation on the tiny golden model ----------------------------------------------------------------

def golden_folder(root: Path) -> Path:
    for rel, src in ZS['layout'].items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            dst.write_text('not an image')
        else:
            shutil.copyfile(GOLDEN / 'inputs' / src, dst)
    return root


@pytest.fixture(scope='module')
def golden_model(tmp_path_factory):
    d = tmp_path_factory.mktemp('zs') / ZS['model']
    shutil.copytree(GOLDEN / ZS['model'], d, ignore=shutil.ignore_patterns('golden.*', 'spec.json'))
    sd = make_state_dict(load_spec(GOLDEN / ZS['model'] / 'spec.json'), ZS['seed'])
    torch.save({'state_dict': sd}, d / 'pytorch_model.bin')
    return d, load(d)


def test_image_folder_order_is_torchvision_s(tmp_path):
    folder = ImageFolder(golden_folder(tmp_path))
    assert folder.classes == ZS['classes']
    assert [(str(Path(p).relative_to(tmp_path)), t) for p, t in folder.samples] == [tuple(s) for s in ZS['samples']]


def test_matches_official_zeroshot_evaluation(tmp_path, golden_model):
    _, model = golden_model
    classifier = zeroshot_classifier(model, ZS['classnames'], ZS['templates'])
    assert (classifier - torch.tensor(ZS['classifier'])).abs().max() < 2e-5
    res = evaluate_zeroshot(model, golden_folder(tmp_path), ZS['classnames'], ZS['templates'], batch_size=4,
                            per_class=True)
    want = torch.tensor(ZS['probs'], dtype=torch.float32)
    # The one deliberate difference: the reference clips a 16-bit image at 255 (mostly white); the plugin scales it
    # to 8 bits first (tests/test_parity.py), so that row is the scaled image's prediction.
    row16 = next(i for i, (p, _) in enumerate(ZS['samples']) if p.endswith('i16.png'))
    reference_row16 = want[row16].clone()
    scaled = Image.fromarray(((np.asarray(Image.open(GOLDEN / 'inputs' / 'i16.png')).astype(np.uint32) + 128) //
                              257).astype(np.uint8))
    want[row16] = classify(model, [scaled], classifier)[0]
    assert (want[row16] - reference_row16).abs().max() > 1e-3
    assert (res['logits'] - want).abs().max() < 1e-4
    top1 = float((want.argmax(1) == torch.tensor([t for _, t in ZS['samples']])).float().mean())
    assert res['top1'] == pytest.approx(100 * top1) and res['n_images'] == 10 and res['n_classes'] == 3
    assert res['targets'].tolist() == [t for _, t in ZS['samples']] and res['skipped'] == []
    hits = (want.argmax(1) == res['targets']).tolist()
    assert res['per_class'] == pytest.approx([100 * np.mean(hits[i:j]) for i, j in [(0, 3), (3, 6), (6, 10)]])
    # classify() on the same images gives the same rows (an independent path: pixels straight from the files)
    probs = classify(model, [str(tmp_path / p) for p, _ in ZS['samples'][3:6]], classifier)
    assert (probs - want[3:6]).abs().max() < 1e-4

    text = elevater_output(model, 'golden', res['logits'], tmp_path / 'out', arch='ViT-B-16')
    assert (tmp_path / 'out' / 'golden.json').read_text(encoding='utf-8') == text
    got, ref = json.loads(text), json.loads(ZS['elevater_json'])
    assert list(got) == list(ref)
    assert {k: v for k, v in got.items() if k != 'predictions'} == {k: v for k, v in ref.items() if k != 'predictions'}
    same = [i for i in range(10) if i != row16]
    assert np.abs(np.array(got['predictions'])[:, same] - np.array(ref['predictions'])[:, same]).max() < 1e-4
    assert all(len(repr(x).split('.')[-1]) <= 6 for row in got['predictions'][0] for x in row)
    assert json.loads(elevater_output(model, 'golden', res['logits'], index=[2, 0]))['predictions'][0] == \
        [got['predictions'][0][2], got['predictions'][0][0]]


# --- known answers: a stub model that sees colours ---------------------------------------------------------------

CLASSES = ['红色', '绿色', '蓝色']


class ColourModel:
    """Embeds an image as the one-hot of the class colour covering most of it, and a text as the one-hot of the
    colour it names: zero-shot top-1 must be exactly 100%."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode_image(self, images, batch_size=64):
        rgb = torch.tensor([COLORS[c] for c in CLASSES], dtype=torch.float32)  # (3, 3)
        out = []
        for img in images:
            px = torch.from_numpy(np.asarray(img.convert('RGB'), dtype=np.float32)).view(-1, 1, 3)
            near = ((px - rgb).abs().sum(-1) < 30).sum(0)  # pixels of each class colour
            out.append(F.one_hot(near.argmax(), len(CLASSES)).float())
        return torch.stack(out)

    def encode_text(self, texts, batch_size=64):
        self.texts += texts
        return torch.stack([F.one_hot(torch.tensor(next(i for i, c in enumerate(CLASSES) if c in t)), len(CLASSES))
                            for t in texts]).float()


def colour_folder(root: Path, per_class: int = 3) -> Path:
    rng = random.Random(0)
    for i, colour in enumerate(CLASSES):
        for j in range(per_class):
            d = root / f'{i:02d}' / ('nested' if j == 2 else '')
            d.mkdir(parents=True, exist_ok=True)
            _draw(COLORS[colour], rng.choice(['圆形', '正方形']), 0.5, 48, rng).save(d / f'{j}.png')
    return root


def test_known_answers_with_a_stub_model(tmp_path):
    root = colour_folder(tmp_path / 'imgs')
    model = ColourModel()
    res = evaluate_zeroshot(model, root, CLASSES, ['一张{}的照片', '“{}”的PHOTO'], batch_size=4, per_class=True)
    assert res['top1'] == 100.0 and res['top5'] == 100.0 and res['per_class'] == [100.0] * 3
    assert res['n_images'] == 9 and res['logits'].argmax(1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the official text preprocessing: lower case, curly quotes -> '"'
    assert '"红色"的photo' in model.texts and not any('“' in t or 'PHOTO' in t for t in model.texts)
    wrong = evaluate_zeroshot(model, root, CLASSES[1:] + CLASSES[:1], ['{}'], per_class=True)
    assert wrong['top1'] == 0.0 and wrong['top5'] == 100.0  # 3 classes: every class is in the top 5


def test_unreadable_images_and_label_mismatch(tmp_path):
    root = colour_folder(tmp_path / 'imgs')
    (root / '01' / 'broken.jpg').write_bytes(b'not a jpeg')
    model = ColourModel()
    with pytest.raises(ValueError, match=r'01/broken.jpg: unreadable image .*skip_errors=True'):
        evaluate_zeroshot(model, root, CLASSES, ['{}'])
    res = evaluate_zeroshot(model, root, CLASSES, ['{}'], skip_errors=True)
    assert [Path(p).name for p, _ in res['skipped']] == ['broken.jpg'] and 'cannot decode' in res['skipped'][0][1]
    assert res['n_images'] == 9 and res['top1'] == 100.0
    with pytest.raises(ValueError, match=r'2 class names for 3 class folders in .*\(00, 01, 02\): give one name'):
        evaluate_zeroshot(model, root, CLASSES[:2], ['{}'])
    with pytest.raises(TypeError, match=r"templates\('openai'\)"):
        zeroshot_classifier(model, CLASSES, 'openai')
    (root / '03').mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image in the class folders \['03'\]"):
        ImageFolder(root)


# --- CLI -------------------------------------------------------------------------------------------------------------

def test_cli_zeroshot(tmp_path, golden_model, capsys):
    model_dir, _ = golden_model
    images = golden_folder(tmp_path / 'imgs')
    (tmp_path / 'labels.txt').write_text('\n'.join(ZS['classnames']) + '\n', encoding='utf-8')
    (tmp_path / 'templates.txt').write_text('\n'.join(ZS['templates']) + '\n', encoding='utf-8')
    assert main(['zeroshot', str(model_dir), '--images', str(images), '--labels', str(tmp_path / 'labels.txt'),
                 '--templates', str(tmp_path / 'templates.txt'), '--dataset', 'golden',
                 '--out', str(tmp_path / 'out'), '--batch-size', '4']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {'top1': pytest.approx(100 * ZS['top1']), 'top5': 100.0, 'n_images': 10, 'n_classes': 3,
                   'templates': str(tmp_path / 'templates.txt'), 'n_skipped': 0}
    saved = json.loads((tmp_path / 'out' / 'golden.json').read_text())
    assert saved['dataset_name'] == 'golden' and len(saved['predictions'][0]) == 10
    assert main(['zeroshot', str(model_dir), '--images', str(images), '--labels', 'imagenet']) == 2
    assert '1000 class names for 3 class folders' in capsys.readouterr().err
