"""ModelScope ``Preprocessor`` adapter (type ``cnclip-preprocessor``): raw images/texts -> model tensors."""
from __future__ import annotations

import os
from typing import Any

import torch
from modelscope.preprocessors.base import Preprocessor
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.utils.constant import Fields, ModeKeys

from ..config import PreprocessConfig
from ..inference import as_image_batch, as_text_batch
from ..sources import read_config
from ..tokenizer import Tokenizer
from ..transform import ImageTransform
from .model import PREPROCESSOR_TYPE, check_input_keys


@PREPROCESSORS.register_module(Fields.multi_modal, module_name=PREPROCESSOR_TYPE)
class CNClipPreprocessor(Preprocessor):
    """``{'img': ..., 'text': ...}`` -> ``{'pixel_values', 'input_ids', 'attention_mask'}`` (present keys only).

    Args:
        model_dir: a model dir of any layout, to read its image size, context length and vocab from
            (defaults: 224 px, 52 tokens, the standard vocabulary).
        transform, tokenizer: ready components (the pipeline passes its model's).
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, mode: str = ModeKeys.INFERENCE,
                 transform: ImageTransform | None = None, tokenizer: Tokenizer | None = None, **kwargs: Any) -> None:
        super().__init__(mode=mode)
        if transform is None or tokenizer is None:
            cfg, vocab = read_config(model_dir)
            pre = cfg.preprocess if cfg else PreprocessConfig()
            transform = transform or ImageTransform(pre)
            tokenizer = tokenizer or Tokenizer(vocab, pre.context_length)
        self.transform = transform
        self.tokenizer = tokenizer

    def __call__(self, data: dict[str, Any]) -> dict[str, torch.Tensor]:
        check_input_keys(data)
        out: dict[str, torch.Tensor] = {}
        for key in ('pixel_values', 'input_ids', 'attention_mask'):
            if data.get(key) is not None:
                out[key] = data[key]
        if data.get('img') is not None and 'pixel_values' not in out:
            img = as_image_batch(data['img'])
            out['pixel_values'] = img if isinstance(img, torch.Tensor) else self.transform.batch(img)
        if data.get('text') is not None and 'input_ids' not in out:
            text = as_text_batch(data['text'])
            if isinstance(text, torch.Tensor):
                out['input_ids'] = text
            else:
                out.update(self.tokenizer(text))
        return out
