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

from helpers import TINY_RN, TINY_VIT, random_state_dict, write_hub_dir


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
