"""Shared fixtures: tiny random-weight models written in every real checkpoint layout."""
from __future__ import annotations

import functools
import http.server
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig, config_to_hub
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.tokenizer import DEFAULT_VOCAB

DATA = Path(__file__).parent / 'data'

TINY_VIT = CLIPConfig(
    embed_dim=32, vision=VisionConfig(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
    text=TextConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=128))
TINY_RN = CLIPConfig(
    embed_dim=32, vision=VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16),
    text=TextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                    max_position_embeddings=128))


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


@pytest.fixture(scope='session')
def vit_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY_VIT, seed=0)


@pytest.fixture(scope='session')
def rn_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY_RN, seed=1)


@pytest.fixture(scope='session')
def hub_vit_dir(tmp_path_factory: pytest.TempPathFactory, vit_sd: dict) -> Path:
    return write_hub_dir(tmp_path_factory.mktemp('hub') / 'vit', TINY_VIT, vit_sd)


@pytest.fixture(scope='session')
def plugin_vit_dir(tmp_path_factory: pytest.TempPathFactory, hub_vit_dir: Path) -> Path:
    from modelscope_cnclip import convert
    return convert(hub_vit_dir, tmp_path_factory.mktemp('plugin') / 'vit')


@pytest.fixture(scope='session')
def images() -> list[Image.Image]:
    rs = np.random.RandomState(0)
    out = []
    for h, w in [(90, 120), (64, 64), (200, 50)]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / rs.uniform(3, 20) + c) * np.cos(y / rs.uniform(3, 20)) for c in range(3)], -1)
        out.append(Image.fromarray(((base * 0.5 + 0.5) * 255).astype(np.uint8)))
    return out


@pytest.fixture(scope='module')
def http_dir(tmp_path_factory: pytest.TempPathFactory):
    """A local http server over a temporary folder: ``(folder, base URL)``."""
    root = tmp_path_factory.mktemp('www')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


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
