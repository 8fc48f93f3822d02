"""Parity with the official implementation: golden outputs of cn_clip 1.6.0 (fp32) on tiny seeded models.

See tests/data/golden/README.md for how they were made. Weights are regenerated bit for bit from spec + seed.
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

from modelscope_cnclip import convert, load, read_source

from golden.weights import load_spec, make_state_dict, tensor_digest
from helpers import GOLDEN, write_official_pt

TOL = 2e-5
MODELS = ['tiny-vit', 'tiny-rn']
# Inputs where the plugin deliberately differs from the reference: cn_clip clips a 16-bit image at 255 (mostly
# white); the plugin scales it to 8 bits first (test_16bit_input_deliberately_scaled_not_clipped).
DELIBERATE = {'i16.png'}


class Golden:
    def __init__(self, name: str, root: Path) -> None:
        d = GOLDEN / name
        self.meta = json.loads((d / 'golden.json').read_text(encoding='utf-8'))
        self.arrays = {k: torch.from_numpy(v) for k, v in np.load(d / 'golden.npz').items()}
        self.sd = make_state_dict(load_spec(d / 'spec.json'), self.meta['seed'])
        # A real hub dir: the golden dir's configs and vocab plus the regenerated weights.
        self.hub_dir = root / name
        shutil.copytree(d, self.hub_dir, ignore=shutil.ignore_patterns('golden.*', 'spec.json'))
        torch.save({'state_dict': self.sd}, self.hub_dir / 'pytorch_model.bin')
        keep = [i for i, f in enumerate(self.meta['images']) if f not in DELIBERATE]
        self.image_names = [self.meta['images'][i] for i in keep]
        self.images = [Image.open(GOLDEN / 'inputs' / f) for f in self.image_names]
        for key in ('image_features', 'image_features_fp16_load'):
            self.arrays[key] = self.arrays[key][keep]
        self.texts = self.meta['texts']


@pytest.fixture(scope='module', params=MODELS)
def golden(request, tmp_path_factory):
    return Golden(request.param, tmp_path_factory.mktemp('golden'))


@pytest.fixture(scope='module')
def model(golden):
    return load(golden.hub_dir)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_features_match(got: torch.Tensor, want: torch.Tensor, names: list) -> None:
    """Embeddings (L2-normalised) within TOL max abs, as specified; raw features within TOL of each row's scale
    (a few random-weight ResNet rows reach |x| ~ 400, where fp32 rounding alone is ~1e-4 absolute)."""
    emb_err = (F.normalize(got, dim=-1) - F.normalize(want, dim=-1)).abs().amax(dim=1)
    assert emb_err.max() <= TOL, dict(zip(names, emb_err.tolist()))
    raw_err = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1).clamp(min=1.0)
    assert raw_err.max() <= TOL, dict(zip(names, raw_err.tolist()))


def test_weights_regenerate_bit_for_bit(golden):
    assert tensor_digest(golden.sd) == golden.meta['weights_sha256']


def pixel_hash(pixels: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels.numpy()).tobytes()).hexdigest()


def test_pixels_bit_for_bit_for_every_image_mode(golden, model):
    for name, img in zip(golden.image_names, golden.images):
        pixels = model.transform(img)
        assert pixels.shape == (3, 224, 224)
        assert pixel_hash(pixels) == golden.meta['pixel_sha256'][name], name
    batch = model.transform.batch(golden.images)
    for i, img in enumerate(golden.images):
        assert torch.equal(batch[i], model.transform(img))


def test_16bit_input_deliberately_scaled_not_clipped(golden, model):
    """The reference resizes a 16-bit image in I;16 and clips it at 255; the plugin scales it to 8 bits first."""
    img = Image.open(GOLDEN / 'inputs' / 'i16.png')
    assert img.mode == 'I;16'
    pixels = model.transform(img)
    assert pixel_hash(pixels) != golden.meta['pixel_sha256']['i16.png']
    eight_bit = Image.fromarray(((np.asarray(img).astype(np.uint32) + 128) // 257).astype(np.uint8))
    assert torch.equal(pixels, model.transform(eight_bit))


def test_token_ids_equal_reference(golden, model):
    ids52 = model.tokenizer(golden.texts, padding='max_length')['input_ids']
    ids77 = model.tokenizer(golden.texts, context_length=77, padding='max_length')['input_ids']
    assert torch.equal(ids52, golden.arrays['token_ids'])
    assert torch.equal(ids77, golden.arrays['token_ids_77'])


def test_image_features_match_reference(golden, model):
    feats = model.model.encode_image(model.transform.batch(golden.images))
    assert_features_match(feats, golden.arrays['image_features'], golden.image_names)


def test_text_features_match_reference_at_both_lengths(golden, model):
    for ids_key, feat_key in [('token_ids', 'text_features'), ('token_ids_77', 'text_features_77')]:
        feats = model.model.encode_text(golden.arrays[ids_key])
        assert_features_match(feats, golden.arrays[feat_key], golden.texts)


def test_default_path_sorted_and_trimmed_batches_match(golden, model):
    want_txt = F.normalize(golden.arrays['text_features'], dim=-1)
    want_img = F.normalize(golden.arrays['image_features'], dim=-1)
    assert max_abs(model.encode_text(golden.texts, batch_size=5), want_txt) <= TOL
    assert max_abs(model.encode_image(golden.images, batch_size=4), want_img) <= TOL
    assert torch.allclose(model.temperature, torch.tensor(np.exp(-golden.meta['logit_scale']), dtype=torch.float32))


def test_pipeline_on_official_pt_matches_reference(golden, tmp_path):
    pt = write_official_pt(tmp_path / 'clip_cn_tiny.pt', golden.sd)
    cfg = read_source(golden.hub_dir).config
    out = convert(pt, tmp_path / 'plugin', config=cfg)
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(out), device='cpu')
    res = p({'img': golden.images, 'text': golden.texts})
    assert max_abs(res['img_embedding'], F.normalize(golden.arrays['image_features'], dim=-1)) <= TOL
    assert max_abs(res['text_embedding'], F.normalize(golden.arrays['text_features'], dim=-1)) <= TOL


def test_hub_pipeline_name_path_matches_reference(golden):
    p = pipeline(task=Tasks.multi_modal_embedding, model=str(golden.hub_dir),
                 pipeline_name='cnclip-multi-modal-embedding', device='cpu')
    res = p.forward({'img': golden.images[:3], 'text': golden.texts[:3]})
    assert max_abs(res['img_embedding'], F.normalize(golden.arrays['image_features'][:3], dim=-1)) <= TOL
    assert max_abs(res['text_embedding'], F.normalize(golden.arrays['text_features'][:3], dim=-1)) <= TOL


def test_fp16_rounding_is_not_applied_on_cpu(golden, model):
    # cn_clip's own loader and ModelScope's built-in class round weights to fp16 first; we must not.
    feats = model.model.encode_image(model.transform.batch(golden.images))
    assert max_abs(feats, golden.arrays['image_features_fp16_load']) > 10 * TOL
    assert all(p.dtype == torch.float32 for p in model.model.parameters())


def test_packaged_vocab_is_the_reference_vocab():
    # The golden dirs hold cn_clip's own vocab.txt (21128 lines); the package ships the same file.
    from modelscope_cnclip.tokenizer import DEFAULT_VOCAB
    for name in MODELS:
        assert (GOLDEN / name / 'vocab.txt').read_bytes() == DEFAULT_VOCAB.read_bytes()
    assert hashlib.sha256(DEFAULT_VOCAB.read_bytes()).hexdigest() == \
        '45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c'
