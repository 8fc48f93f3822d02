"""Graphs of the two towers: torch -> ONNX (fp32), ONNX -> fp16, ONNX -> OpenVINO IR. Pure file-to-file steps.

Each tower is traced on its own with a dynamic batch (and, for texts, a dynamic length), by torch's TorchScript-based
exporter: the ``torch.export``-based one specialises the text length when it meets length-1 examples, and the graphs
it writes differ in results at lengths it did not see. The trace runs the model's plain MLP (the row-chunked
inference MLP loops a data-dependent number of times, which a trace would freeze), with a padded text row, so
that the attention mask stays in the graph.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from modelscope_cnclip.model import CLIP
from modelscope_cnclip.runtime import IO_NAMES, require

__all__ = ['OPSET', 'EXTERNAL_DATA_BYTES', 'export_onnx', 'to_fp16', 'to_openvino', 'read_onnx_for_openvino',
           'graph_files', 'save_graph']

logger = logging.getLogger(__name__)

#: ONNX opset of the exported graphs (the official export's 13 fails on current torch: ``aten::unflatten``)
OPSET = 17
#: above this many bytes of weights a graph keeps them in one ``<graph>.data`` file beside it (protobuf's 2 GB limit)
EXTERNAL_DATA_BYTES = 1_800_000_000
_WHY = 'exporting to ONNX'


class _Tower(nn.Module):
    """One tower of a CLIP as its own module: ``pixel_values -> image_features`` or ``input_ids ->
    text_features``."""

    def __init__(self, clip: CLIP, tower: str) -> None:
        super().__init__()
        self.clip, self.tower = clip, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x) if self.tower == 'image' else self.clip.encode_text(x)


def _example(clip: CLIP, tower: str) -> torch.Tensor:
    cfg = clip.config
    if tower == 'image':
        size = cfg.vision.image_size
        return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # [CLS] ... [SEP] and a shorter padded row: the mask path must be traced, not skipped as all-ones
    ids = torch.tensor([[101, 2769, 4263, 872, 102], [101, 1962, 102, 0, 0]])
    return ids.clamp(max=cfg.text.vocab_size - 1)


def graph_files(path: Path) -> list[Path]:
    """The graph file and its external data file, if it has one."""
    data = path.with_name(path.name + '.data')
    return [path, data] if data.is_file() else [path]


def _weights_bytes(clip: CLIP, tower: str) -> int:
    module = clip.visual if tower == 'image' else clip.bert
    return sum(p.numel() * p.element_size() for p in module.parameters())


def save_graph(model: object, path: Path, external: bool) -> None:
    """Save an ONNX model as one file, or with its weights in one ``<name>.data`` file beside it."""
    onnx = require('onnx', _WHY)
    for stale in graph_files(path):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + '.data', size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_onnx(clip: CLIP, tower: str, path: str | Path, *, opset: int = OPSET,
                external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """Export one tower of an fp32 CPU ``clip`` to an ONNX graph with dynamic batch (and text length).

    Args:
        tower: ``'image'`` (``pixel_values (B, 3, R, R) float32 -> image_features (B, D)``) or ``'text'``
            (``input_ids (B, L) int64 -> text_features (B, D)``).
        external_data_bytes: weights above this size go to one ``<path>.data`` file.
    Returns:
        The files written (the graph, and its data file if any).
    Raises:
        ImportError: onnx is not installed (the message names the ``export`` extra).
    """
    onnx = require('onnx', _WHY)
    path = Path(path)
    external = _weights_bytes(clip, tower) > external_data_bytes
    input_name, output_name = IO_NAMES[tower]
    axes = {0: 'batch'} if tower == 'image' else {0: 'batch', 1: 'length'}
    wrapper = _Tower(clip, tower).eval()  # the exporter puts the wrapper's mode back on the model when it is done
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # "legacy TorchScript-based exporter": chosen, see above
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        # "aten::index ... incorrect results if indices include negative values": none do (parity tests)
        warnings.filterwarnings('ignore', category=UserWarning, module=r'torch\.onnx')
        raw = Path(tmp) / 'graph.onnx'
        torch.onnx.export(wrapper, (_example(clip, tower),), str(raw), dynamo=False, opset_version=opset,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: axes, output_name: {0: 'batch'}}, do_constant_folding=True)
        # The exporter writes a >2 GB graph as one file per tensor; gather them into one data file (or none).
        model = onnx.load(str(raw), load_external_data=True)
        model.producer_name, model.doc_string = 'modelscope_cnclip', f'Chinese CLIP {tower} tower'
        save_graph(model, path, external)
    onnx.checker.check_model(str(path))
    logger.info('wrote %s (%s tower, opset %d%s)', path, tower, opset, ', external data' if external else '')
    return graph_files(path)


def to_fp16(src: str | Path, dst: str | Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[Path]:
    """An fp16 copy of an fp32 graph with fp32 inputs and outputs (ONNX Runtime's float16 converter, which keeps
    the ops that need fp32 in fp32). For GPUs (ONNX Runtime CUDA, TensorRT); ONNX Runtime's CPU provider runs it
    too, without speed-up."""
    onnx = require('onnx', _WHY)
    float16 = require('onnxruntime.transformers.float16', 'converting a graph to fp16')
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=size > 1_000_000_000)
    save_graph(half, dst, size // 2 > external_data_bytes)
    return graph_files(dst)


def to_openvino(model: object, dst: str | Path) -> list[Path]:
    """Save an OpenVINO model (converted from an ONNX graph, or quantized) as IR: ``dst`` (.xml) and its .bin,
    weights kept in their precision (OpenVINO's default would round fp32 weights to fp16)."""
    ov = require('openvino', 'exporting to OpenVINO')
    dst = Path(dst)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return [dst, dst.with_suffix('.bin')]


def read_onnx_for_openvino(src: str | Path) -> object:
    """An ONNX graph as an OpenVINO model (``openvino.convert_model``)."""
    ov = require('openvino', 'exporting to OpenVINO')
    return ov.convert_model(str(src))

