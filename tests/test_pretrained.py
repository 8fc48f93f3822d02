"""pretrained.py: every architecture name loads by name: the published-weights registry, the hub download it asks
for (a fake ``snapshot_download``: no network), the errors offline or without published weights, and a local path
of the same name winning over the name."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelscope_cnclip
import modelscope_cnclip.pretrained as pretrained_mod
from modelscope_cnclip import available_models, convert, list_pretrained, load, read_source
from modelscope_cnclip.cli import main
from modelscope_cnclip.pretrained import get_pretrained

from helpers import REPO

# REFERENCE.md section 1: the ModelScope hub ids and the revisions it gives (none for ViT-L-14; no RN50 under damo/).
PUBLISHED = {
    'RN50': ('AI-ModelScope/chinese-clip-rn50', None),
    'ViT-B-16': ('damo/multi-modal_clip-vit-base-patch16_zh', 'v1.0.1'),
    'ViT-H-14': ('damo/multi-modal_clip-vit-huge-patch14_zh', 'v1.0.0'),
    'ViT-L-14': ('damo/multi-modal_clip-vit-large-patch14_zh', None),
    'ViT-L-14-336': ('damo/multi-modal_clip-vit-large-patch14_336_zh', 'v1.0.1'),
}


class FakeHub:
    """Stands in for ModelScope's ``snapshot_download``: records what it is asked for and returns ``folder``, or
    raises ``error``."""

    def __init__(self, folder: Path | None = None, error: Exception | None = None) -> None:
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, model_id: str, revision: str | None = None, **kwargs) -> str:
        self.calls.append((model_id, revision))
        if self.error is not None:
            raise self.error
        return str(self.folder)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, hub_vit_dir: Path) -> FakeHub:
    """A hub that serves the tiny hub dir for any id."""
    fake = FakeHub(hub_vit_dir)
    module = importlib.import_module('modelscope.hub.snapshot_download')  # the module (its package re-exports it)
    monkeypatch.setattr(module, 'snapshot_download', fake)
    return fake


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(error=ConnectionError('Name or service not known'))
    monkeypatch.setattr(importlib.import_module('modelscope.hub.snapshot_download'), 'snapshot_download', fake)
    return fake


def test_every_listed_architecture_has_published_weights() -> None:
    assert list_pretrained() == PUBLISHED
    assert list(list_pretrained()) == available_models()  # the same names, the same (natural) order
    assert modelscope_cnclip.list_pretrained is pretrained_mod.list_pretrained
    entry = get_pretrained('ViT-B-16')
    assert 'iic/multi-modal_clip-vit-base-patch16_zh' in entry.mirrors and entry.official_file == 'clip_cn_vit-b-16.pt'
    data = json.loads(pretrained_mod.PRETRAINED_FILE.read_text(encoding='utf-8'))
    assert all(m['source'] for m in data['models'].values())  # each entry says where it comes from


@pytest.mark.parametrize('name', available_models())
def test_a_name_downloads_its_hub_id_and_revision(name: str, hub: FakeHub, hub_vit_dir: Path) -> None:
    ckpt = read_source(name)
    assert hub.calls == [PUBLISHED[name]]
    assert ckpt.source == name and ckpt.layout == 'hub'  # what was asked for, as for a hub id
    read_source(name, revision='v9')
    assert hub.calls[-1] == (PUBLISHED[name][0], 'v9')  # an explicit revision wins over the registry's


def test_load_convert_pipeline_and_cli_take_a_name(hub: FakeHub, hub_vit_dir: Path, images, tmp_path: Path,
                                                   capsys) -> None:
    model = load('ViT-B-16')
    assert model.source == 'ViT-B-16' and 'ViT-B-16 (hub)' in model.checkpoint_info
    assert torch.equal(model.encode_text('猫'), load(hub_vit_dir).encode_text('猫'))
    assert (convert('ViT-L-14-336', tmp_path / 'out') / 'model.safetensors').is_file()
    assert hub.calls[-1] == PUBLISHED['ViT-L-14-336']

    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    p = pipeline(task=Tasks.multi_modal_embedding, model='ViT-H-14', pipeline_name='cnclip-multi-modal-embedding',
                 device='cpu')
    assert hub.calls[-1] == PUBLISHED['ViT-H-14'] and p({'text': '猫'})['text_embedding'].shape == (1, 32)

    images[0].save(tmp_path / 'cat.png')
    assert main(['similarity', 'RN50', str(tmp_path / 'cat.png'), '猫', '狗', '--json']) == 0
    assert hub.calls[-1] == PUBLISHED['RN50'] and set(json.loads(capsys.readouterr().out)) == {'猫', '狗'}


def test_offline_the_error_names_the_weights_and_what_to_pass_instead(offline: FakeHub, tmp_path: Path,
                                                                      capsys) -> None:
    with pytest.raises(OSError, match=r"'ViT-B-16' names the published weights "
                                      r"'damo/multi-modal_clip-vit-base-patch16_zh' \(revision v1\.0\.1\), and "
                                      r"downloading them from the ModelScope hub failed \(Name or service not known\)"
                                      r"\. Without the hub, pass a local copy of the model dir .*, or the official "
                                      r"weights file clip_cn_vit-b-16\.pt, or another hub id with the same weights "
                                      r"\(iic/multi-modal_clip-vit-base-patch16_zh, ") as info:
        load('ViT-B-16')
    assert isinstance(info.value.__cause__, ConnectionError)  # the hub client's own error is kept
    assert offline.calls == [PUBLISHED['ViT-B-16']]
    with pytest.raises(OSError, match=r"'RN50' names the published weights 'AI-ModelScope/chinese-clip-rn50', and "
                                      r".* the official weights file clip_cn_rn50\.pt$"):
        read_source('RN50')  # no revision in the registry: none in the message, no mirrors to suggest

    assert main(['similarity', 'ViT-L-14', str(tmp_path / 'x.png'), '猫']) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnclip similarity: error: 'ViT-L-14' names the published weights") and 'Without the hub' \
        in err and len(err.splitlines()) == 1


def test_a_local_path_with_the_name_wins(hub: FakeHub, plugin_vit_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(plugin_vit_dir, tmp_path / 'ViT-B-16')
    monkeypatch.chdir(tmp_path)
    ckpt = read_source('ViT-B-16')
    assert hub.calls == [] and ckpt.layout == 'plugin' and ckpt.source == 'ViT-B-16'
    assert load('ViT-B-16').source == str(tmp_path / 'ViT-B-16')  # the local dir, resolved


def test_an_architecture_without_published_weights_says_what_to_pass(hub: FakeHub,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    registry = {k: v for k, v in pretrained_mod._registry().items() if k != 'RN50'}
    monkeypatch.setattr(pretrained_mod, '_registry', lambda: registry)
    with pytest.raises(ValueError, match=r"'RN50' is an architecture without published weights \(those with "
                                         r"weights: \['ViT-B-16', .*\]\); pass its weights instead: a local model dir, "
                                         r"a weights file \(\.pt/\.bin/\.safetensors\) or a ModelScope hub id, with "
                                         r"config='RN50' if they do not describe their architecture"):
        read_source('RN50')
    assert hub.calls == [] and 'RN50' not in list_pretrained()


def test_other_sources_are_unchanged(hub: FakeHub) -> None:
    with pytest.raises(FileNotFoundError, match=r"model source 'ViT-X-1' not found: give a model dir, a weights file "
                                                r"\(\.pt/\.bin/\.safetensors\), a ModelScope hub id like .* or an "
                                                r"architecture name \(RN50, ViT-B-16, ViT-H-14, ViT-L-14, "
                                                r"ViT-L-14-336\)"):
        read_source('ViT-X-1')
    read_source('someone/model', revision='v2')  # a hub id: passed as is
    assert hub.calls == [('someone/model', 'v2')]
    with pytest.raises(ValueError, match=r"Model 'ViT-X-1' not found; available models = \['RN50', "):
        get_pretrained('ViT-X-1')


@pytest.mark.parametrize('entry, match', [
    ({'hubid': 'a/b'}, r"ViT-B-16: unknown key\(s\) \['hubid'\]"),
    ({'hub_id': 'no-owner'}, r"ViT-B-16: 'no-owner' is not a hub id \(owner/name\)"),
    ({'hub_id': 'a/b', 'revision': ''}, 'revision must be a non-empty str or null'),
])
def test_the_registry_data_is_checked(entry: dict, match: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / 'pretrained.json'
    path.write_text(json.dumps({'models': {'ViT-B-16': entry}}))
    monkeypatch.setattr(pretrained_mod, 'PRETRAINED_FILE', path)
    pretrained_mod._registry.cache_clear()
    try:
        with pytest.raises(ValueError, match=match):
            list_pretrained()
        path.write_text(json.dumps({'models': {'ViT-B-99': {'hub_id': 'a/b'}}}))
        pretrained_mod._registry.cache_clear()
        with pytest.raises(ValueError, match=r"\['ViT-B-99'\] are not architectures in model_configs/"):
            list_pretrained()
    finally:
        monkeypatch.undo()
        pretrained_mod._registry.cache_clear()


def test_the_registry_imports_neither_torch_nor_modelscope() -> None:
    code = ('import sys, modelscope_cnclip as c\nc.list_pretrained()\n'
            'print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "modelscope", "numpy"}))')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == '[]'
