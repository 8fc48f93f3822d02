"""ModelScope ``Preprocessor`` adapter (type ``cnclip-preprocessor``): raw images/texts/videos -> model tensors."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
from modelscope.preprocessors.base import Preprocessor
from modelscope.preprocessors.builder import PREPROCESSORS
from modelscope.utils.constant import Fields, ModeKeys

from modelscope_cnclip.checkpoints.layouts import read_config
from modelscope_cnclip.config import PreprocessConfig
from modelscope_cnclip.inference import as_image_batch, as_text_batch
from modelscope_cnclip.ms import PREPROCESSOR_TYPE
from modelscope_cnclip.ms.model import VIDEO_KEYS, check_input_keys
from modelscope_cnclip.tokenizer import Tokenizer
from modelscope_cnclip.transform import ImageTransform
from modelscope_cnclip.video import FrameSampling, as_video_batch, load_videos


@PREPROCESSORS.register_module(Fields.multi_modal, module_name=PREPROCESSOR_TYPE)
class CNClipPreprocessor(Preprocessor):
    """``{'img': ..., 'text': ..., 'video': ...}`` -> ``{'pixel_values', 'input_ids', 'attention_mask',
    'video_pixel_values', 'video_frame_counts'}`` (present modalities only).

    Args:
        model_dir: a model dir of any layout, to read its image size, context length and vocab from
            (defaults: 224 px, 52 tokens, the standard vocabulary).
        transform, tokenizer: ready components (the pipeline passes its model's).
        sampling: which video frames are embedded (:class:`~modelscope_cnclip.video.FrameSampling`, or a dict of
            its fields as a configuration.json gives it); a call's ``sampling=`` overrides it.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, mode: str = ModeKeys.INFERENCE,
                 transform: ImageTransform | None = None, tokenizer: Tokenizer | None = None,
                 sampling: FrameSampling | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(mode=mode)
        self.sampling = FrameSampling.of(sampling)
        if transform is None or tokenizer is None:
            cfg, vocab = read_config(model_dir)
            pre = cfg.preprocess if cfg else PreprocessConfig()
            transform = transform or ImageTransform(pre)
            tokenizer = tokenizer or Tokenizer(vocab, pre.context_length)
        self.transform = transform
        self.tokenizer = tokenizer

    def __call__(self, data: dict[str, Any], sampling: FrameSampling | Mapping[str, Any] | None = None
                 ) -> dict[str, torch.Tensor]:
        check_input_keys(data)
        out: dict[str, torch.Tensor] = {}
        for key in ('pixel_values', 'input_ids', 'attention_mask', *VIDEO_KEYS):
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
        if data.get('video') is not None and 'video_pixel_values' not in out:
            out.update(self.videos(data['video'], FrameSampling.of(sampling) if sampling else self.sampling))
        return out

    def videos(self, videos: Any, sampling: FrameSampling) -> dict[str, torch.Tensor]:
        """One video or a list -> ``video_pixel_values`` ``(sum F_i, 3, R, R)`` and ``video_frame_counts``
        ``(V,)``."""
        frames = load_videos(as_video_batch(videos), self.transform, sampling)
        size = self.transform.size
        pixels = np.concatenate(frames) if frames else np.empty((0, size, size, 3), np.uint8)
        return {'video_pixel_values': self.transform.normalize(torch.from_numpy(pixels)),
                'video_frame_counts': torch.tensor([len(f) for f in frames], dtype=torch.long)}
