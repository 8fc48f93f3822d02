"""Helpers shared by the test files (plain functions and constants; the fixtures are in conftest.py).

Test files import from here (``from helpers import TINY_VIT``), never from each other: tests/ is on ``sys.path``
(pytest.ini ``pythonpath = tests``), and benchmarks/ put it there themselves.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig, available_models, config_to_hub, get_config
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.tokenizer import DEFAULT_VOCAB
from modelscope_cnclip.video import FrameSampling

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / 'data'
GOLDEN = DATA / 'golden'  # official outputs of cn_clip on tiny seeded models (tests/golden: how they were made)
SCORING = GOLDEN / 'scoring'  # what the official retrieval scorers report

# The README's example: the four texts scored against the pokemon picture.
POKEMON_TEXTS = ['杰尼龟', '妙蛙种子', '小火龙', '皮卡丘']


# --- tiny models ---------------------------------------------------------------------------------------------------

TINY_VIT = CLIPConfig(
    embed_dim=32, vision=VisionConfig(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
    text=TextConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=128))
TINY_RN = CLIPConfig(
    embed_dim=32, vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16),
    text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                    max_position_embeddings=128))
# Dropout noise swamps a 48-wide random text tower's signal; real checkpoints train with their dropout.
TINY_VIT_NO_DROPOUT = dataclasses.replace(TINY_VIT, text=dataclasses.replace(
    TINY_VIT.text, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_of(name: str) -> CLIPConfig:
    """A tiny model with the structure of a shipped architecture: the same tower kind, patch size, head width,
    image-size-to-patch ratio class (336 px keeps a bigger grid), text width ratio, real vocabulary and positions."""
    real = get_config(name)
    v, t = real.vision, real.text
    if v.is_resnet:
        vision = VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16, head_width=v.head_width)
    else:
        vision = VisionConfig(image_size=v.patch_size * (6 if v.image_size > 224 else 4), layers=2,
                              width=2 * v.head_width, patch_size=v.patch_size, head_width=v.head_width)
    text = TextConfig(hidden_size=t.hidden_size // 16, intermediate_size=t.intermediate_size // 16,
                      num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=t.max_position_embeddings)
    return CLIPConfig(embed_dim=real.embed_dim // 16, vision=vision, text=text)


#: a tiny model of each shipped architecture
TINY_ARCHS = {name: tiny_of(name) for name in available_models()}


def train_overrides(epochs: int, lr: float = 1e-3, batch: int = 32) -> dict:
    """cfg_overrides for the trainer tests: epochs, lr, batch, no loader workers, no weight decay."""
    return {'train': {'max_epochs': epochs, 'dataloader': {'batch_size_per_gpu': batch, 'workers_per_gpu': 0},
                      'optimizer_hparams': {'lr': lr, 'weight_decay': 0.0}},
            'evaluation': {'dataloader': {'batch_size_per_gpu': 64, 'workers_per_gpu': 0}}}


def random_state_dict(cfg: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the official layout (no prefixes), with non-trivial norms."""
    torch.manual_seed(seed)
    model = CLIP(cfg)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():
        if v.is_floating_point() and 'running_var' not in k:
            v.add_(torch.randn(v.shape, generator=g) * 0.05)
    return sd


def write_official_pt(path: Path, sd: dict[str, torch.Tensor], prefix: str = 'module.',
                      optimizer: bool = True) -> Path:
    """An official Chinese-CLIP training checkpoint: module. prefix, epoch/step and optimizer state."""
    ckpt = {'epoch': 3, 'step': 1200, 'name': 'tiny', 'state_dict': {prefix + k: v for k, v in sd.items()}}
    if optimizer:
        ckpt['optimizer'] = {'state': {0: {'step': torch.tensor(5.0), 'exp_avg': torch.zeros(3)}},
                             'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.98), 'params': [0]}]}
    torch.save(ckpt, path)
    return path


def write_hub_dir(d: Path, cfg: CLIPConfig, sd: dict[str, torch.Tensor], prefix: str = '',
                  pooler: bool = True, string_layers: bool = False) -> Path:
    """A stock ModelScope hub dir (optionally a finetune output with the clip_model. prefix)."""
    d.mkdir(parents=True, exist_ok=True)
    vision, text = config_to_hub(cfg)
    if string_layers and isinstance(vision['vision_layers'], list):
        vision['vision_layers'] = json.dumps(vision['vision_layers']).replace(' ', '')  # cn_clip's RN50.json style
    (d / 'configuration.json').write_text(json.dumps({
        'framework': 'pytorch', 'task': 'multi-modal-embedding', 'model': {'type': 'clip-multi-modal-embedding'},
        'pipeline': {'type': 'multi-modal-embedding'}}))
    (d / 'vision_model_config.json').write_text(json.dumps(vision))
    (d / 'text_model_config.json').write_text(json.dumps(text))
    (d / 'vocab.txt').write_bytes(DEFAULT_VOCAB.read_bytes())
    sd = dict(sd)
    if pooler:
        h = cfg.text.hidden_size
        sd['bert.pooler.dense.weight'] = torch.randn(h, h)
        sd['bert.pooler.dense.bias'] = torch.randn(h)
    torch.save({prefix + k: v for k, v in sd.items()}, d / 'pytorch_model.bin')
    return d


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same keys and bit-identical tensors."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- images ----------------------------------------------------------------------------------------------------------

def bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A valid 1-bit black PNG of ``width`` x ``height`` that compresses to a few KB (20000x10000: ~24 KB): a
    decompression bomb, or what a huge scan looks like from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    row = b'\x00' * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b''.join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', body) + chunk(b'IEND', b'')


# --- videos ----------------------------------------------------------------------------------------------------------

def uniform(n: int) -> FrameSampling:
    """Centre frames of ``n`` equal segments."""
    return FrameSampling(num_frames=n)


def by_fps(**fields) -> FrameSampling:
    """Frames by time: ``sample_fps`` a second, at most ``max_frames``."""
    return FrameSampling(mode='fps', **fields)


STEP = 40  # colour step: frame i is (STEP * (i // 7), STEP * (i % 7), 128), so a decoded frame tells its index
SIZE = (64, 48)


def frame_colour(i: int) -> tuple[int, int, int]:
    return STEP * (i // 7), STEP * (i % 7), 128


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, lossless: bool = False) -> Path:
    """Encode ``(H, W, 3)`` uint8 RGB frames: mpeg4 for .mp4, mjpeg (every frame a key frame) for .avi, or
    PNG frames in an .avi when ``lossless``."""
    import av
    codec, pix_fmt = ('mjpeg', 'yuvj420p') if path.suffix == '.avi' else ('mpeg4', 'yuv420p')
    if lossless:
        codec, pix_fmt = 'png', 'rgb24'
    with av.open(str(path), 'w') as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if codec == 'mpeg4':
            stream.bit_rate = 2_000_000
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format='rgb24')))
        container.mux(stream.encode())
    return path


def coloured_video(path: Path, n: int, fps: int = 10) -> Path:
    """``n`` flat frames whose colour encodes their index (see :func:`frame_colour`)."""
    return write_video(path, [np.full((SIZE[1], SIZE[0], 3), frame_colour(i), np.uint8) for i in range(n)], fps)


def index_of(img: Image.Image) -> int:
    """The index of a frame of :func:`coloured_video`, read back from its colour."""
    r, g, _ = np.asarray(img.convert('RGB'), np.float32)[8:-8, 8:-8].reshape(-1, 3).mean(0)
    assert abs(r / STEP - round(r / STEP)) < 0.25 and abs(g / STEP - round(g / STEP)) < 0.25, (r, g)
    return round(r / STEP) * 7 + round(g / STEP)


def textured(seed: int, n: int) -> list[np.ndarray]:
    """``n`` frames of one random texture drifting slowly: alike within a video, unlike across videos."""
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 256, (SIZE[1] // 8, SIZE[0] // 8, 3)).astype(np.float32)
    base = np.kron(base, np.ones((8, 8, 1), np.float32))
    return [np.clip(base + 6 * i, 0, 255).astype(np.uint8) for i in range(n)]


# --- evaluation ------------------------------------------------------------------------------------------------------

def official_result(name: str) -> dict:
    """``scoreJson`` of the official scorer as ``score_predictions`` reports it."""
    res = json.loads((SCORING / name).read_text())['scoreJson']
    return {'r1': res['r1'], 'r5': res['r5'], 'r10': res['r10'], 'mr': res['mean_recall']}
