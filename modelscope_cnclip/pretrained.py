"""Published weights per architecture: the registry that turns ``load('ViT-B-16')`` into a hub download.

Architecture and weights stay apart (timm's pretrained-cfg, open_clip's ``list_pretrained``): ``model_configs/``
says what each architecture is, ``resources/pretrained.json`` says where its published weights are (a ModelScope
hub id, its revision, mirrors holding the same weights, the official release file, and where each entry comes
from). :func:`modelscope_cnclip.read_source` consults it for a source that is an architecture name and not a local
path. Data only: no torch, no ModelScope.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from modelscope_cnclip.config import RESOURCES, _from_dict, available_models

__all__ = ['Pretrained', 'PRETRAINED_FILE', 'list_pretrained', 'get_pretrained']

PRETRAINED_FILE = RESOURCES / 'pretrained.json'


@dataclass(frozen=True)
class Pretrained:
    """The published weights of one architecture.

    Attributes:
        name: the architecture (a name of :func:`~modelscope_cnclip.config.available_models`).
        hub_id: the ModelScope hub model that holds them (``owner/name``).
        revision: its revision, or ``None`` for the hub's default branch.
        mirrors: other hub ids with the same weights (suggested when the download fails).
        official_file: the Chinese-CLIP release file of the same weights (``clip_cn_vit-b-16.pt``).
        source: where this entry comes from.
    """

    name: str
    hub_id: str
    revision: str | None = None
    mirrors: tuple[str, ...] = ()
    official_file: str | None = None
    source: str = ''

    def __post_init__(self) -> None:
        object.__setattr__(self, 'mirrors', tuple(self.mirrors))
        for hub_id in (self.hub_id, *self.mirrors):
            parts = hub_id.split('/') if isinstance(hub_id, str) else []
            if len(parts) != 2 or not all(parts):
                raise ValueError(f'{PRETRAINED_FILE.name}: {self.name}: {hub_id!r} is not a hub id (owner/name)')
        if self.revision is not None and not (isinstance(self.revision, str) and self.revision):
            raise ValueError(f'{PRETRAINED_FILE.name}: {self.name}: revision must be a non-empty str or null, '
                             f'got {self.revision!r}')

    def describe(self) -> str:
        """``'damo/...' (revision v1.0.1)``, or the id alone when the hub's default branch is meant."""
        return f'{self.hub_id!r}' + (f' (revision {self.revision})' if self.revision else '')

    def instead(self) -> str:
        """What to pass when the hub cannot be reached: the local copies and other ids that hold these weights."""
        rev = f', revision={self.revision!r}' if self.revision else ''
        options = [f'a local copy of the model dir (snapshot_download({self.hub_id!r}{rev}) on a machine with '
                   f'access, then the path)']
        if self.official_file:
            options.append(f'the official weights file {self.official_file}')
        if self.mirrors:
            options.append(f'another hub id with the same weights ({", ".join(self.mirrors)})')
        return 'pass ' + ', or '.join(options)


@lru_cache(maxsize=None)
def _registry() -> dict[str, Pretrained]:
    data: Any = json.loads(PRETRAINED_FILE.read_text(encoding='utf-8'))
    models = data.get('models') if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f'{PRETRAINED_FILE}: expected {{"models": {{name: {{"hub_id", ...}}}}}}')
    known = available_models()
    stale = sorted(set(models) - set(known))
    if stale:
        raise ValueError(f'{PRETRAINED_FILE}: {stale} are not architectures in model_configs/ ({known})')
    return {name: _from_dict(Pretrained, {**models[name], 'name': name}, f'{PRETRAINED_FILE.name}: {name}')
            for name in known if name in models}


def list_pretrained() -> dict[str, tuple[str, str | None]]:
    """Architectures with published weights: ``name -> (hub id, revision)`` (revision ``None``: the hub's
    default), in the order of :func:`~modelscope_cnclip.config.available_models`.

    ``load(name)`` downloads exactly that hub model; any other source (a local dir, a weights file, another hub id)
    is passed as is.
    """
    return {name: (p.hub_id, p.revision) for name, p in _registry().items()}


def get_pretrained(name: str) -> Pretrained:
    """The published weights of architecture ``name``.

    Raises:
        ValueError: ``name`` is not an architecture, or an architecture without published weights (the message says
            what to pass instead).
    """
    known = available_models()
    if name not in known:
        raise ValueError(f'Model {name!r} not found; available models = {known}')
    entry = _registry().get(name)
    if entry is None:
        raise ValueError(f'{name!r} is an architecture without published weights (those with weights: '
                         f'{list(_registry())}); pass its weights instead: a local model dir, a weights file '
                         f'(.pt/.bin/.safetensors) or a ModelScope hub id, with config={name!r} if they do not '
                         f'describe their architecture')
    return entry
