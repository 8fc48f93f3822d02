"""Chinese CLIP for ModelScope: every checkpoint layout, official numbers, today's torch and transformers.

``import modelscope_cnclip`` registers the ModelScope model (``cnclip``), preprocessor (``cnclip-preprocessor``),
pipeline (``cnclip-multi-modal-embedding``) and trainer (``cnclip-trainer``). Without ModelScope, use the plain API::

    import modelscope_cnclip as cnclip
    m = cnclip.load('path/to/any/checkpoint')          # plugin / hub / HF dir, official .pt, hub id
    probs = m.similarity('cat.jpg', ['猫', '狗'])

Collections: ``embed_collection`` (resumable sharded jobs, also on Ray), ``load_embeddings``, ``Index`` /
``Searcher`` (faiss), ``evaluate_zeroshot`` and ``modelscope_cnclip.evaluation`` for the official scoring.
"""
import logging

from .config import CLIPConfig, available_models, get_config
from .embed import EmbedReport, embed_collection
from .embeddings import Embeddings, load_embeddings
from .index import Hit, Index, Searcher
from .inference import CNClip, load
from .model import CLIP
from .sources import Checkpoint, convert, read_source
from .tokenizer import Tokenizer, get_tokenizer
from .transform import image_transform, load_image, set_max_image_pixels
from .zeroshot import evaluate_zeroshot

__version__ = '0.1.0'
__all__ = ['available_models', 'get_config', 'load', 'convert', 'read_source', 'get_tokenizer', 'image_transform',
           'load_image', 'set_max_image_pixels', 'CNClip', 'CLIP', 'CLIPConfig', 'Checkpoint', 'Tokenizer',
           'embed_collection', 'EmbedReport', 'load_embeddings', 'Embeddings', 'Index', 'Searcher', 'Hit',
           'evaluate_zeroshot', '__version__']

logging.getLogger(__name__).addHandler(logging.NullHandler())

from . import ms, train  # noqa: E402,F401  (registers the ModelScope classes and the trainer)
