"""Process-level guarantees: what `import modelscope_cnclip` pulls in, the CLI, and ModelScope's built-in class."""
import json
import subprocess
import sys

import pytest
import torch

from modelscope_cnclip import convert, load
from modelscope_cnclip.cli import main

from helpers import REPO, TINY_VIT, write_official_pt


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_registers_everything_without_the_ofa_stack():
    out = run_python('''
import sys, json
import modelscope_cnclip
from modelscope.models.builder import MODELS
from modelscope.pipelines.builder import PIPELINES
from modelscope.preprocessors.builder import PREPROCESSORS
heavy = ('timm', 'torchvision', 'cv2', 'librosa', 'fairseq', 'decord', 'modelscope.models.multi_modal.',
         'modelscope.trainers.multi_modal.', 'modelscope.preprocessors.multi_modal',
         'modelscope.pipelines.multi_modal.')  # the subpackages themselves are lazy placeholders
print(json.dumps({
    'heavy': [m for m in sys.modules if m.startswith(heavy)],
    'optional': [m for m in ('faiss', 'ray', 'decord', 'av') if m in sys.modules],  # extras load on first use
    'model': MODELS.get('cnclip', 'multi-modal-embedding') is not None,
    'model_itr': MODELS.get('cnclip', 'image-text-retrieval') is not None,
    'pipeline': PIPELINES.get('cnclip-multi-modal-embedding', 'multi-modal-embedding') is not None,
    'pipeline_itr': PIPELINES.get('cnclip-multi-modal-embedding', 'image-text-retrieval') is not None,
    'preprocessor': PREPROCESSORS.get('cnclip-preprocessor', 'multi-modal') is not None,
}))
''')
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {'heavy': [], 'optional': [], 'model': True, 'model_itr': True, 'pipeline': True,
                   'pipeline_itr': True, 'preprocessor': True}


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, '-m', 'modelscope_cnclip', 'models'], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith('RN50\t')


def test_root_configuration_is_the_plugin_dir_configuration(plugin_vit_dir):
    root = json.loads((REPO / 'configuration.json').read_text())
    written = json.loads((plugin_vit_dir / 'configuration.json').read_text())
    assert root == written
    assert root['model']['type'] == 'cnclip' and root['task'] == 'multi-modal-embedding'
    assert root['pipeline']['type'] == 'cnclip-multi-modal-embedding'
    assert root['preprocessor']['type'] == 'cnclip-preprocessor'
    hooks = [h['type'] for h in root['train']['hooks']]
    assert {'BestCkptSaverHook', 'EvaluationHook', 'ClipClampLogitScaleHook'} <= set(hooks)
    assert root['train']['optimizer_hparams']['lr'] == 2.5e-5 and root['dataset']['column_map'] == \
        {'img': 'image', 'text': 'query'}


def test_cli_similarity_info_convert(tmp_path, hub_vit_dir, images, capsys):
    images[0].save(tmp_path / 'cat.png')
    assert main(['similarity', str(hub_vit_dir), str(tmp_path / 'cat.png'), '猫', '狗', '--json']) == 0
    probs = json.loads(capsys.readouterr().out)
    assert set(probs) == {'猫', '狗'} and abs(sum(probs.values()) - 1) < 1e-5
    want = load(hub_vit_dir).probabilities(tmp_path / 'cat.png', ['猫', '狗'])[0]
    assert torch.allclose(torch.tensor([probs['猫'], probs['狗']]), want)

    assert main(['similarity', str(hub_vit_dir), str(tmp_path / 'cat.png'), '猫', '狗']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 2 for line in lines)

    assert main(['info', str(hub_vit_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['layout'] == 'hub' and info['architecture'] == 'custom'

    assert main(['convert', str(hub_vit_dir), '--out', str(tmp_path / 'hf'), '--to', 'hf']) == 0
    assert (tmp_path / 'hf' / 'model.safetensors').is_file()


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(['similarity', str(tmp_path / 'none'), 'x.jpg', '猫']) == 2
    err = capsys.readouterr().err
    assert err.startswith('cnclip similarity: error: model source') and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(['convert', 'a', '--out', 'b', '--to', 'onnx'])


def test_to_hub_output_loads_in_modelscope_builtin_class(tmp_path, vit_sd, images):
    pytest.importorskip('six')  # the built-in module's own dependency
    pt = write_official_pt(tmp_path / 'tiny.pt', vit_sd)
    hub = convert(pt, tmp_path / 'hub', to='hub', config=TINY_VIT)
    images[0].save(tmp_path / 'a.png')
    ours = load(hub)
    want_img = ours.encode_image(tmp_path / 'a.png')
    want_txt = ours.encode_text(['皮卡丘', '一只猫'])
    # In a subprocess: importing the built-in class must never leak into the plugin's process.
    out = run_python(f'''
import json, torch
from PIL import Image
from modelscope.models.multi_modal.clip.model import CLIPForMultiModalEmbedding
from modelscope_cnclip import image_transform, get_tokenizer
m = CLIPForMultiModalEmbedding({str(hub)!r})
img = image_transform(image_size=64)(Image.open({str(tmp_path / 'a.png')!r}))[None]
ids = get_tokenizer()(['皮卡丘', '一只猫'], padding='max_length')['input_ids']
out = m.forward({{'img': img, 'text': ids}})
print(json.dumps({{'img': out['img_embedding'].tolist(), 'text': out['text_embedding'].tolist()}}))
''')
    got = json.loads(out.strip().splitlines()[-1])
    # The built-in class rounds weights to fp16 on load, hence the looser tolerance.
    assert torch.allclose(torch.tensor(got['img']), want_img, atol=5e-3)
    assert torch.allclose(torch.tensor(got['text']), want_txt, atol=5e-3)
