"""ModelScope ``Preprocessor`` adapter (type ``cnclip-preprocessor``): raw images/texts/videos -> model tensors."""
from __future__ import annotations

import os
from typing import Any

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
from modelscope_cnclip.video import as_video_batch, check_sampling, load_videos

# Frame-sampling arguments: a preprocessor's defaults, overridable per call (``pipe(input, num_frames=16)``).
VIDEO_PARAMS = ('num_frames', 'video_mode', 'sample_fps', 'max_frames')


@PREPROCESSORS.register_module(Fields.multi_modal, module_name=PREPROCESSOR_TYPE)
class CNClipPreprocessor(Preprocessor):
    """``{'img': ..., 'text': ..., 'video': ...}`` -> ``{'pixel_values', 'input_ids', 'attention_mask',
    'video_pixel_values', 'video_frame_counts'}`` (present modalities only).

    Args:
        model_dir: a model dir of any layout, to read its image size, context length and vocab from
            (defaults: 224 px, 52 tokens, the standard vocabulary).
        transform, tokenizer: ready components (the pipeline passes its model's).
        num_frames, video_mode, sample_fps, max_frames: how video frames are sampled (``video_mode`` is
            :func:`modelscope_cnclip.video.sample_indices`'s ``mode``); a call's keyword arguments override them.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, mode: str = ModeKeys.INFERENCE,
                 transform: ImageTransform | None = None, tokenizer: Tokenizer | None = None, num_frames: int = 8,
                 video_mode: str = 'uniform', sample_fps: float = 1.0, max_frames: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(mode=mode)
        check_sampling(num_frames, video_mode, sample_fps, max_frames)
        self.video_params = {'num_frames': num_frames, 'video_mode': video_mode, 'sample_fps': sample_fps,
                             'max_frames': max_frames}
        if transform is None or tokenizer is None:
            cfg, vocab = read_config(model_dir)
            pre = cfg.preprocess if cfg else PreprocessConfig()
            transform = transform or ImageTransform(pre)
            tokenizer = tokenizer or Tokenizer(vocab, pre.context_length)
        self.transform = transform
        self.tokenizer = tokenizer

    def __call__(self, data: dict[str, Any], **video_params: Any) -> dict[str, torch.Tensor]:
        check_input_keys(data)
        unknown = sorted(set(video_params) - set(VIDEO_PARAMS))
        if unknown:
            raise TypeError(f'unknown argument(s) {unknown}; video sampling takes {list(VIDEO_PARAMS)}')
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
            out.update(self.videos(data['video'], **{**self.video_params, **video_params}))
        return out

    def videos(self, videos: Any, num_frames: int, video_mode: str, sample_fps: float,
               max_frames: int | None) -> dict[str, torch.Tensor]:
        """One video or a list -> ``video_pixel_values`` ``(sum F_i, 3, R, R)`` and ``video_frame_counts``
        ``(V,)``."""
        frames = load_videos(as_video_batch(videos), self.transform, num_frames, video_mode, sample_fps, max_frames)
        size = self.transform.size
        pixels = np.concatenate(frames) if frames else np.empty((0, size, size, 3), np.uint8)
        return {'video_pixel_values': self.transform.normalize(torch.from_numpy(pixels)),
                'video_frame_counts': torch.tensor([len(f) for f in frames], dtype=torch.long)}
