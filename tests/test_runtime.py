"""runtime/ and the exported dir as a model source: load() with every backend, the ModelScope pipeline, the CLI,
embedding jobs (local and Ray), indexes built with the torch model searched with its export, the errors of a
backend that cannot run a source, a broken or incomplete exported dir, and a missing runtime. (Writing exports and
their parity: test_deploy.py.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelscope_cnclip import convert, load, read_source
from modelscope_cnclip.cli import main
from modelscope_cnclip.deploy import export
from modelscope_cnclip.embeddings import load_embeddings
from modelscope_cnclip.jobs import ShardSettings, embed_collection
from modelscope_cnclip.runtime import MANIFEST, is_export_dir, read_manifest

from helpers import REPO

pytest.importorskip('onnxruntime')
pytest.importorskip('openvino')


@pytest.fixture(scope='module')
def onnx_dir(tmp_path_factory, plugin_vit_dir) -> Path:
    return Path(export(plugin_vit_dir, tmp_path_factory.mktemp('export') / 'vit.onnx').out)


@pytest.fixture(scope='module')
def exported(onnx_dir):
    return load(onnx_dir)


@pytest.fixture()
def photo_dir(tmp_path, images) -> Path:
    d = tmp_path / 'photos'
    d.mkdir()
    for n, img in enumerate(images):
        img.save(d / f'{n}.png')
    (d / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
    return d


def test_load_gives_the_same_api_and_numbers(exported, tiny_model, images, photo):
    assert exported.fingerprint == tiny_model.fingerprint and exported.config == tiny_model.config
    assert exported.info() == {**tiny_model.info(), 'source': exported.source, 'backend': 'onnxruntime'}
    assert exported.num_params == tiny_model.num_params and exported.device == torch.device('cpu')
    for inputs in (images, photo, torch.from_numpy(np.stack([photo, photo]))):
        assert (exported.encode_image(inputs) - tiny_model.encode_image(inputs)).abs().max() < 1e-5
    raw = exported.encode_text(['猫', '狗'], normalize=False)
    assert (raw - tiny_model.encode_text(['猫', '狗'], normalize=False)).abs().max() < 1e-4
    assert torch.allclose(exported.probabilities(images, ['猫', '狗', '鸟']),
                          tiny_model.probabilities(images, ['猫', '狗', '鸟']), atol=1e-5)
    with pytest.raises(ValueError, match='at least one text'):
        exported.similarity(images, [])


def test_the_pipeline_takes_an_exported_dir(onnx_dir, tiny_pipe, images):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(onnx_dir), device='cpu')
    out, ref = p({'img': images, 'text': ['猫', '狗']}), tiny_pipe({'img': images, 'text': ['猫', '狗']})
    for key in ('img_embedding', 'text_embedding'):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(len(out[key])), atol=1e-5)
        assert (out[key] - ref[key]).abs().max() < 1e-5
    assert torch.equal(p.model.temperature, tiny_pipe.model.temperature)
    assert p.model.clip is None and p.model.source_layout == 'export'
    with pytest.raises(ValueError, match='no torch weights'):
        p.model.save_pretrained(str(onnx_dir.parent / 'saved'))
    ov = pipeline(task=Tasks.multi_modal_embedding, model=str(onnx_dir), device='cpu', backend='openvino')
    assert ov.model.core.backend == 'openvino'


def test_cli_runs_exported_dirs(onnx_dir, plugin_vit_dir, photo_dir, tmp_path, capsys):
    img = str(photo_dir / '0.png')
    assert main(['similarity', str(plugin_vit_dir), img, '猫', '狗', '--json']) == 0
    ref = json.loads(capsys.readouterr().out)
    for backend in ([], ['--backend', 'openvino']):
        assert main(['similarity', str(onnx_dir), img, '猫', '狗', '--json', *backend]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got.keys() == ref.keys() and all(abs(got[k] - ref[k]) < 1e-5 for k in ref)
    assert main(['info', str(onnx_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['backend_format'] == 'onnx' and info['towers']['image']['file'] == 'image.onnx'
    assert main(['embed', str(onnx_dir), str(photo_dir), '--out', str(tmp_path / 'e'), '--no-progress']) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report['embedded'], report['failed']) == (3, 1)
    assert main(['export', str(plugin_vit_dir), str(tmp_path / 'x'), '--out', str(tmp_path / 'y')]) == 2
    assert 'give the output directory once' in capsys.readouterr().err
    assert main(['similarity', str(plugin_vit_dir), img, '猫', '--backend', 'openvino']) == 2
    assert 'export it first' in capsys.readouterr().err


def test_cli_export_prints_the_report(plugin_vit_dir, tmp_path, capsys):
    assert main(['export', str(plugin_vit_dir), '--out', str(tmp_path / 'ir'), '--format', 'openvino']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['format'] == 'openvino' and report['precision'] == {'image': 'fp32', 'text': 'fp32'}
    assert is_export_dir(tmp_path / 'ir')
    assert main(['export', str(plugin_vit_dir), str(tmp_path / 'ir')]) == 2
    assert 'not empty' in capsys.readouterr().err


def test_jobs_record_the_backend_and_refuse_mixing(onnx_dir, plugin_vit_dir, tiny_model, photo_dir, tmp_path):
    out = tmp_path / 'photos.emb'
    report = embed_collection(onnx_dir, photo_dir, out, settings=ShardSettings(shard_size=2))
    assert (report.embedded, report.failed) == (3, 1)
    emb = load_embeddings(out)
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['options'] == {'precision': 'fp32', 'backend': 'onnxruntime', 'fast_decode': False}
    assert meta['model']['fingerprint'] == tiny_model.fingerprint
    want = tiny_model.encode_image([str(photo_dir / i) for i in emb.ids])
    np.testing.assert_allclose(emb.vectors, want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match='backend'):  # the torch model may not resume it: other vectors
        embed_collection(plugin_vit_dir, photo_dir, out, settings=ShardSettings(shard_size=2))


def test_an_index_built_with_torch_is_searched_with_the_export(onnx_dir, tiny_model, photo_dir, tmp_path):
    pytest.importorskip('faiss')
    from modelscope_cnclip.index import Index, Searcher
    embed_collection(tiny_model, photo_dir, tmp_path / 'e')
    Index.build(tmp_path / 'e').save(tmp_path / 'idx')
    torch_hits = Searcher.open(tmp_path / 'idx').search('猫', k=3)
    onnx_hits = Searcher.open(tmp_path / 'idx', model=onnx_dir).search('猫', k=3)
    assert [h.id for h in torch_hits] == [h.id for h in onnx_hits]
    assert all(abs(a.score - b.score) < 1e-5 for a, b in zip(torch_hits, onnx_hits))


@pytest.mark.slow
def test_ray_workers_load_the_exported_dir(onnx_dir, exported, photo_dir, tmp_path):
    pytest.importorskip('ray')
    local = tmp_path / 'local.emb'
    embed_collection(exported, photo_dir, local, settings=ShardSettings(shard_size=2))
    out = tmp_path / 'ray.emb'
    code = ('import json, ray; from modelscope_cnclip.jobs import RayOptions, ShardSettings, embed_collection; '
            'ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False); '
            f'r = embed_collection({str(onnx_dir)!r}, {str(photo_dir)!r}, {str(out)!r}, backend="openvino", '
            'settings=ShardSettings(shard_size=2), engine="ray", ray=RayOptions(workers=2)); '
            'print(json.dumps(r.to_dict()))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_embeddings(local), load_embeddings(out)
    assert a.ids == b.ids and json.loads((out / 'meta.json').read_text())['options']['backend'] == 'openvino'
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)


# --- what cannot run where ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, words', [
    (dict(backend='torch'), "run it with backend='onnxruntime' or 'openvino'"),
    (dict(backend='tensorrt'), 'tensorrt'),
    (dict(backend='caffe'), "choose one of ['torch', 'onnxruntime', 'openvino', 'tensorrt']"),
    (dict(precision='bf16'), "computes in fp32; leave precision unset"),
    (dict(precision='fp16'), 'export the model again with --precision fp16'),
    (dict(config='ViT-B-16'), 'drop config'),
    (dict(backend='openvino', device='cuda:0'), 'OpenVINO backend runs on the CPU'),
])
def test_what_an_export_cannot_do_is_refused_with_the_fix(onnx_dir, kwargs, words, monkeypatch):
    if kwargs.get('device', '').startswith('cuda'):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises((ValueError, ImportError)) as e:
        load(onnx_dir, **kwargs)
    assert words in str(e.value)


def test_an_export_is_not_a_checkpoint(onnx_dir, plugin_vit_dir, tmp_path):
    for fn in (lambda: read_source(onnx_dir), lambda: convert(onnx_dir, tmp_path / 'c'),
               lambda: export(onnx_dir, tmp_path / 'again')):
        with pytest.raises(ValueError, match=r'exported model .* start from the checkpoint it was exported from \('
                                             + str(plugin_vit_dir)):
            fn()
    from modelscope.trainers import build_trainer
    with pytest.raises(ValueError, match='no torch weights to save or train'):
        build_trainer('cnclip-trainer', dict(model=str(onnx_dir), work_dir=str(tmp_path / 'w'),
                                             train_dataset=str(tmp_path)))
    with pytest.raises(ValueError, match='export it first'):
        load(plugin_vit_dir, backend='onnxruntime')


def test_a_broken_exported_dir_says_what_is_wrong(onnx_dir, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(onnx_dir, tmp_path / name))
    d = copy('missing')
    (d / 'text.onnx').unlink()
    with pytest.raises(FileNotFoundError, match='names text.onnx, which is missing'):
        load(d)
    d = copy('novocab')
    (d / 'vocab.txt').unlink()
    with pytest.raises(FileNotFoundError, match='vocab.txt is missing'):
        load(d)
    d = copy('corrupt')
    (d / MANIFEST).write_text('{"format": "cnclip-export", ')
    with pytest.raises(ValueError, match='invalid JSON'):
        load(d)
    d = copy('newer')
    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**manifest, 'version': 99}))
    with pytest.raises(ValueError, match='newer than this plugin reads'):
        read_manifest(d)
    (d / MANIFEST).write_text(json.dumps({**manifest, 'towers': {'image': manifest['towers']['image']}}))
    with pytest.raises(ValueError, match="malformed manifest .*'text'"):
        read_manifest(d)


@pytest.mark.parametrize('blocked, call', [
    ('onnxruntime', 'load'), ('openvino', 'openvino'), ('onnx', 'export'), ('nncf', 'int8')])
def test_a_missing_runtime_names_the_extra(onnx_dir, plugin_vit_dir, tmp_path, blocked, call):
    calls = {'load': f'load({str(onnx_dir)!r})',
             'openvino': f'load({str(onnx_dir)!r}, backend="openvino")',
             'export': f'export({str(plugin_vit_dir)!r}, {str(tmp_path / "o")!r})',
             'int8': f'export({str(plugin_vit_dir)!r}, {str(tmp_path / "o")!r}, format="openvino", '
                     f'precision="int8", calibration={str(tmp_path)!r})'}
    code = (f'import sys; sys.modules[{blocked!r}] = None\n'
            'from modelscope_cnclip import load\nfrom modelscope_cnclip.deploy import export\n'
            f'try:\n    {calls[call]}\nexcept ImportError as e:\n    print(e)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"needs the {blocked!r} package" in proc.stdout and 'modelscope_cnclip[export]' in proc.stdout
    assert not (tmp_path / 'o').exists()


# --- TensorRT (GPU) ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tensorrt_engine_with_a_dynamic_profile(plugin_vit_dir, tiny_model, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    pytest.importorskip('tensorrt')
    report = export(plugin_vit_dir, tmp_path / 'trt', format='tensorrt', precision='fp16', max_batch=16)
    assert {'image.plan', 'image.onnx', 'text.plan', 'text.onnx'} <= set(report.files)
    m = load(report.out, device='cuda')
    assert m.backend == 'tensorrt' and m.device.type == 'cuda'
    size = m.config.vision.image_size
    x = torch.rand(40, 3, size, size) * 3.9 - 1.8
    for b in (1, 3, 17, 40):  # 17 and 40 exceed the profile's max batch: run in chunks
        cos = torch.nn.functional.cosine_similarity(m.encode_image(x[:b]).cpu(), tiny_model.encode_image(x[:b]))
        assert cos.min() >= 0.999, b
    texts = ['猫', '一只在草地上奔跑的小狗' * 8, '皮卡丘']
    cos = torch.nn.functional.cosine_similarity(m.encode_text(texts).cpu(), tiny_model.encode_text(texts))
    assert cos.min() >= 0.999
    with pytest.raises(ValueError, match='built for at most 52'):
        m.encode_text(torch.full((1, 60), 101))
    on_ort = load(report.out, backend='onnxruntime', device='cuda')  # the fp16 ONNX it was built from
    assert torch.nn.functional.cosine_similarity(on_ort.encode_text(texts).cpu(),
                                                 tiny_model.encode_text(texts)).min() >= 0.999


@pytest.mark.gpu
def test_onnxruntime_cuda_provider(onnx_dir, tiny_model, images):
    ort = pytest.importorskip('onnxruntime')
    if not torch.cuda.is_available() or 'CUDAExecutionProvider' not in ort.get_available_providers():
        pytest.skip('needs a CUDA GPU and onnxruntime-gpu')
    m = load(onnx_dir, device='cuda')
    assert m.model._image.providers[0] == 'CUDAExecutionProvider'
    assert (m.encode_image(images) - tiny_model.encode_image(images)).abs().max() < 1e-4
