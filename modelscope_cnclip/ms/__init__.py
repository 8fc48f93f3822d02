"""ModelScope adapters; importing this module registers them (model ``cnclip``, preprocessor
``cnclip-preprocessor``, pipeline ``cnclip-multi-modal-embedding``)."""
from .model import MODEL_TYPE, CNClipForMultiModalEmbedding
from .pipeline import PIPELINE_TYPE, CNClipPipeline
from .preprocessor import PREPROCESSOR_TYPE, CNClipPreprocessor

__all__ = ['CNClipForMultiModalEmbedding', 'CNClipPreprocessor', 'CNClipPipeline', 'MODEL_TYPE', 'PIPELINE_TYPE',
           'PREPROCESSOR_TYPE']
