"""deploy/ (export) and runtime/ (running exported dirs): parity of exported towers with the torch model on tiny
models of all five architectures, at batch sizes a trace could get wrong and every text length; fp16 and bf16;
int8 calibrated and gated on the model trained in the test suite; every source layout; refusals before any work.
How exported dirs behave as model sources (pipeline, CLI, jobs, indexes, errors): test_runtime.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modelscope_cnclip import convert, load
from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
from modelscope_cnclip.data import make_synthetic_split
from modelscope_cnclip.deploy import Int8Gate, export
from modelscope_cnclip.evaluation.retrieval import evaluate_split
from modelscope_cnclip.runtime import MANIFEST, read_manifest

from helpers import TINY_ARCHS, TINY_VIT, random_state_dict, write_official_pt

pytest.importorskip('onnxruntime')
pytest.importorskip('openvino')

TRACE_BATCH = 2  # the example batch the exporter traces with (deploy/graphs.py)
BIG_BATCH = 40  # > TRACE_BATCH, and rows (40 x tokens) > the chunked MLP's 256: a frozen loop would show here
BATCHES = (1, 3, 17, BIG_BATCH)
CONTEXT = 52


def pixels(cfg, n: int, seed: int = 0) -> torch.Tensor:
    """Normalised pixels in the range real images give."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    return torch.rand(n, 3, size, size, generator=g) * 3.9 - 1.8


def token_rows(vocab: int, seed: int = 0) -> torch.Tensor:
    """One row of each length 1..52 ([CLS] ... [SEP] from length 2 on), padded to 52 with [PAD]=0, shuffled."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(CONTEXT, CONTEXT, dtype=torch.long)
    for n in range(1, CONTEXT + 1):
        rows[n - 1, :n] = torch.randint(106, vocab, (n,), generator=g)
        rows[n - 1, 0] = 101
        if n > 1:
            rows[n - 1, n - 1] = 102
    return rows[torch.randperm(CONTEXT, generator=g)]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope='module')
def arch_dirs(tmp_path_factory):
    """A plugin dir of each tiny architecture and its fp32 ONNX export."""
    root = tmp_path_factory.mktemp('archs')
    out = {}
    for n, (name, cfg) in enumerate(TINY_ARCHS.items()):
        src = write_dir(Checkpoint(random_state_dict(cfg, seed=10 + n), cfg), root / name)
        out[name] = (src, export(src, root / f'{name}.onnx').out)
    return out


@pytest.mark.parametrize('arch', list(TINY_ARCHS))
def test_onnx_fp32_matches_torch_at_every_batch_size_and_text_length(arch_dirs, arch):
    src, out = arch_dirs[arch]
    ref, exp = load(src), load(out)
    cfg = ref.config
    assert exp.backend == 'onnxruntime' and exp.precision == 'fp32' and exp.fingerprint == ref.fingerprint
    x = pixels(cfg, BIG_BATCH)
    for b in BATCHES:
        assert max_abs(exp.encode_image(x[:b], batch_size=b), ref.encode_image(x[:b], batch_size=b)) < 1e-5, b
    ids = token_rows(cfg.text.vocab_size)
    # each length alone (its own graph shape), then all lengths in batches that pad to the longest
    for row in ids:
        one = row[:int(row.ne(0).sum())][None]
        assert max_abs(exp.encode_text(one), ref.encode_text(one)) < 1e-5, one.shape
    for b in (3, 17, CONTEXT):
        assert max_abs(exp.encode_text(ids, batch_size=b), ref.encode_text(ids, batch_size=b)) < 1e-5, b
    texts = ['猫', '一只在草地上奔跑的小狗' * 8, '皮卡丘', 'a b c']
    assert max_abs(exp.encode_text(texts), ref.encode_text(texts)) < 1e-5
    assert torch.equal(exp.temperature, ref.temperature)


@pytest.mark.parametrize('arch', ['RN50', 'ViT-H-14'])
def test_openvino_runs_the_onnx_export_and_its_own_ir_exactly(arch_dirs, arch, tmp_path):
    src, out = arch_dirs[arch]
    ref = load(src)
    ir = export(src, tmp_path / 'ir', format='openvino')
    assert sorted(ir.files) == ['cnclip_export.json', 'configuration.json', 'image.bin', 'image.xml', 'text.bin',
                                'text.xml', 'vocab.txt']
    x, ids = pixels(ref.config, BIG_BATCH), token_rows(ref.config.text.vocab_size)
    for m in (load(out, backend='openvino'), load(ir.out)):
        assert m.backend == 'openvino' and m.precision == 'fp32'
        for b in BATCHES:
            assert max_abs(m.encode_image(x[:b]), ref.encode_image(x[:b])) < 1e-5, b
        assert max_abs(m.encode_text(ids, batch_size=CONTEXT), ref.encode_text(ids, batch_size=CONTEXT)) < 1e-5


@pytest.mark.parametrize('arch', ['ViT-B-16', 'RN50'])
def test_fp16_and_bf16_keep_cosine(arch_dirs, arch, tmp_path):
    src, out = arch_dirs[arch]
    ref = load(src)
    half = load(export(src, tmp_path / 'fp16', precision='fp16').out)  # ONNX Runtime runs fp16 graphs on CPUs too
    bf16 = load(out, backend='openvino', precision='bf16')  # fp32 where the CPU has no bf16
    assert half.precision == 'fp16' and bf16.precision == 'bf16'
    x, ids = pixels(ref.config, 17), token_rows(ref.config.text.vocab_size)
    for m in (half, bf16):
        assert F.cosine_similarity(m.encode_image(x), ref.encode_image(x)).min() >= 0.999
        assert F.cosine_similarity(m.encode_text(ids), ref.encode_text(ids)).min() >= 0.999


def test_every_source_layout_exports_the_same_model(tmp_path, vit_sd, hub_vit_dir, plugin_vit_dir):
    official = write_official_pt(tmp_path / 'epoch_3.pt', vit_sd)
    hf = convert(plugin_vit_dir, tmp_path / 'hf', to='hf')
    ref = load(plugin_vit_dir)
    x, ids = pixels(ref.config, 3), token_rows(ref.config.text.vocab_size)[:5]
    for n, source in enumerate([plugin_vit_dir, hub_vit_dir, official, hf]):
        m = load(export(source, tmp_path / f'out{n}', config=TINY_VIT if source == official else None).out)
        assert m.fingerprint == ref.fingerprint, source
        assert max_abs(m.encode_image(x), ref.encode_image(x)) < 1e-5
        assert max_abs(m.encode_text(ids), ref.encode_text(ids)) < 1e-5


def test_the_exported_dir_describes_itself(arch_dirs, tmp_path):
    src, out = arch_dirs['ViT-L-14-336']
    moved = shutil.copytree(out, tmp_path / 'elsewhere' / 'model')  # nothing outside the dir is needed
    shutil.rmtree(src)  # not even the checkpoint it came from
    m = read_manifest(moved)
    assert m.config == TINY_ARCHS['ViT-L-14-336'] and m.format == 'onnx' and m.num_params['total'] > 0
    assert {f.name for f in moved.iterdir()} == {MANIFEST, 'configuration.json', 'image.onnx', 'text.onnx',
                                                  'vocab.txt'}
    model = load(moved)
    assert model.transform.size == 84 and model.tokenizer.context_length == 52
    assert model.encode_text(['猫']).shape == (1, m.config.embed_dim)
    graph = json.loads((moved / MANIFEST).read_text())
    assert graph['details']['opset'] == 17 and graph['details']['io']['image'] == ['pixel_values', 'image_features']


def test_weights_over_the_protobuf_limit_go_to_one_data_file(tmp_path, plugin_vit_dir):
    ref = load(plugin_vit_dir)
    report = export(plugin_vit_dir, tmp_path / 'big', external_data_bytes=0)  # as ViT-H-14's fp32 image tower
    assert {'image.onnx', 'image.onnx.data', 'text.onnx', 'text.onnx.data'} <= set(report.files)
    assert len(report.files) == 7  # one data file per tower, not one per tensor
    x = pixels(ref.config, 3)
    for backend in ('onnxruntime', 'openvino'):
        m = load(report.out, backend=backend)
        assert max_abs(m.encode_image(x), ref.encode_image(x)) < 1e-5
    ir = export(plugin_vit_dir, tmp_path / 'big_ir', format='openvino', external_data_bytes=0)
    assert max_abs(load(ir.out).encode_image(x), ref.encode_image(x)) < 1e-5


# --- refusals: before anything is read or written ----------------------------------------------------------------

@pytest.mark.parametrize('kwargs, error, words', [
    (dict(format='tflite'), ValueError, "choose one of ['onnx', 'openvino', 'tensorrt']"),
    (dict(format='openvino', precision='fp16'), ValueError, "bf16: export fp32, then load(dir, precision='bf16')"),
    (dict(precision='bf16'), ValueError, 'holds fp32 or fp16 or int8'),
    (dict(precision='int8'), ValueError, 'needs calibration inputs (--calibration)'),
    (dict(calibration='x'), ValueError, 'calibration is used by precision=int8 only'),
    (dict(opset=9), ValueError, 'opset=9'),
    (dict(max_batch=0), ValueError, 'max_batch=0'),
])
def test_bad_options_are_refused_first(tmp_path, kwargs, error, words):
    with pytest.raises(error) as e:
        export(tmp_path / 'not-read', tmp_path / 'out', **kwargs)
    assert words in str(e.value)
    assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA machine builds TensorRT engines')
def test_tensorrt_without_a_gpu_says_what_to_do(tmp_path, plugin_vit_dir):
    pytest.importorskip('tensorrt', reason='without tensorrt the error names the package instead')
    with pytest.raises(ValueError, match='--format onnx --precision fp16'):
        export(plugin_vit_dir, tmp_path / 'trt', format='tensorrt', precision='fp16')


def test_tensorrt_without_the_package_names_it(tmp_path, plugin_vit_dir, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'tensorrt', None)
    with pytest.raises(ImportError, match='pip install tensorrt'):
        export(plugin_vit_dir, tmp_path / 'trt', format='tensorrt', precision='fp16')


def test_an_existing_dir_is_kept_and_a_failed_export_leaves_nothing(tmp_path, plugin_vit_dir, monkeypatch):
    taken = tmp_path / 'taken'
    taken.mkdir()
    (taken / 'mine.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='overwrite'):
        export(plugin_vit_dir, taken)
    assert (taken / 'mine.txt').read_text() == 'keep me'
    import modelscope_cnclip.deploy.exporter as ex

    def broken(*a, **k):
        raise RuntimeError('disk full')
    monkeypatch.setattr(ex, 'export_onnx', broken)
    with pytest.raises(RuntimeError, match='disk full'):
        export(plugin_vit_dir, tmp_path / 'new')
    assert not (tmp_path / 'new').exists() and [p.name for p in tmp_path.iterdir()] == ['taken']


def test_an_unreadable_calibration_image_is_named(tmp_path, plugin_vit_dir, images):
    folder = tmp_path / 'photos'
    folder.mkdir()
    images[0].save(folder / 'a.png')
    (folder / 'b.jpg').write_bytes(b'not a jpeg')
    with pytest.raises((ValueError, OSError), match=r'calibration .*photos'):
        export(plugin_vit_dir, tmp_path / 'out', precision='int8', calibration=folder)
    assert not (tmp_path / 'out').exists()


# --- int8 --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def unique_split(tmp_path_factory):
    """36 generated pairs, each scene once (duplicate captions would be exact ties)."""
    root = tmp_path_factory.mktemp('calib')
    make_synthetic_split(root, "valid", 36, seed=7, unique=True)
    return root


def check_gate(report, tower: str, figures: dict, exported, ref, calib) -> None:
    """The recorded figures are true, and the decision follows them: a tower that fails the gate alone, or with
    the other tower also in int8, is the exact fp32 graph; a kept one is the graph the figures were measured on."""
    alone = figures['cosine_mean'] >= 0.99 and all(
        figures['r1']['fp32'][d] - figures['r1']['int8'][d] <= 1.0 for d in ('t2i', 'i2t'))
    assert figures['passed'] == (report.precision[tower] == 'int8') and bool(figures['reasons']) != figures['passed']
    assert figures['passed'] <= alone
    got, want = (exported.encode_image(calib), ref.encode_image(calib)) if tower == 'image' else \
        (exported.encode_text(calib), ref.encode_text(calib))
    if figures['passed']:
        assert abs(float(F.cosine_similarity(got, want).mean()) - figures['cosine_mean']) < 1e-4
    else:
        assert max_abs(got, want) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['onnx', 'openvino'])
def test_int8_on_the_trained_model_is_gated_per_tower_with_true_figures(trained, train_root, unique_split, fmt,
                                                                         tmp_path):
    src = train_root / 'work' / 'output'
    ref = load(src)
    exact = evaluate_split(ref, unique_split, 'valid')
    assert exact["t2i"]["r1"] > 10 * 100 / 36  # the model has learned the task: R@1 means something
    report = export(src, tmp_path / 'int8', format=fmt, precision='int8', calibration=unique_split)
    q = report.quantization
    assert set(q) == {'image', 'text'} and report.calibration['paired'] and report.calibration["images"] == 36
    for tower in ('image', 'text'):
        assert q[tower]['r1']['fp32'] == {'t2i': exact['t2i']['r1'], 'i2t': exact['i2t']['r1']}
    model = load(report.out)
    from modelscope_cnclip.data import open_split
    data = open_split(unique_split, 'valid')
    calib_images = [data.image_bytes(i) for i in data.image_ids]
    check_gate(report, 'image', q['image'], model, ref, calib_images)
    check_gate(report, 'text', q['text'], model, ref, [t.text for t in data.texts])
    if report.precision == {'image': 'int8', 'text': 'int8'}:  # both kept: together they hold the gate too
        both = evaluate_split(model, unique_split, 'valid')
        assert all(exact[d]["r1"] - both[d]["r1"] <= 1.0 for d in ("t2i", "i2t")), (both, exact)
    # a gate the quantization cannot pass: both towers stay fp32, with the figures that refused them
    strict = export(src, tmp_path / 'strict', format=fmt, precision='int8', calibration=unique_split,
                    gate=Int8Gate(min_cosine=0.9999999))
    assert strict.precision == {'image': 'fp32', 'text': 'fp32'}
    assert all('mean cosine' in strict.quantization[t]['reasons'][0] for t in ('image', 'text'))
    kept = load(strict.out)
    assert max_abs(kept.encode_image(calib_images[:5]), ref.encode_image(calib_images[:5])) < 1e-5
    assert read_manifest(strict.out).towers['image'].quantization['passed'] is False


def test_int8_calibration_forms(tmp_path, plugin_vit_dir, images):
    """A folder of images with texts from a file, images only (the text tower stays fp32 and says why), a jsonl
    of pairs, and a Python list."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    for n, img in enumerate(images * 3):
        img.rotate(40 * n).save(folder / f'{n}.png')
    (tmp_path / 'texts.txt').write_text('猫\n狗\n\n一只鸟\n皮卡丘\n', encoding='utf-8')
    lenient = Int8Gate(min_cosine=0.5, max_r1_drop=100)
    r = export(plugin_vit_dir, tmp_path / 'a', precision='int8', calibration=folder,
               calibration_texts=tmp_path / 'texts.txt', gate=lenient)
    assert r.calibration == {'source': str(folder), 'images': 9, 'texts': 4, 'paired': False}
    assert 'self_r1' in r.quantization['image'] and r.precision == {'image': 'int8', 'text': 'int8'}
    r = export(plugin_vit_dir, tmp_path / 'b', precision='int8', calibration=folder, gate=lenient,
               calibration_size=5)
    assert r.calibration['images'] == 5 and r.precision == {'image': 'int8', 'text': 'fp32'}
    assert r.quantization['text'] == {'passed': False, 'reasons': ['no calibration texts']}
    rows = [{'image': str(folder / f'{n}.png'), 'text': t} for n, t in enumerate(['猫', '狗', '鸟', '猫'])]
    (tmp_path / 'pairs.jsonl').write_text('\n'.join(json.dumps(r, ensure_ascii=False) for r in rows))
    r = export(plugin_vit_dir, tmp_path / 'c', format='openvino', precision='int8',
               calibration=tmp_path / 'pairs.jsonl', gate=lenient)
    assert r.calibration['paired'] and r.calibration['images'] == 4 and 'r1' in r.quantization['text']
    r = export(plugin_vit_dir, tmp_path / 'd', precision='int8', calibration=images, gate=lenient)
    assert r.calibration['images'] == 3 and r.precision['image'] == 'int8'
    assert load(r.out).precision == 'image:int8,text:fp32'


def test_inputs_are_checked_before_the_runtime_with_the_torch_errors(arch_dirs):
    """The exported model takes the same inputs and raises the same errors as the torch one."""
    src, out = arch_dirs['ViT-B-16']
    ref, exp = load(src), load(out)
    bad = [('encode_image', torch.rand(2, 3, 10, 10)), ('encode_image', 'not a file.jpg'),
           ('encode_image', np.zeros((4, 4, 3), np.float64)), ('encode_text', torch.ones(2, 5)),
           ('encode_text', torch.full((1, 600), 101)), ('encode_text', torch.tensor([[101, 99999, 102]])),
           ('encode_text', [1, 2])]
    for method, x in bad:
        errors = []
        for m in (ref, exp):
            with pytest.raises(Exception) as e:
                getattr(m, method)(x)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1], (method, x)
