"""Chinese CLIP for ModelScope: every checkpoint layout, official numbers, today's torch and transformers.

``import modelscope_cnclip`` is cheap: it imports neither torch nor ModelScope. The public names below load on first
use (PEP 562), and the ModelScope classes (model ``cnclip``, preprocessor ``cnclip-preprocessor``, pipeline
``cnclip-multi-modal-embedding``, trainer ``cnclip-trainer``) are registered the moment ModelScope imports its
registries (:func:`modelscope_cnclip.ms.install_registration`), whether ModelScope was imported before or after
this package. Without ModelScope, use the plain API::

    import modelscope_cnclip as cnclip
    m = cnclip.load('ViT-B-16')    # a name of available_models(), or any checkpoint: plugin / hub / HF dir, .pt, hub id
    probs = m.probabilities('cat.jpg', ['猫', '狗'])    # softmax over the texts (m.similarity: cosines)

Layers, bottom to top: ``config``, ``pretrained``, ``utils``; ``model``, ``tokenizer``, ``transform``;
``checkpoints`` (layouts and conversion); ``inference``; ``data``, ``video``, ``embeddings`` (the on-disk format);
``jobs`` (embedding jobs, Ray); ``index``; ``evaluation`` (retrieval, zero-shot); ``train`` (ModelScope-free training
pieces); ``ms`` (the ModelScope adapters); ``cli``. A module imports only from layers below it.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

#: public name -> the module that defines it (imported on first access)
_EXPORTS = {
    'available_models': 'config', 'get_config': 'config', 'CLIPConfig': 'config', 'list_pretrained': 'pretrained',
    'CLIP': 'model', 'Tokenizer': 'tokenizer', 'get_tokenizer': 'tokenizer',
    'image_transform': 'transform', 'load_image': 'transform', 'set_max_image_pixels': 'transform',
    'Checkpoint': 'checkpoints', 'read_source': 'checkpoints', 'convert': 'checkpoints',
    'CNClip': 'inference', 'load': 'inference',
    'Embeddings': 'embeddings', 'load_embeddings': 'embeddings',
    'EmbedReport': 'jobs', 'embed_collection': 'jobs', 'ShardSettings': 'jobs', 'RayOptions': 'jobs',
    'FrameSampling': 'video',
    'Hit': 'index', 'Index': 'index', 'Searcher': 'index',
    'evaluate_zeroshot': 'evaluation',
}
__all__ = ['available_models', 'list_pretrained', 'get_config', 'CLIPConfig', 'CLIP', 'Tokenizer', 'get_tokenizer',
           'image_transform', 'load_image', 'set_max_image_pixels', 'Checkpoint', 'read_source', 'convert', 'CNClip',
           'load', 'Embeddings', 'load_embeddings', 'EmbedReport', 'embed_collection', 'ShardSettings', 'RayOptions',
           'FrameSampling', 'Hit', 'Index', 'Searcher', 'evaluate_zeroshot', '__version__']
assert set(__all__) == {*_EXPORTS, '__version__'}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from modelscope_cnclip.checkpoints import Checkpoint, convert, read_source
    from modelscope_cnclip.config import CLIPConfig, available_models, get_config
    from modelscope_cnclip.embeddings import Embeddings, load_embeddings
    from modelscope_cnclip.evaluation import evaluate_zeroshot
    from modelscope_cnclip.index import Hit, Index, Searcher
    from modelscope_cnclip.inference import CNClip, load
    from modelscope_cnclip.jobs import EmbedReport, RayOptions, ShardSettings, embed_collection
    from modelscope_cnclip.model import CLIP
    from modelscope_cnclip.pretrained import list_pretrained
    from modelscope_cnclip.tokenizer import Tokenizer, get_tokenizer
    from modelscope_cnclip.transform import image_transform, load_image, set_max_image_pixels
    from modelscope_cnclip.video import FrameSampling


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{module}'), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


logging.getLogger(__name__).addHandler(logging.NullHandler())

from modelscope_cnclip.ms import install_registration  # noqa: E402  (cheap: no ModelScope import)

install_registration()
