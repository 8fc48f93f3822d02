"""Fast paths keep their promises: bf16 mode stays close to exact mode, the prefetching and reduced-size decode
pipelines give what the plain path gives, and the inference-only shortcuts equal the autograd path."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.checkpoints.convert import clean_official
from modelscope_cnclip.checkpoints.layouts import Checkpoint
from modelscope_cnclip.config import config_from_hub
from modelscope_cnclip.inference import CNClip, encode_images
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.transform import load_image

from conftest import DATA, TINY_RN, TINY_VIT, random_state_dict
from golden.weights import load_spec, make_state_dict

GOLDEN = DATA / 'golden'


def golden_checkpoint(name: str) -> tuple[Checkpoint, dict]:
    d = GOLDEN / name
    meta = json.loads((d / 'golden.json').read_text(encoding='utf-8'))
    cfg = config_from_hub(json.loads((d / 'vision_model_config.json').read_text()),
                          json.loads((d / 'text_model_config.json').read_text()))
    return Checkpoint(clean_official(make_state_dict(load_spec(d / 'spec.json'), meta['seed'])), cfg), meta


def photos(n: int, seed: int = 0, size=(96, 72)) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    out = []
    for _ in range(n):
        chans = [np.sin(x / rs.uniform(2, 30) + rs.uniform(0, 6)) * np.cos(y / rs.uniform(2, 30)) for _ in range(3)]
        out.append(Image.fromarray(((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)))
    return out


@pytest.mark.parametrize('name', ['tiny-vit', 'tiny-rn'])
def test_bf16_mode_cosine_to_exact_mode(name):
    ckpt, meta = golden_checkpoint(name)
    exact = CNClip.from_checkpoint(ckpt, precision='fp32')
    fast = CNClip.from_checkpoint(golden_checkpoint(name)[0], precision='bf16')
    assert fast.model.text_projection.dtype == torch.bfloat16
    images = [Image.open(GOLDEN / 'inputs' / f) for f in meta['images']]
    cos_img = (exact.encode_image(images) * fast.encode_image(images)).sum(-1)
    cos_txt = (exact.encode_text(meta['texts']) * fast.encode_text(meta['texts'])).sum(-1)
    assert cos_img.min() >= 0.999 and cos_txt.min() >= 0.999
    if name == 'tiny-rn':  # BatchNorm'd convolutions stay fp32 on the CPU
        assert fast.model.visual.conv1.weight.dtype == torch.float32 and cos_img.min() > 0.99999


def test_bf16_mode_keeps_retrieval_rankings_on_random_weights():
    """Random weights put many candidates within bf16 noise of each other (a trained model separates them far
    more), so this bounds the damage on a hard case: at most 1 of 64 top-1 decisions may move per direction."""
    ckpt, _ = golden_checkpoint('tiny-vit')
    exact = CNClip.from_checkpoint(ckpt, precision='fp32')
    fast = CNClip.from_checkpoint(golden_checkpoint('tiny-vit')[0], precision='bf16')
    images = photos(64)
    # 64 distinct queries (near-duplicate texts would be near-ties for random weights, not a ranking test)
    texts = list('猫狗鸟鱼马牛羊猪鸡鸭虎狮熊狼狐兔鹿象龟蛇蛙蜂蝶花草树叶山水河海湖云雨雪风雷电日月星天地火石') + \
        ['海边日落', '城市夜景', '红色汽车', '生日蛋糕', '故宫', '长城', '高铁', '拉面', '咖啡', '足球', '樱花',
         '荷花', '沙漠', '雪山', '熊猫', '汉服', '跑车', '自行车', '金毛犬']
    assert len(set(texts)) == 64
    ei, et = exact.encode_image(images), exact.encode_text(texts)
    fi, ft = fast.encode_image(images), fast.encode_text(texts)
    # Exact mode's top-1 as ground truth: fast mode's R@1 against it, both directions.
    moved_t2i = (ft @ fi.T).argmax(1).ne((et @ ei.T).argmax(1)).sum().item()
    moved_i2t = (fi @ ft.T).argmax(1).ne((ei @ et.T).argmax(1)).sum().item()
    assert moved_t2i <= 1 and moved_i2t <= 1, (moved_t2i, moved_i2t)


def test_prefetching_pipeline_equals_sequential_and_keeps_order(tmp_path):
    ckpt, _ = golden_checkpoint('tiny-vit')
    m = CNClip.from_checkpoint(ckpt)
    paths = []
    for i, im in enumerate(photos(11, seed=3)):
        paths.append(tmp_path / f'{i}.png')
        im.save(paths[-1])
    seq = encode_images(m.model, m.transform, paths, batch_size=4, num_threads=1)
    par = encode_images(m.model, m.transform, paths, batch_size=4, num_threads=3)
    one = torch.cat([encode_images(m.model, m.transform, [p], batch_size=1) for p in paths])
    assert torch.equal(seq, par)
    assert torch.allclose(seq, one, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r'img\[9\]: image file .*missing.png'):
        encode_images(m.model, m.transform, paths[:9] + [tmp_path / 'missing.png'], batch_size=4, num_threads=3)


def test_reduced_size_jpeg_decode(tmp_path):
    big = photos(1, seed=4, size=(2000, 1500))[0]
    big.save(tmp_path / 'big.jpg', quality=92)
    big.save(tmp_path / 'big.png')
    draft = load_image(tmp_path / 'big.jpg', draft=224)
    assert draft.size == (500, 375)  # 1/4 scale: the smallest DCT scale keeping both sides >= 224 (1/8: 188)
    assert load_image(tmp_path / 'big.png', draft=224).size == (2000, 1500)  # not a JPEG: exact decode
    ckpt, _ = golden_checkpoint('tiny-vit')
    exact = CNClip.from_checkpoint(ckpt)
    fast = CNClip.from_checkpoint(golden_checkpoint('tiny-vit')[0], fast_decode=True)
    cos = (exact.encode_image(tmp_path / 'big.jpg') * fast.encode_image(tmp_path / 'big.jpg')).sum()
    assert 0.999 < cos < 1.0


@pytest.mark.parametrize('cfg', [TINY_VIT, TINY_RN], ids=['vit', 'rn'])
def test_inference_shortcuts_equal_the_autograd_path_and_every_parameter_learns(cfg):
    model = CLIP(cfg)
    model.load_state_dict(random_state_dict(cfg))
    model.eval()
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.tensor([[101, 4344, 102, 0], [101, 100, 2523, 102], [101, 102, 0, 0]])
    with torch.inference_mode():
        fast_img, fast_txt = model.encode_image(pixels), model.encode_text(ids)
    img, txt, scale = model(pixels.requires_grad_(), ids)
    assert torch.allclose(F.normalize(fast_img, dim=-1), img, atol=1e-6)
    assert torch.allclose(F.normalize(fast_txt, dim=-1), txt, atol=1e-6)
    logits = scale * img @ txt.T
    loss = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # token type 1 never occurs in Chinese CLIP's input, so its row gets no gradient (the tensor still does)
    assert no_grad == [], no_grad
