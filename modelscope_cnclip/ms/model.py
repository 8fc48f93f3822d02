"""ModelScope ``Model`` adapter (type ``cnclip``): a thin wrapper over :class:`modelscope_cnclip.CNClip`."""
from __future__ import annotations

import os
from typing import Any

import torch
from modelscope.models.base import TorchModel
from modelscope.models.builder import MODELS
from modelscope.outputs import OutputKeys
from modelscope.utils.constant import Tasks

from modelscope_cnclip.checkpoints.layouts import LAYOUTS, Checkpoint, default_configuration, read_source, write_dir
from modelscope_cnclip.config import CLIPConfig
from modelscope_cnclip.inference import CNClip, load
from modelscope_cnclip.ms import MODEL_TYPE, PIPELINE_TYPE, PREPROCESSOR_TYPE
from modelscope_cnclip.runtime import is_export_dir
from modelscope_cnclip.video import pool_frames

RAW_KEYS = ('img', 'text', 'video')
# Preprocessed videos: the frames of all videos in order, (sum F_i, 3, R, R), and F_i per video, (V,).
VIDEO_KEYS = ('video_pixel_values', 'video_frame_counts')
TENSOR_KEYS = ('pixel_values', 'input_ids', 'attention_mask', *VIDEO_KEYS)


def plugin_configuration(config: Any = None) -> dict[str, Any]:
    """The ``configuration.json`` of a plugin model dir: ``config`` (dict or ModelScope ``Config``; default the
    repo's) with this plugin's model, pipeline and preprocessor types, whatever ``config`` said (ModelScope's
    trainer rewrites the pipeline type to the task name)."""
    conf = config.to_dict() if hasattr(config, 'to_dict') else dict(config or default_configuration())
    conf['model'] = {**conf.get('model', {}), 'type': MODEL_TYPE}
    conf['pipeline'] = {'type': PIPELINE_TYPE}
    conf['preprocessor'] = {'type': PREPROCESSOR_TYPE}
    conf.pop('pretrained_model', None)
    return conf


def check_input_keys(inputs: Any) -> None:
    if not isinstance(inputs, dict):
        raise TypeError(f'input must be a dict like {{"img": ..., "text": ...}}, got {type(inputs).__name__}')
    unknown = sorted(set(inputs) - set(RAW_KEYS) - set(TENSOR_KEYS))
    if unknown:
        raise ValueError(f'unknown input key(s) {unknown}; use "img" (images), "video" (video files or bytes) '
                         f'and/or "text" (str or list of str)')


@MODELS.register_module(Tasks.multi_modal_embedding, module_name=MODEL_TYPE)
@MODELS.register_module(Tasks.image_text_retrieval, module_name=MODEL_TYPE)
class CNClipForMultiModalEmbedding(TorchModel):
    """Chinese CLIP as a ModelScope model: ``forward({'img': ..., 'text': ..., 'video': ...})`` returns
    L2-normalised ``img_embedding`` / ``text_embedding`` / ``video_embedding`` (``None`` for a missing modality).

    Args:
        model_dir: any source :func:`modelscope_cnclip.read_source` reads (model dir of any layout, weights file,
            hub id), or an exported dir (``cnclip export``; embeds only: ``clip`` is ``None``, nothing to train or
            save). ``Model.from_pretrained`` passes the plugin dir here.
        device: ``'cpu'``, ``'gpu'``, ``'cuda:1'``, ...; ModelScope passes ``'cuda'`` by default (falls back to CPU).
        precision: ``'fp32'`` (exact), ``'bf16'`` (fast) or ``'fp16'`` (GPU); an exported dir's own by default.
        backend: for an exported dir, ``'onnxruntime'``, ``'openvino'`` or ``'tensorrt'`` (default: its own).
        config: override the architecture (name, :class:`CLIPConfig` or JSON path).
        checkpoint: an already-read :class:`Checkpoint` instead of ``model_dir``.
        fast_decode: decode JPEGs at reduced size before the resize (faster on photos, slightly inexact).
    """

    def __init__(self, model_dir: str | None = None, device: str | None = None, precision: str | None = None,
                 config: CLIPConfig | str | None = None, checkpoint: Checkpoint | None = None,
                 revision: str | None = None, fast_decode: bool = False, backend: str | None = None,
                 **kwargs: Any) -> None:
        if checkpoint is None and model_dir is not None and is_export_dir(model_dir):
            super().__init__(model_dir=str(model_dir), device=str(device or 'cpu'))
            self.core = load(model_dir, device=device, precision=precision, config=config, fast_decode=fast_decode,
                             backend=backend)
            self.clip = None  # graphs on a runtime: nothing to train or save
            self.arch, self.source_layout = self.core.model.manifest.arch, 'export'
            self.vocab_file, self.guessed = self.core.model.dir / 'vocab.txt', ()
        else:
            if checkpoint is None:
                if model_dir is None:
                    raise ValueError('CNClipForMultiModalEmbedding needs model_dir (a model dir, weights file, hub id '
                                     'or exported dir) or checkpoint')
                checkpoint = read_source(model_dir, config, revision=revision)
            super().__init__(model_dir=str(model_dir or checkpoint.source), device=str(device or 'cpu'))
            self.core = CNClip.from_checkpoint(checkpoint, device=device, precision=precision,
                                               fast_decode=fast_decode)
            self.clip = self.core.model  # registered as the submodule that trainers and .to() see
            self.arch = checkpoint.name
            self.source_layout = checkpoint.layout
            self.vocab_file = checkpoint.vocab_file
            self.guessed = checkpoint.guessed  # config fields read off shapes only; saved dirs keep saying so
        self.tokenizer = self.core.tokenizer
        self.transform = self.core.transform
        # What pipeline(task, model=<this object>) builds (read before any configuration.json).
        self.pipeline = {'type': PIPELINE_TYPE}
        self.eval()

    @property
    def config(self) -> CLIPConfig:
        return self.core.config

    @property
    def temperature(self) -> torch.Tensor:
        """``1 / exp(logit_scale)``: a 0-dim float32 tensor without grad."""
        return self.core.temperature

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``{'img'|'pixel_values': ..., 'text'|'input_ids': ..., 'video'|'video_pixel_values' and
        'video_frame_counts': ...}`` -> embeddings (missing modality -> ``None``)."""
        check_input_keys(inputs)
        img = inputs.get('pixel_values', inputs.get('img'))
        text = inputs.get('input_ids', inputs.get('text'))
        return {OutputKeys.IMG_EMBEDDING: None if img is None else self.core.encode_image(img),
                OutputKeys.TEXT_EMBEDDING: None if text is None else self.core.encode_text(text),
                OutputKeys.VIDEO_EMBEDDING: self._encode_video(inputs)}

    def _encode_video(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        pixels, counts = (inputs.get(k) for k in VIDEO_KEYS)
        if pixels is None and counts is None:
            return None if inputs.get('video') is None else self.core.encode_video(inputs['video'])
        if pixels is None or counts is None:
            raise ValueError(f'preprocessed videos need both {list(VIDEO_KEYS)} (as CNClipPreprocessor makes them)')
        return pool_frames(self.core.encode_image(pixels), counts)

    def to_checkpoint(self) -> Checkpoint:
        """The current weights (fp32, CPU) as a :class:`Checkpoint`.

        Raises:
            ValueError: an exported model (graphs, no torch weights).
        """
        if self.clip is None:
            raise ValueError(f'{self.model_dir} is an exported model: it has no torch weights to save or train; use '
                             f'the checkpoint it was exported from ({self.core.model.manifest.source or "unknown"})')
        sd = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
              for k, v in self.clip.state_dict().items()}
        return Checkpoint(sd, self.config, self.vocab_file, 'plugin', str(self.model_dir), self.guessed)

    def save_pretrained(self, target_folder: str | os.PathLike, save_checkpoint_names: Any = None,
                        save_function: Any = None, config: Any = None, save_config_function: Any = None,
                        to: str = 'plugin', overwrite: bool = True, **kwargs: Any) -> None:
        """Write a complete model dir: the plugin layout (safetensors, configuration.json, cnclip_config.json,
        vocab) unless ``to`` is ``'hub'`` or ``'hf'``. ``config`` (a dict or ModelScope ``Config``) replaces the
        default ``configuration.json`` content; the other ModelScope arguments are accepted and unused, since
        the weights are always written here (never a separate, possibly stale, weights file)."""
        if to not in LAYOUTS:
            raise ValueError(f'to={to!r}: choose one of {list(LAYOUTS)}')
        conf = plugin_configuration(config) if to == 'plugin' else None
        write_dir(self.to_checkpoint(), target_folder, to=to, overwrite=overwrite, configuration=conf)
