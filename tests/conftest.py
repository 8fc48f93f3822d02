"""Shared fixtures: tiny random-weight models written in every real checkpoint layout, the tiny model and pipeline
loaded once per session, test images and a local http server. Plain helpers are in helpers.py."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_RN, TINY_VIT, TINY_VIT_NO_DROPOUT, random_state_dict, train_overrides, write_hub_dir


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
def tiny_model(plugin_vit_dir: Path):
    """``load(plugin_vit_dir)``, shared by every test that only reads the model. A test that replaces one of its
    methods does so with ``monkeypatch.setattr``, which puts the original back after the test."""
    from modelscope_cnclip import load
    return load(plugin_vit_dir)


@pytest.fixture(scope='session')
def tiny_pipe(plugin_vit_dir: Path):
    """The ModelScope pipeline on ``plugin_vit_dir`` (CPU), shared by every test that only calls it."""
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    return pipeline(task=Tasks.multi_modal_embedding, model=str(plugin_vit_dir), device='cpu')


@pytest.fixture(scope='session')
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated training data (train: 512 pairs, valid: 64) and a random tiny model to finetune."""
    from modelscope_cnclip.checkpoints.layouts import Checkpoint, write_dir
    from modelscope_cnclip.data import make_synthetic_split
    root = tmp_path_factory.mktemp('train')
    make_synthetic_split(root / 'data', 'train', 512, seed=1)
    make_synthetic_split(root / 'data', 'valid', 64, seed=2)
    cfg = TINY_VIT_NO_DROPOUT
    write_dir(Checkpoint(random_state_dict(cfg), cfg), root / 'model')
    return root


@pytest.fixture(scope='session')
def trained(train_root: Path):
    """The model trained in the test suite: 25 epochs on 512 generated pairs (~10 s on 2 CPUs; the tests that
    use it are marked slow). ``(trainer, metrics before, metrics after)``; the model is ``work/output``."""
    from modelscope.trainers import build_trainer
    trainer = build_trainer('cnclip-trainer', dict(
        model=str(train_root / 'model'), work_dir=str(train_root / 'work'), train_dataset=str(train_root / 'data'),
        eval_dataset=str(train_root / 'data'), cfg_overrides=train_overrides(25)))
    before = trainer.evaluate()
    trainer.train()
    return trainer, before, trainer.evaluate()


@pytest.fixture(scope='session')
def images() -> list[Image.Image]:
    rs = np.random.RandomState(0)
    out = []
    for h, w in [(90, 120), (64, 64), (200, 50)]:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / rs.uniform(3, 20) + c) * np.cos(y / rs.uniform(3, 20)) for c in range(3)], -1)
        out.append(Image.fromarray(((base * 0.5 + 0.5) * 255).astype(np.uint8)))
    return out


@pytest.fixture(scope='session')
def photo() -> np.ndarray:
    """A smooth RGB picture (40 x 52), uint8 HWC."""
    y, x = np.mgrid[0:40, 0:52]
    return np.stack([np.sin(x / (4 + c)) * np.cos(y / (6 - c)) * 120 + 128 for c in range(3)], -1).astype(np.uint8)


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


@pytest.fixture(scope='module')
def av():
    """PyAV (which the tests write videos with), skipping the test when it or decord is not installed."""
    pytest.importorskip('decord')
    return pytest.importorskip('av')
