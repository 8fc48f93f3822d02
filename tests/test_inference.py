"""inference.py: the loaded model's scoring contract (``encode_image`` / ``encode_text`` with ``normalize=``,
``similarity`` as cosine similarities and ``probabilities`` as the official quick start's softmax over texts), the
checks on what it is given (token ids, batch sizes, texts), and the fast paths keeping their promises: bf16 mode
stays close to exact mode, the prefetching and reduced-size decode pipelines give what the plain path gives."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modelscope_cnclip.checkpoints.convert import clean_official
from modelscope_cnclip.checkpoints.layouts import Checkpoint
from modelscope_cnclip.cli import main
from modelscope_cnclip.config import config_from_hub
from modelscope_cnclip.inference import CNClip, encode_images
from modelscope_cnclip.transform import load_image

from golden.weights import load_spec, make_state_dict
from helpers import GOLDEN
from helpers import POKEMON_TEXTS as TEXTS

# --- the scoring contract -------------------------------------------------------------------------------------------

def test_normalize_false_gives_the_raw_features(tiny_model, images) -> None:
    raw_img = tiny_model.encode_image(images, normalize=False)
    raw_txt = tiny_model.encode_text(TEXTS, normalize=False)
    assert raw_img.shape == (3, 32) and raw_txt.shape == (4, 32) and raw_img.dtype == raw_txt.dtype == torch.float32
    assert not torch.allclose(raw_img.norm(dim=-1), torch.ones(3), atol=1e-3)  # really unnormalised
    # The raw features are the towers' outputs: what the network's own encode_* return on the same input.
    pixels = torch.stack([tiny_model.transform(im) for im in images])
    ids = tiny_model.tokenizer(TEXTS)['input_ids']
    with torch.inference_mode():
        assert torch.allclose(raw_img, tiny_model.model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(raw_txt, tiny_model.model.encode_text(ids), atol=1e-5)
    # normalize=True (the default) is the same rows, L2-normalised.
    assert torch.allclose(tiny_model.encode_image(images), F.normalize(raw_img, dim=-1), atol=1e-6)
    assert torch.equal(tiny_model.encode_text(TEXTS), tiny_model.encode_text(TEXTS, normalize=True))
    assert torch.allclose(tiny_model.encode_text(TEXTS), F.normalize(raw_txt, dim=-1), atol=1e-6)
    with pytest.raises(TypeError):
        tiny_model.encode_text(TEXTS, 8, True)  # batch_size and normalize are keyword-only


def test_similarity_is_the_cosine_similarity(tiny_model, images) -> None:
    sim = tiny_model.similarity(images, TEXTS)
    assert sim.shape == (3, 4) and sim.dtype == torch.float32
    want = F.cosine_similarity(tiny_model.encode_image(images, normalize=False)[:, None],
                               tiny_model.encode_text(TEXTS, normalize=False)[None], dim=-1)
    assert torch.allclose(sim, want, atol=1e-5)
    assert (sim.abs() <= 1 + 1e-6).all() and not torch.allclose(sim.sum(-1), torch.ones(3))  # not probabilities
    assert tiny_model.similarity(images[0], '皮卡丘').shape == (1, 1)


def test_probabilities_are_the_softmax_of_the_scaled_similarities(tiny_model, images) -> None:
    probs = tiny_model.probabilities(images, TEXTS)
    assert probs.shape == (3, 4) and torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-6)
    # REFERENCE §3 and the official quick start: softmax over texts of (img / temperature) @ text.T.
    img, txt = tiny_model.encode_image(images), tiny_model.encode_text(TEXTS)
    assert torch.allclose(probs, ((img / tiny_model.temperature) @ txt.t()).softmax(-1), atol=1e-6)
    assert torch.allclose(probs, (tiny_model.similarity(images, TEXTS) / tiny_model.temperature).softmax(-1),
                          atol=1e-6)
    with pytest.raises(ValueError, match='probabilities needs at least one text'):
        tiny_model.probabilities(images, [])
    with pytest.raises(ValueError, match='similarity needs at least one text'):
        tiny_model.similarity(images, [])


# --- what the model is given ----------------------------------------------------------------------------------------

def test_token_ids_are_checked_before_the_text_tower(tiny_model, tiny_pipe):
    ids = tiny_model.tokenizer(['一只猫', '狗'])['input_ids']
    assert torch.equal(tiny_model.encode_text(ids), tiny_model.encode_text(['一只猫', '狗']))
    too_long = torch.cat([ids[:1, :-1], torch.full((1, 130), 100), ids[:1, -1:]], dim=1)  # 128 positions
    with pytest.raises(ValueError, match=r'token ids are 135 long, but the text tower has 128 positions; tokenize '
                                         r"texts with model.tokenizer\(texts\)\['input_ids'\] \(which truncates to "
                                         r'the context length 52\)'):
        tiny_model.encode_text(too_long)
    with pytest.raises(ValueError, match=r'must lie in \[0, 21128\) \(the vocabulary\), got values 101..30000'):
        tiny_model.encode_text(torch.tensor([[101, 30000, 102]]))
    with pytest.raises(ValueError, match=r'got values -1..102'):
        tiny_model.encode_text(torch.tensor([[101, -1, 102]]))
    with pytest.raises(TypeError, match='token ids must be an integer tensor, got torch.float32'):
        tiny_model.encode_text(ids.float())
    with pytest.raises(ValueError, match=r'token ids must be \(N, L\) with L >= 1, got \(1, 2, 3\)'):
        tiny_model.encode_text(torch.ones(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r'token ids must be \(N, L\) with L >= 1, got \(1, 0\)'):
        tiny_model.encode_text(torch.zeros(1, 0, dtype=torch.long))
    # the hint works as written, and any integer dtype is taken
    assert torch.equal(tiny_model.encode_text(tiny_model.tokenizer(['一只猫'])['input_ids']),
                       tiny_model.encode_text('一只猫'))
    for dtype in (torch.int32, torch.int16):
        assert torch.equal(tiny_model.encode_text(ids.to(dtype)), tiny_model.encode_text(ids)), dtype
    with pytest.raises(ValueError, match='128 positions'):
        tiny_pipe({'input_ids': too_long})
    assert torch.equal(tiny_pipe({'text': ids.to(torch.int16)})['text_embedding'], tiny_model.encode_text(ids))


def test_similarity_needs_texts(tiny_model, photo):
    with pytest.raises(ValueError, match='similarity needs at least one text'):
        tiny_model.similarity(photo, [])


def test_batch_sizes_must_be_positive(tiny_model, photo, plugin_vit_dir, tmp_path, capsys):
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f'batch_size={bad}: must be >= 1'):
            tiny_model.encode_image([photo], batch_size=bad)
        with pytest.raises(ValueError, match=f'batch_size={bad}: must be >= 1'):
            tiny_model.encode_text(['猫'], batch_size=bad)
    for argv in (['eval', str(plugin_vit_dir), '--data', str(tmp_path), '--batch-size', '0'],
                 ['embed', str(plugin_vit_dir), str(tmp_path), '--out', str(tmp_path / 'e'), '--batch-size', '-1'],
                 ['search', str(tmp_path), 'q', '--top-k', '0'],
                 ['train', str(plugin_vit_dir), '--data', str(tmp_path), '--accum-freq', 'x']):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert 'expected a whole number >= 1' in capsys.readouterr().err


# --- fast paths -----------------------------------------------------------------------------------------------------

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
