"""ms/ (model, preprocessor, pipeline): the ModelScope pipeline, model and preprocessor on every source, as users
call them. (The ModelScope trainer: test_train*.py.)"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from modelscope.models import Model
from modelscope.pipelines import pipeline
from modelscope.preprocessors import Preprocessor
from modelscope.utils.constant import Tasks

import modelscope_cnclip  # noqa: F401  (registers the plugin)
from modelscope_cnclip.ms import CNClipForMultiModalEmbedding, CNClipPipeline, CNClipPreprocessor

from helpers import POKEMON_TEXTS as TEXTS
from helpers import TINY_VIT, write_official_pt


def test_plugin_dir_builds_plugin_pipeline_and_model(tiny_pipe):
    assert isinstance(tiny_pipe, CNClipPipeline)
    assert isinstance(tiny_pipe.model, CNClipForMultiModalEmbedding)
    assert not tiny_pipe.model.training and not tiny_pipe.model.clip.bert.training


def test_forward_and_call_agree_and_are_normalised(tiny_pipe, images):
    a = tiny_pipe.forward({'img': images, 'text': TEXTS})
    b = tiny_pipe({'img': images, 'text': TEXTS})
    for key, n in [('img_embedding', len(images)), ('text_embedding', len(TEXTS))]:
        assert a[key].shape == (n, 32) and a[key].dtype == torch.float32
        assert torch.allclose(a[key].norm(dim=-1), torch.ones(n), atol=1e-5)
        assert torch.equal(a[key], b[key])


def test_missing_modality_is_none(tiny_pipe, images):
    out = tiny_pipe({'text': '皮卡丘'})
    assert out['img_embedding'] is None and out['text_embedding'].shape == (1, 32)
    out = tiny_pipe.forward({'img': images[0]})
    assert out['text_embedding'] is None and out['img_embedding'].shape == (1, 32)


def test_repeated_calls_are_identical_despite_dropout_config(tiny_pipe, images):
    assert tiny_pipe.model.config.text.hidden_dropout_prob > 0
    first = tiny_pipe({'img': images, 'text': TEXTS})
    for _ in range(2):
        again = tiny_pipe({'img': images, 'text': TEXTS})
        assert torch.equal(first['img_embedding'], again['img_embedding'])
        assert torch.equal(first['text_embedding'], again['text_embedding'])


def test_temperature_is_plain_tensor(tiny_pipe):
    t = tiny_pipe.model.temperature
    assert isinstance(t, torch.Tensor) and t.dim() == 0 and not t.requires_grad and t.dtype == torch.float32
    assert torch.allclose(t, 1 / tiny_pipe.model.clip.logit_scale.exp())


def test_probabilities_as_in_the_readme(tiny_pipe, images):
    img = tiny_pipe.forward({'img': images[:1]})['img_embedding']
    txt = tiny_pipe({'text': TEXTS})['text_embedding']
    probs = ((img / tiny_pipe.model.temperature) @ txt.t()).softmax(-1)
    assert probs.shape == (1, 4) and torch.allclose(probs.sum(), torch.tensor(1.0))


def test_all_input_kinds_give_the_same_embedding(tiny_pipe, images, tmp_path):
    img = images[0]
    path = tmp_path / 'a.png'
    img.save(path)
    kinds = [img, str(path), path, path.read_bytes(), np.asarray(img)]
    pixels = tiny_pipe.preprocessor({'img': kinds})['pixel_values']
    for row in pixels[1:]:
        assert torch.equal(row, pixels[0])
    out = tiny_pipe({'img': kinds})['img_embedding']
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6, rtol=0)


def test_hub_dir_with_pipeline_name(hub_vit_dir, tiny_pipe, images):
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(hub_vit_dir),
                 pipeline_name='cnclip-multi-modal-embedding', device='cpu')
    assert isinstance(p.model, CNClipForMultiModalEmbedding) and p.model.source_layout == 'hub'
    assert torch.equal(p({'img': images})['img_embedding'], tiny_pipe({'img': images})['img_embedding'])


def test_model_object_and_official_pt(tmp_path, vit_sd, tiny_pipe):
    pt = write_official_pt(tmp_path / 'clip_cn_tiny.pt', vit_sd)
    model = CNClipForMultiModalEmbedding(str(pt), config=TINY_VIT, device='cpu')
    p = pipeline(task=Tasks.multi_modal_embedding, model=model)
    assert torch.equal(p({'text': TEXTS})['text_embedding'], tiny_pipe({'text': TEXTS})['text_embedding'])


def test_image_text_retrieval_task_is_registered(plugin_vit_dir):
    p = pipeline(task=Tasks.image_text_retrieval, model=str(plugin_vit_dir),
                 pipeline_name='cnclip-multi-modal-embedding', device='cpu')
    assert isinstance(p, CNClipPipeline)


def test_model_and_preprocessor_from_pretrained(plugin_vit_dir, tiny_pipe, images):
    model = Model.from_pretrained(str(plugin_vit_dir))
    assert isinstance(model, CNClipForMultiModalEmbedding)
    assert str(next(model.parameters()).device) == 'cpu'  # ModelScope passes device='cuda'; no CUDA here
    pre = Preprocessor.from_pretrained(str(plugin_vit_dir))
    assert isinstance(pre, CNClipPreprocessor)
    batch = pre({'img': images, 'text': TEXTS})
    assert batch['pixel_values'].shape == (3, 3, 64, 64) and batch['input_ids'][:, 0].eq(101).all()
    out = model(batch)
    assert torch.equal(out['img_embedding'], tiny_pipe({'img': images})['img_embedding'])
    assert torch.equal(out['text_embedding'], tiny_pipe({'text': TEXTS})['text_embedding'])


def test_save_pretrained_round_trip(tiny_pipe, tmp_path, images):
    tiny_pipe.model.save_pretrained(tmp_path / 'saved')
    root = Path(__file__).resolve().parents[1] / 'configuration.json'
    assert json.loads((tmp_path / 'saved' / 'configuration.json').read_text()) == json.loads(root.read_text())
    assert (tmp_path / 'saved' / 'model.safetensors').is_file()
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(tmp_path / 'saved'), device='cpu')
    assert torch.equal(p({'img': images})['img_embedding'], tiny_pipe({'img': images})['img_embedding'])


def test_devices_and_precision(plugin_vit_dir, tiny_pipe, images):
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(plugin_vit_dir))  # default device 'gpu'
    want = torch.device('cuda:0') if torch.cuda.is_available() else torch.device('cpu')
    assert next(p.model.parameters()).device == want
    with pytest.raises(ValueError, match="precision='fp16' needs a GPU"):
        pipeline(task=Tasks.multi_modal_embedding, model=str(plugin_vit_dir), device='cpu', precision='fp16')
    with pytest.raises(ValueError, match="precision='int3'"):
        pipeline(task=Tasks.multi_modal_embedding, model=str(plugin_vit_dir), device='cpu', precision='int3')
    bf16 = pipeline(task=Tasks.multi_modal_embedding, model=str(plugin_vit_dir), device='cpu', precision='bf16')
    cos = (bf16({'img': images})['img_embedding'] * tiny_pipe({'img': images})['img_embedding']).sum(-1)
    assert (cos > 0.99).all()


@pytest.mark.parametrize('bad,exc,match', [
    ({'image': 'x.jpg'}, ValueError, r"unknown input key\(s\) \['image'\]; use \"img\""),
    ({}, ValueError, 'neither "img" nor "text"'),
    ('皮卡丘', TypeError, 'input must be a dict'),
    ({'text': ['ok', 3]}, TypeError, r'text\[1\]: expected a str, got int'),
    ({'img': ['missing.jpg']}, FileNotFoundError, "img\\[0\\]: image file 'missing.jpg' not found"),
    ({'img': [b'not an image']}, ValueError, r'img\[0\]: cannot decode image <12 bytes>'),
    ({'img': [3.5]}, TypeError, r'img\[0\]: unsupported image input float'),
])
def test_bad_input_is_explained(tiny_pipe, bad, exc, match):
    with pytest.raises(exc, match=match):
        tiny_pipe(bad)
    with pytest.raises(exc, match=match):
        tiny_pipe.forward(bad)


def test_foreign_model_object_is_refused():
    class Other(Model):
        def forward(self, x):
            return x
    with pytest.raises(TypeError, match='not a Chinese CLIP model of this plugin'):
        CNClipPipeline(Other(model_dir='.', device='cpu'))


def test_device_spellings(monkeypatch):
    from modelscope_cnclip.inference import resolve_device
    assert resolve_device('cpu') == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('cuda:1') == torch.device('cpu')  # falls back like ModelScope
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('gpu') == torch.device('cuda')
    assert resolve_device('gpu:1') == torch.device('cuda:1') == resolve_device('cuda:1')
    with pytest.raises(ValueError, match=r"device='cuda:5': only 2 CUDA device\(s\) visible"):
        resolve_device('cuda:5')
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device('tpu')


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _video(path: Path, seed: int) -> str:
    av = pytest.importorskip('av')
    rs = np.random.RandomState(seed)
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('mpeg4', rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        for _ in range(6):
            frame = av.VideoFrame.from_ndarray(rs.randint(0, 255, (48, 64, 3)).astype(np.uint8), format='rgb24')
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def test_batched_calls_return_what_unbatched_calls_return(tiny_pipe, images, tmp_path):
    """p([...], batch_size=n) gives each input its own embeddings, equal to p([...]) and to p(input) one by one,
    for any mix of modalities and list lengths (ModelScope's generic batching would shift rows between inputs)."""
    video = _video(tmp_path / 'v.mp4', 0)
    inputs = [{'text': '猫'}, {'img': images[0]}, {'text': ['狗', '鱼']}, {'img': images[1:], 'text': '一只很长的狗'},
              {'video': video}, {'img': [images[2]], 'text': ['a', 'bb', 'ccc'], 'video': [video, video]},
              {'text': '鸟'}]
    keys = ('img_embedding', 'text_embedding', 'video_embedding')
    one_by_one = [tiny_pipe(x) for x in inputs]
    assert one_by_one[2]['text_embedding'].shape[0] == 2 and one_by_one[1]['text_embedding'] is None
    for batch_size in (None, 1, 2, 3, len(inputs), 100):
        outs = tiny_pipe(inputs) if batch_size is None else tiny_pipe(inputs, batch_size=batch_size)
        assert len(outs) == len(inputs), batch_size
        for i, (got, want) in enumerate(zip(outs, one_by_one)):
            assert set(got) >= set(keys), (batch_size, i)
            assert all(_same(got[k], want[k]) for k in keys), (batch_size, i)
    with pytest.raises(ValueError, match='batch_size=0: expected a whole number >= 1'):
        tiny_pipe(inputs, batch_size=0)
    with pytest.raises(ValueError, match='neither "img" nor "text" nor "video"'):
        tiny_pipe([{'text': '猫'}, {}], batch_size=2)
