"""Building a ready model and embedding images and texts with it: plain functions, no ModelScope."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from modelscope_cnclip.checkpoints.convert import load_strict
from modelscope_cnclip.checkpoints.layouts import Checkpoint, read_source
from modelscope_cnclip.config import BACKENDS, DEFAULT_BATCH, Backend, CLIPConfig, Precision, match_architecture
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.runtime import ExportedCLIP, is_export_dir
from modelscope_cnclip.tokenizer import Tokenizer, check_texts
from modelscope_cnclip.transform import ImageInput, ImageTransform, as_image_batch

if TYPE_CHECKING:
    from modelscope_cnclip.video import FrameSampling

__all__ = ['PRECISIONS', 'resolve_device', 'resolve_dtype', 'build_model', 'encode_images', 'encode_texts',
           'check_token_ids', 'as_image_batch', 'as_text_batch', 'CNClip', 'load']

logger = logging.getLogger(__name__)

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'cpu'``, ``'gpu'``, ``'gpu:N'``, ``'cuda'``, ``'cuda:N'`` (ModelScope's spellings) -> a torch device.

    A GPU request on a machine without CUDA falls back to the CPU with a warning, as ModelScope does.
    """
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    name = str(device).lower()
    if name.startswith('gpu'):
        name = 'cuda' + name[3:]
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={device!r}: use 'cpu', 'gpu', 'gpu:N', 'cuda' or 'cuda:N'") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            logger.info('device %r requested but CUDA is not available; using the CPU', device)
            return torch.device('cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f'device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible')
    return dev


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """``'fp32'`` | ``'fp16'`` | ``'bf16'`` -> dtype, refusing fp16 on a CPU (slow and inexact there)."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision={precision!r}: choose one of {list(PRECISIONS)}')
    if precision == 'fp16' and device.type == 'cpu':
        raise ValueError("precision='fp16' needs a GPU; on a CPU use 'fp32' (exact) or 'bf16'")
    return PRECISIONS[precision]


def build_model(ckpt: Checkpoint) -> CLIP:
    """Instantiate the architecture of ``ckpt`` and load its weights strictly; returned in eval mode, fp32, CPU."""
    # Built on the meta device and given the checkpoint's tensors (assign=True): no random init, no second copy.
    with torch.device('meta'):
        model = CLIP(ckpt.config)
    load_strict(model, ckpt.state_dict, f'{ckpt.name} (from {ckpt.layout} layout {ckpt.source})', assign=True)
    model.init_buffers()
    return model.float().eval()


def as_text_batch(texts: Any) -> Any:
    """A str, a list of str, or token ids; ``(L,)`` ids become ``(1, L)``."""
    if isinstance(texts, torch.Tensor) and texts.dim() == 1:
        return texts.unsqueeze(0)
    return texts


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size}: must be >= 1')


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def check_token_ids(ids: torch.Tensor, config: CLIPConfig, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Check ``(N, L)`` token ids before they reach the text tower (whose own errors are index errors from deep
    inside BERT); returns them as int64. ``[PAD]=0`` marks padding.

    Raises:
        TypeError: not an integer tensor. ValueError: not 2-d, longer than the text tower's positions, or ids
        outside the vocabulary.
    """
    text, fix = config.text, "tokenize texts with model.tokenizer(texts)['input_ids']"
    if tokenizer is not None:
        fix += f' (which truncates to the context length {tokenizer.context_length})'
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f'text: token ids must be an integer tensor, got {ids.dtype}; {fix}')
    if ids.dim() != 2 or (ids.shape[1] == 0 and ids.shape[0]):
        raise ValueError(f'text: token ids must be (N, L) with L >= 1, got {tuple(ids.shape)}; {fix}')
    if ids.shape[1] > text.max_position_embeddings:
        raise ValueError(f'text: token ids are {ids.shape[1]} long, but the text tower has '
                         f'{text.max_position_embeddings} positions; {fix}, or cut each row to at most '
                         f'{text.max_position_embeddings} ids ending with [SEP]=102')
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= text.vocab_size):
        raise ValueError(f'text: token ids must lie in [0, {text.vocab_size}) (the vocabulary), got values '
                         f'{int(ids.min())}..{int(ids.max())}; {fix}')
    return ids.long()  # int16/int32/uint8 ids too: the embedding takes int64 (or int32) indices


@torch.inference_mode()
def encode_images(model: CLIP | ExportedCLIP, transform: ImageTransform, images: Sequence[ImageInput] | torch.Tensor, *,
                  batch_size: int = DEFAULT_BATCH, normalize: bool = True, num_threads: int = 0) -> torch.Tensor:
    """Embed images (inputs or an ``(N, 3, R, R)`` float pixel tensor) -> ``(N, D)`` float32 on the model's device.

    Inputs are decoded and resized in ``num_threads`` threads (0: one per CPU, at most 8), batches ahead of
    the model, so input work overlaps compute.

    Raises:
        ValueError / TypeError / FileNotFoundError / OSError: ``img[i]: ...`` naming the first input that cannot be
        read (not an image, above the pixel limit, a float image, ...); a pixel tensor of the wrong shape or dtype
        (see :meth:`ImageTransform.check_pixels`).
    """
    _check_batch_size(batch_size)
    device = model.device
    if isinstance(images, torch.Tensor):
        transform.check_pixels(images)
        batches = (images[s] for s in _chunks(len(images), batch_size))
    else:
        batches = transform.batches(list(images), batch_size, num_threads)
    outs = [model.encode_image(b.to(device, non_blocking=True)).float() for b in batches]
    feats = torch.cat(outs) if outs else torch.empty(0, model.config.embed_dim, device=device)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.inference_mode()
def encode_texts(model: CLIP | ExportedCLIP, tokenizer: Tokenizer, texts: str | Sequence[str] | torch.Tensor, *,
                 batch_size: int = DEFAULT_BATCH, normalize: bool = True) -> torch.Tensor:
    """Embed texts (str, list of str, or ``(N, L)`` token ids) -> ``(N, D)`` float32 on the model's device.

    Raw texts are sorted by length into batches, each padded only to its own longest text.
    """
    _check_batch_size(batch_size)
    device = model.device
    if isinstance(texts, torch.Tensor):
        texts = check_token_ids(texts, model.config, tokenizer)
        outs = [model.encode_text(texts[s].to(device)).float() for s in _chunks(len(texts), batch_size)]
        feats = torch.cat(outs) if outs else torch.empty(0, model.config.embed_dim, device=device)
    else:
        items = check_texts(texts)
        ids = tokenizer(items)['input_ids']
        lengths = ids.ne(0).sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        feats = torch.empty(len(items), model.config.embed_dim, device=device)
        for s in _chunks(len(items), batch_size):
            idx = order[s]
            batch = ids[idx, :int(lengths[idx].max())].to(device)
            feats[idx.to(device)] = model.encode_text(batch).float()
    return F.normalize(feats, dim=-1) if normalize else feats


def _place(model: CLIP, device: torch.device, precision: str) -> None:
    """Move ``model`` to ``device`` and cast it to ``precision`` in place."""
    dtype = resolve_dtype(precision, device)
    # Half-precision BatchNorm'd convolutions drift (cosine < 0.999) and gain little on CPUs: there a ResNet
    # image tower stays fp32 while the text tower runs in the requested precision.
    keep_visual = dtype != torch.float32 and model.config.vision.is_resnet and device.type == 'cpu'
    model.to(device=device)
    for name, child in model.named_children():
        if not (keep_visual and name == 'visual'):
            child.to(dtype)
    for param in model.parameters(recurse=False):
        param.data = param.data.to(dtype)
    if keep_visual:
        logger.info('ResNet image tower kept in fp32 on the CPU; the text tower runs in %s', precision)


def _local_or_id(source: str) -> str:
    return str(Path(source).resolve()) if source and Path(source).exists() else source


class CNClip:
    """A loaded Chinese CLIP model with its preprocessing, ready to embed (plain Python, no ModelScope).

    Use :func:`load` to make one. ``model`` is the torch :class:`~modelscope_cnclip.model.CLIP`, or an
    :class:`~modelscope_cnclip.runtime.ExportedCLIP` when an exported dir was loaded (ONNX Runtime, OpenVINO,
    TensorRT); the methods, input handling and errors are the same. ``temperature`` equals ``1 / logit_scale.exp()``;
    :meth:`similarity` gives the cosine similarities ``img @ text.T`` and :meth:`probabilities` the softmax over
    texts of ``(img / temperature) @ text.T``.
    """

    def __init__(self, model: CLIP | ExportedCLIP, tokenizer: Tokenizer, transform: ImageTransform,
                 checkpoint_info: str = '', device: str | torch.device | None = 'cpu', precision: str | None = None,
                 source: str = '') -> None:
        self.fingerprint = model.fingerprint()  # before any cast: the same at every precision and backend
        self.source = source  # what it was loaded from (path or hub id); indexes use it to reload the model
        if isinstance(model, ExportedCLIP):
            self.backend: str = model.backend
            self.precision = model.precision
        else:
            self.backend = 'torch'
            self.precision = precision or 'fp32'
            _place(model, resolve_device(device), self.precision)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.transform = transform
        self.checkpoint_info = checkpoint_info

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, device: str | torch.device | None = 'cpu',
                        precision: Precision | None = None, fast_decode: bool = False) -> 'CNClip':
        """Build from a read checkpoint. The model adopts its tensors (no copy) and ``ckpt.state_dict`` is
        emptied, so a cast to bf16/fp16 frees each fp32 tensor as it goes (peak memory ~ one model)."""
        model = build_model(ckpt)
        ckpt.state_dict = {}
        return cls(model, Tokenizer(ckpt.vocab_file, ckpt.config.context_length),
                   ImageTransform(ckpt.config.preprocess, fast_decode),
                   f'{ckpt.name} from {ckpt.source} ({ckpt.layout})', device, precision, _local_or_id(ckpt.source))

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, *, backend: Backend | None = None,
                    device: str | torch.device | None = 'cpu', precision: str | None = None,
                    fast_decode: bool = False) -> 'CNClip':
        """Run an exported dir (:func:`modelscope_cnclip.deploy.export`) on ``backend`` (default: its format's own
        runtime: ONNX Runtime for ONNX, OpenVINO for OpenVINO IR, TensorRT for engines).

        Raises:
            ValueError: a backend or precision the export cannot run with (the message lists those it can).
            ImportError: the runtime is not installed (the message names the extra).
        """
        model = ExportedCLIP(export_dir, backend=backend, device=resolve_device(device), precision=precision)
        cfg = model.config
        return cls(model, Tokenizer(model.dir / 'vocab.txt', cfg.context_length),
                   ImageTransform(cfg.preprocess, fast_decode), model.describe(), source=_local_or_id(str(model.dir)))

    @property
    def config(self) -> CLIPConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the embeddings are returned (an exported model on ONNX Runtime or OpenVINO returns them on the
        CPU, whichever device runs it)."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def num_params(self) -> dict[str, int]:
        """``{"total", "visual", "text"}`` parameter counts (an exported model's, of the model it was exported
        from)."""
        return self.model.num_params

    def info(self) -> dict[str, Any]:
        """``{"source", "fingerprint", "arch", "embed_dim", "precision"}`` (and ``"backend"`` for an exported model):
        what embeddings dirs and indexes record to reload this model and to recognise it."""
        info = {'source': self.source, 'fingerprint': self.fingerprint,
                'arch': match_architecture(self.config) or 'custom', 'embed_dim': self.config.embed_dim,
                'precision': self.precision}
        if self.backend != 'torch':
            info['backend'] = self.backend
        return info

    @property
    def temperature(self) -> torch.Tensor:
        """``1 / exp(logit_scale)`` as a 0-dim float32 tensor without grad."""
        return (1.0 / self.model.logit_scale.detach().float().exp()).clone()

    def encode_image(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor, *,
                     batch_size: int = DEFAULT_BATCH, normalize: bool = True) -> torch.Tensor:
        """Image embeddings of one image input, a list of them, a uint8 batch (``(N, H, W, C)`` or ``(N, C, H, W)``
        array or tensor), or normalised float pixels (``(3, R, R)`` or ``(N, 3, R, R)`` at the model's ``R``).

        Args:
            batch_size: images per model call.
            normalize: L2-normalise each row (default); ``False`` gives the raw features (the image tower's output
                ``@ proj``, as the official ``encode_image`` returns them).

        Returns:
            ``(N, D)`` float32 on the model's device.

        Raises:
            ValueError / TypeError / FileNotFoundError / OSError: ``img[i]: ...`` naming the first input that cannot
                be read, or a pixel tensor of the wrong shape or dtype.
        """
        return encode_images(self.model, self.transform, as_image_batch(images), batch_size=batch_size,
                             normalize=normalize)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, *, batch_size: int = DEFAULT_BATCH,
                    normalize: bool = True) -> torch.Tensor:
        """Text embeddings of a str, a list of str, or token ids (``(L,)`` or ``(N, L)``, integers in the
        vocabulary, at most the text tower's positions long; see :func:`check_token_ids`).

        Args:
            batch_size: texts per model call.
            normalize: L2-normalise each row (default); ``False`` gives the raw features (the ``[CLS]`` state
                ``@ text_projection``, as the official ``encode_text`` returns them).

        Returns:
            ``(N, D)`` float32 on the model's device.

        Raises:
            TypeError: not a str, a list of str or integer token ids. ValueError: token ids too long or outside the
                vocabulary.
        """
        return encode_texts(self.model, self.tokenizer, as_text_batch(texts), batch_size=batch_size,
                            normalize=normalize)

    def encode_video(self, videos: Any, sampling: FrameSampling | None = None, *,
                     batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        """L2-normalised video embeddings ``(N, D)`` of one video (path, URL, bytes) or a list: the frames that
        ``sampling`` picks (:class:`~modelscope_cnclip.video.FrameSampling`; default 8 segment centres) embedded as
        images, mean-pooled, renormalised. Needs decord; :func:`modelscope_cnclip.video.encode_videos` also skips
        unreadable videos."""
        from modelscope_cnclip.video import FrameSampling, encode_videos  # decord is an optional extra
        return encode_videos(self, videos, FrameSampling.of(sampling), batch_size=batch_size).embeddings

    def similarity(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], *,
                   batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        """Cosine similarities of the images' and the texts' embeddings: ``img @ text.T`` of the L2-normalised
        embeddings, each in ``[-1, 1]``; the scores an index search returns.

        Returns:
            ``(N_images, N_texts)`` float32 on the model's device.

        Raises:
            ValueError: no texts, or an input that cannot be read (see :meth:`encode_image`, :meth:`encode_text`).
        """
        img, txt = self._embed_pair(images, texts, 'similarity', batch_size)
        return img @ txt.t()

    def probabilities(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], *,
                      batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
        """For each image, a probability over the texts: the softmax over texts of ``(img / temperature) @ text.T``
        (what the official quick start and the pokemon example compute; ``temperature`` is 0.01 in the released
        weights, so the scores are sharp).

        Returns:
            ``(N_images, N_texts)`` float32 on the model's device; each row sums to 1.

        Raises:
            ValueError: no texts (a softmax over nothing), or an input that cannot be read.
        """
        img, txt = self._embed_pair(images, texts, 'probabilities', batch_size)
        return ((img / self.temperature.to(img.device)) @ txt.t()).softmax(dim=-1)

    def _embed_pair(self, images: Any, texts: Any, what: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, (list, tuple)) and not texts:
            raise ValueError(f'{what} needs at least one text to score the images against')
        return self.encode_image(images, batch_size=batch_size), self.encode_text(texts, batch_size=batch_size)


def load(source: str | os.PathLike, *, device: str | torch.device | None = 'cpu', precision: str | None = None,
         config: CLIPConfig | str | os.PathLike | None = None, fast_decode: bool = False,
         backend: Backend | None = None) -> CNClip:
    """Load any checkpoint (model dir of any layout, weights file, ModelScope hub id, or an architecture name for its
    published weights) or an exported dir, ready to embed.

    Args:
        source: see :func:`modelscope_cnclip.read_source`; ``'ViT-B-16'`` (any name of
            :func:`~modelscope_cnclip.config.available_models`) downloads the weights that
            :func:`~modelscope_cnclip.pretrained.list_pretrained` names, unless a local path has that name. A dir
            written by ``cnclip export`` (:func:`modelscope_cnclip.deploy.export`) runs on its runtime.
        device: ``'cpu'``, ``'gpu'``, ``'cuda:1'``, ... (a GPU request without CUDA falls back to the CPU).
        precision: ``'fp32'`` (exact; the default for checkpoints), ``'bf16'`` (fast on CPUs with AVX512-BF16/AMX
            and on GPUs) or ``'fp16'`` (GPU only). For an exported dir, the precision it was exported in (the
            default), or ``'bf16'`` for an fp32/int8 export on OpenVINO.
        config: override the architecture (a name such as ``'ViT-B-16'``, a :class:`CLIPConfig` or a JSON path);
            not for exported dirs, which carry theirs.
        fast_decode: decode JPEGs at reduced size before resizing (faster on photos; slightly different pixels).
        backend: ``'torch'`` (checkpoints), ``'onnxruntime'``, ``'openvino'`` or ``'tensorrt'`` (exported dirs);
            default: torch for checkpoints, the export's own runtime for exported dirs.

    Raises:
        ValueError: a backend that cannot run ``source`` (checkpoints run on torch; export them first with
            ``cnclip export``), or a precision the source cannot run in.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f'backend={backend!r}: choose one of {list(BACKENDS)}')
    if is_export_dir(source):
        if config is not None:
            raise ValueError(f'config={config!r}: {source} is an exported model, whose architecture is fixed in its '
                             f'graphs; drop config')
        if backend == 'torch':
            raise ValueError(f"backend='torch': {source} is an exported model (graphs, no torch weights); run it "
                             f"with backend='onnxruntime' or 'openvino', or load the checkpoint it was exported from")
        return CNClip.from_export(source, backend=backend, device=device, precision=precision,
                                  fast_decode=fast_decode)
    if backend not in (None, 'torch'):
        raise ValueError(f'backend={backend!r} runs exported models, and {source} is a checkpoint: export it first '
                         f'(cnclip export {source} --out DIR --format '
                         f'{"onnx" if backend == "onnxruntime" else backend}) and load DIR, or use backend="torch"')
    return CNClip.from_checkpoint(read_source(source, config), device=device, precision=precision,
                                  fast_decode=fast_decode)
