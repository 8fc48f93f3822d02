"""ModelScope ``Pipeline`` adapter (type ``cnclip-multi-modal-embedding``).

Works as ``p({...})`` and ``p.forward({...})`` (raw or preprocessed input), on every layout the plugin reads:
a model object, a plugin dir, a stock hub dir or hub id (with ``pipeline_name='cnclip-multi-modal-embedding'``),
an official ``.pt``, a Hugging Face dir, or a dir written by ``cnclip export`` (ONNX Runtime, OpenVINO, TensorRT).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelscope.models.base import Model
from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Frameworks, Tasks

from modelscope_cnclip.checkpoints.layouts import PLUGIN_CONFIG
from modelscope_cnclip.config import RESOURCES
from modelscope_cnclip.ms import PIPELINE_TYPE
from modelscope_cnclip.ms.model import RAW_KEYS, CNClipForMultiModalEmbedding, check_input_keys
from modelscope_cnclip.ms.preprocessor import CNClipPreprocessor


@PIPELINES.register_module(Tasks.multi_modal_embedding, module_name=PIPELINE_TYPE)
@PIPELINES.register_module(Tasks.image_text_retrieval, module_name=PIPELINE_TYPE)
class CNClipPipeline(Pipeline):
    """Embed images, texts and/or videos: ``{'img': ..., 'text': ..., 'video': ...}`` ->
    ``{'img_embedding', 'text_embedding', 'video_embedding'}`` (``None`` for a missing modality).

    A call takes the video frame sampling: ``p({'video': path}, sampling=FrameSampling(num_frames=16))`` (or a dict
    of its fields; see :class:`modelscope_cnclip.video.FrameSampling`).

    Args:
        model: a :class:`CNClipForMultiModalEmbedding`, or any source it reads (dir, weights file, hub id).
        device: ``'cpu'``, ``'gpu'``, ``'gpu:1'``, ``'cuda:1'`` (ModelScope's default is ``'gpu'``; no CUDA -> CPU).
        precision: ``'fp32'`` (default, exact), ``'bf16'``, ``'fp16'`` (GPU); an exported dir runs in its exported
            precision by default.
        backend: ``'onnxruntime'``, ``'openvino'`` or ``'tensorrt'`` for an exported dir (default: its own runtime).
        config: architecture override for a source that does not describe itself.
        revision: hub revision when ``model`` is a hub id.
        fast_decode: decode JPEGs at reduced size before the resize (faster on photos, slightly inexact).
    """

    def __init__(self, model: Any, preprocessor: CNClipPreprocessor | None = None, device: str = 'gpu',
                 precision: str | None = None, config: Any = None, revision: str | None = None,
                 fast_decode: bool = False, backend: str | None = None, **kwargs: Any) -> None:
        if not isinstance(model, CNClipForMultiModalEmbedding):
            if isinstance(model, Model):
                raise TypeError(f'{type(model).__name__} is not a Chinese CLIP model of this plugin; pass its '
                                f'model dir instead (any layout loads), or Model.from_pretrained a plugin dir')
            if not isinstance(model, (str, os.PathLike)):
                raise TypeError(f'model must be a model dir, weights file, hub id or CNClipForMultiModalEmbedding, '
                                f'got {type(model).__name__}')
            model = CNClipForMultiModalEmbedding(str(model), device=device, precision=precision, config=config,
                                                 revision=revision, fast_decode=fast_decode, backend=backend)
        if preprocessor is None:
            preprocessor = CNClipPreprocessor(transform=model.transform, tokenizer=model.tokenizer)
        # The base class reads a configuration.json next to the model; sources without one (a .pt file, a stock
        # hub dir naming the built-in type) get the plugin's own.
        own = Path(str(model.model_dir), 'configuration.json')
        use_own = own.is_file() and Path(str(model.model_dir), PLUGIN_CONFIG).is_file()
        config_file = str(own if use_own else RESOURCES / 'configuration.json')
        kwargs.pop('config_file', None)
        super().__init__(config_file=config_file, model=model, preprocessor=preprocessor, device=device, **kwargs)

    def _get_framework(self) -> str:
        return Frameworks.torch

    def _check_input(self, input: Any) -> None:
        check_input_keys(input)
        if all(input.get(k) is None for k in (*RAW_KEYS, 'pixel_values', 'input_ids', 'video_pixel_values')):
            raise ValueError('input has neither "img" nor "text" nor "video"; give at least one, '
                             'e.g. {"text": ["皮卡丘"]}')

    def _sanitize_parameters(self, **pipeline_parameters: Any) -> tuple[dict, dict, dict]:
        unknown = sorted(set(pipeline_parameters) - {'sampling'})
        if unknown:
            raise TypeError(f'unknown pipeline argument(s) {unknown}; a call takes sampling= (a FrameSampling: '
                            f'which video frames) and batch_size=')
        return pipeline_parameters, {}, {}

    def _process_batch(self, input: list[dict[str, Any]], batch_size: int, **kwargs: Any) -> list[dict[str, Any]]:
        """``p([input, ...], batch_size=n)``: one output per input, each exactly what ``p(input)`` returns.

        ModelScope's generic batching concatenates every input's tensors and hands row ``i`` back to input ``i``,
        which is wrong for inputs holding several texts or images, or different modalities. Here each input is
        embedded as its own batch (its images, texts and videos are already batched inside it), so the results
        equal unbatched calls bit for bit; putting inputs of other lengths into one forward pass would change float
        rounding. For throughput, give one input many items: ``p({'img': [...], 'text': [...]})``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size={batch_size!r}: expected a whole number >= 1')
        return [self._process_single(item, **kwargs) for item in input]

    def preprocess(self, input: dict[str, Any], **preprocess_params: Any) -> dict[str, Any]:
        return self.preprocessor(input, **preprocess_params)

    def forward(self, input: dict[str, Any], **forward_params: Any) -> dict[str, Any]:
        """Embed; raw input (``p.forward({'img': [...]})``, as with the built-in pipeline) is preprocessed first,
        with ``forward_params`` as the video sampling."""
        self._check_input(input)
        if not self._model_prepare:
            self.prepare_model()
        if any(input.get(k) is not None for k in RAW_KEYS):
            input = self.preprocess(input, **self._sanitize_parameters(**forward_params)[0])
        return self.model(input)

    def postprocess(self, inputs: dict[str, Any], **postprocess_params: Any) -> dict[str, Any]:
        return inputs
