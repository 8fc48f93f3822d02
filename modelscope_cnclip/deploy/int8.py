"""int8 post-training quantization of one tower, calibrated and gated on the user's own images and texts.

* ONNX (ONNX Runtime): dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): int8 weights per
  output channel for every MatMul/Gemm, activations quantized per batch at run time. On CPUs it was both faster and
  closer to fp32 than static QDQ quantization of the same graphs; the calibration inputs measure the gate.
* OpenVINO: NNCF's static post-training quantization (``nncf.quantize``, transformer mode for the ViT and BERT
  towers, with SmoothQuant), whose activation ranges come from the calibration inputs.

A tower keeps int8 only if it passes :class:`Int8Gate` against the fp32 torch model on the calibration inputs:
mean cosine of the embeddings, and R@1 in both directions when the calibration inputs are image-text pairs (else
the R@1 of finding each input's own fp32 embedding with its int8 one, i.e. searching an fp32-built index with int8
queries). BERT-family text towers are known to lose accuracy under int8; they are measured separately, and a
failing tower stays fp32 with its figures recorded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modelscope_cnclip.data import open_split, split_form
from modelscope_cnclip.evaluation.retrieval import retrieval_metrics
from modelscope_cnclip.jobs.collection import open_collection
from modelscope_cnclip.runtime import require
from modelscope_cnclip.tokenizer import Tokenizer, check_texts
from modelscope_cnclip.transform import ImageTransform

__all__ = ['Int8Gate', 'Calibration', 'read_calibration', 'quantize_onnx', 'quantize_openvino', 'measure',
           'DEFAULT_CALIBRATION', 'r1_both', 'embed_rows', 'calibration_items']

logger = logging.getLogger(__name__)

#: calibration inputs used per modality (NNCF's default subset size)
DEFAULT_CALIBRATION = 300


@dataclass(frozen=True)
class Int8Gate:
    """When an int8 tower is accepted.

    Attributes:
        min_cosine: the mean cosine between its embeddings and the fp32 ones, at least this.
        max_r1_drop: R@1 (percent, each direction) at most this many points below fp32.
    """

    min_cosine: float = 0.99
    max_r1_drop: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_cosine <= 1 or not 0 <= self.max_r1_drop <= 100:
            raise ValueError(f'Int8Gate(min_cosine={self.min_cosine}, max_r1_drop={self.max_r1_drop}): min_cosine '
                             f'must lie in (0, 1] and max_r1_drop in [0, 100] (points)')


@dataclass
class Calibration:
    """Preprocessed calibration inputs.

    Attributes:
        pixels: ``(N, 3, R, R)`` float32 normalised images, or ``None``.
        token_ids: ``(M, L)`` int64 token ids (``[PAD]=0``), or ``None``.
        image_ids: for pairs, the id of each image row; ``text_image_ids``: the ids of each text's images.
        source: where the inputs came from (for the report).
    """

    pixels: torch.Tensor | None
    token_ids: torch.Tensor | None
    image_ids: list[Any] | None = None
    text_image_ids: list[list[Any]] | None = None
    source: str = ''

    @property
    def paired(self) -> bool:
        return self.image_ids is not None and self.text_image_ids is not None

    def describe(self) -> dict[str, Any]:
        return {'source': self.source, 'images': 0 if self.pixels is None else len(self.pixels),
                'texts': 0 if self.token_ids is None else len(self.token_ids), 'paired': self.paired}


def _read_texts(texts: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if path.suffix == '.txt':
            if not path.is_file():
                raise FileNotFoundError(f'calibration texts {str(path)!r} not found')
            lines = [t.strip() for t in path.read_text(encoding='utf-8').splitlines()]
            return [t for t in lines if t]
        coll = open_collection(path, 'text')
        return [coll.read(item) for item in coll.items]
    return check_texts(list(texts), 'calibration texts')


def _pixels(transform: ImageTransform, images: Sequence[Any], where: str) -> torch.Tensor:
    try:
        return transform.batch(images)
    except (ValueError, TypeError, OSError) as e:
        raise type(e)(f'calibration {where}: {e}') from e


def read_calibration(source: Any, transform: ImageTransform, tokenizer: Tokenizer, *, split: str = 'valid',
                     texts: str | os.PathLike | Sequence[str] | None = None,
                     limit: int = DEFAULT_CALIBRATION) -> Calibration:
    """Read and preprocess calibration inputs (the first ``limit`` images and texts).

    Args:
        source: image-text pairs (an official-format dir with ``split``, or its LMDB form; a ``.jsonl``/``.csv``
            with image and text columns), or images only (a folder, a table of paths, a list of image inputs).
        texts: calibration texts when ``source`` has none: a ``.txt`` file (one a line), a ``.jsonl``/``.csv``
            with a text column, or a list of str. Without any, the text tower stays fp32.
    Raises:
        FileNotFoundError / ValueError: an unreadable source or image, naming it.
    """
    if limit < 1:
        raise ValueError(f'calibration size {limit}: must be >= 1')
    where = str(source) if isinstance(source, (str, os.PathLike)) else f'{type(source).__name__} of images'
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        if path.is_dir() and split_form(path, split) is not None:
            return _official(path, split, transform, tokenizer, limit, texts)
        if path.is_file() and path.suffix in ('.jsonl', '.csv', '.tsv'):
            paired = _table_pairs(path, transform, tokenizer, limit)
            if paired is not None:
                return paired
        coll = open_collection(path, 'image')
        images = [coll.read(item) for item in coll.items[:limit]]
    else:
        images = list(source)[:limit]
        if not images:
            raise ValueError('calibration: no images given')
    pixels = _pixels(transform, images, where)
    ids = tokenizer(_read_texts(texts)[:limit])['input_ids'] if texts is not None else None
    if ids is not None and not len(ids):
        raise ValueError(f'calibration texts {texts}: no texts in it')
    return Calibration(pixels, ids, source=where)


def _official(path: Path, split: str, transform: ImageTransform, tokenizer: Tokenizer, limit: int,
              texts: Any) -> Calibration:
    data = open_split(path, split)
    image_ids = list(data.image_ids[:limit])
    chosen = set(image_ids)
    records = [t for t in data.texts if chosen & set(t.image_ids)][:limit]
    pixels = _pixels(transform, [data.image_bytes(i) for i in image_ids], f'{path} ({split})')
    if not records:  # an unlabelled split: its texts calibrate, no pairs to score
        extra = [t.text for t in data.texts][:limit] if texts is None else _read_texts(texts)[:limit]
        return Calibration(pixels, tokenizer(extra)['input_ids'] if extra else None, source=f'{path} ({split})')
    return Calibration(pixels, tokenizer([t.text for t in records])['input_ids'], image_ids,
                       [[i for i in t.image_ids if i in chosen] for t in records], source=f'{path} ({split})')


def _table_pairs(path: Path, transform: ImageTransform, tokenizer: Tokenizer, limit: int) -> Calibration | None:
    try:
        images, texts = open_collection(path, 'image'), open_collection(path, 'text')
    except (ValueError, KeyError):
        return None  # images only (or texts only): not pairs
    if [i.id for i in images.items] != [t.id for t in texts.items]:
        return None
    order: dict[str, int] = {}
    text_rows = []
    for img, txt in zip(images.items, texts.items):
        if img.source not in order:
            if len(order) == limit:
                continue
            order[img.source] = len(order)
        if len(text_rows) < limit:
            text_rows.append((texts.read(txt), img.source))
    pixels = _pixels(transform, list(order), str(path))
    ids = tokenizer([t for t, _ in text_rows])['input_ids']
    return Calibration(pixels, ids, list(order), [[src] for _, src in text_rows], source=str(path))


# --- quantizers ---------------------------------------------------------------------------------------------------

def quantize_onnx(src: str | Path, dst: str | Path, *, external_data: bool = False) -> None:
    """ONNX Runtime dynamic int8 quantization of an fp32 graph (MatMul/Gemm weights per channel)."""
    quant = require('onnxruntime.quantization', 'int8 quantization for ONNX Runtime')
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / 'pre.onnx'
        try:  # shape inference and graph clean-up, which quantization recommends
            # (ONNX shape inference only: the symbolic one stops at BERT's min(positions, length) slice)
            quant.shape_inference.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True,
                                                    save_as_external_data=external_data)
        except Exception as e:  # noqa: BLE001 - optional step; quantizing the raw graph is correct too
            logger.info('quantization pre-processing of %s skipped (%s)', src, e)
            pre = src
        quant.quantize_dynamic(str(pre), str(dst), weight_type=quant.QuantType.QInt8, per_channel=True,
                               op_types_to_quantize=['MatMul', 'Gemm'], use_external_data_format=external_data)


def quantize_openvino(model: Any, items: Sequence[np.ndarray], tower: str, resnet: bool) -> Any:
    """NNCF post-training int8 quantization of an OpenVINO model, calibrated on ``items`` (one input array each)."""
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the CLI's JSON report
        nncf = require('nncf', 'int8 quantization for OpenVINO')
        model_type = None if tower == 'image' and resnet else nncf.ModelType.TRANSFORMER
        return nncf.quantize(model, nncf.Dataset(list(items)), model_type=model_type, subset_size=len(items))


# --- the gate -----------------------------------------------------------------------------------------------------

def r1_both(img: torch.Tensor, txt: torch.Tensor, calib: Calibration) -> dict[str, float]:
    """R@1 (percent) of text-to-image and image-to-text retrieval over the calibration pairs."""
    m = retrieval_metrics(img, calib.image_ids, txt, calib.text_image_ids)
    return {'t2i': m['t2i']['r1'], 'i2t': m['i2t']['r1']}


def _self_r1(query: torch.Tensor, gallery: torch.Tensor) -> float:
    """R@1 (percent) of finding row i of ``gallery`` with row i of ``query``."""
    top = (query @ gallery.t()).argmax(dim=1)
    return round(float((top == torch.arange(len(query))).float().mean()) * 100, 2)


def measure(tower: str, reference: dict[str, torch.Tensor], candidate: torch.Tensor, calib: Calibration,
            gate: Int8Gate) -> dict[str, Any]:
    """Gate figures of an int8 ``tower`` whose L2-normalised embeddings of the calibration inputs are
    ``candidate``, against the fp32 ``reference`` (``{"image": (N, D), "text": (M, D)}``, normalised).

    Returns:
        ``{"cosine_mean", "cosine_min", "r1": {"fp32": {...}, "int8": {...}} (pairs) or "self_r1": ..., "passed",
        "reasons"}``.
    """
    ref = reference[tower]
    cos = (ref * candidate).sum(dim=1)
    out: dict[str, Any] = {'cosine_mean': round(float(cos.mean()), 6), 'cosine_min': round(float(cos.min()), 6)}
    reasons = []
    if out['cosine_mean'] < gate.min_cosine:
        reasons.append(f'mean cosine {out["cosine_mean"]:.4f} < {gate.min_cosine}')
    if calib.paired and 'text' in reference and 'image' in reference:
        mixed = {**reference, tower: candidate}
        fp32 = r1_both(reference['image'], reference['text'], calib)
        int8 = r1_both(mixed['image'], mixed['text'], calib)
        out['r1'] = {'fp32': fp32, 'int8': int8}
        drops = {d: fp32[d] - int8[d] for d in fp32}
    else:
        fp32, int8 = _self_r1(ref, ref), _self_r1(candidate, ref)
        out['self_r1'] = {'fp32': fp32, 'int8': int8}
        drops = {'self': fp32 - int8}
    for d, drop in drops.items():
        if drop > gate.max_r1_drop:
            reasons.append(f'{d} R@1 {drop:.2f} points below fp32 (allowed {gate.max_r1_drop})')
    out.update(passed=not reasons, reasons=reasons)
    return out


def embed_rows(run: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised outputs of a runtime's tower over ``inputs`` in batches (texts: each batch cut to its longest
    row, as inference does)."""
    outs = []
    for i in range(0, len(inputs), batch_size):
        x = inputs[i:i + batch_size]
        if not x.is_floating_point():
            x = x[:, :max(1, int(x.ne(0).sum(1).max()))]
        outs.append(torch.from_numpy(np.asarray(run(np.ascontiguousarray(x.numpy())))).float())
    return F.normalize(torch.cat(outs), dim=-1)


def calibration_items(inputs: torch.Tensor) -> list[np.ndarray]:
    """One array per calibration input (NNCF collects statistics per item), texts without their padding."""
    if inputs.is_floating_point():
        return [np.ascontiguousarray(x[None].numpy()) for x in inputs]
    return [np.ascontiguousarray(x[None, :max(1, int(x.ne(0).sum()))].numpy()) for x in inputs]
