"""TensorRT engines for exported towers: built from the tower's fp16 ONNX graph as a strongly typed network with
one dynamic-shape optimization profile (min / opt / max batch, and text length), run on a CUDA device with torch
tensors for input and output.

An engine is tied to the TensorRT version (and GPU) that built it, so the exported dir keeps the ONNX graph it was
built from: an engine that the installed TensorRT cannot deserialize is rebuilt from it on load (a warning says so;
``cnclip export ... --format tensorrt`` again writes the new engine to disk).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from modelscope_cnclip.runtime import IO_NAMES, ExportManifest, require

__all__ = ['build_engine', 'TensorRTTower', 'engine_profile']

logger = logging.getLogger(__name__)

_WHY = 'a TensorRT engine'


def engine_profile(tower: str, image_size: int, context_length: int, max_batch: int,
                   opt_batch: int | None = None) -> dict[str, list[list[int]]]:
    """The optimization profile of a tower's engine: ``{"min", "opt", "max"}`` input shapes.

    Images ``(B, 3, R, R)`` with ``B`` in ``1..max_batch``; texts ``(B, L)`` with ``L`` in ``1..context_length``.
    """
    if max_batch < 1:
        raise ValueError(f'max_batch={max_batch}: must be >= 1')
    opt = min(opt_batch or min(max_batch, 64), max_batch)
    if tower == 'image':
        shape = [3, image_size, image_size]
        return {'min': [1, *shape], 'opt': [opt, *shape], 'max': [max_batch, *shape]}
    return {'min': [1, 1], 'opt': [opt, context_length], 'max': [max_batch, context_length]}


def build_engine(onnx_path: str | Path, tower: str, profile: Mapping[str, list[int]]) -> bytes:
    """Build a serialized engine from an ONNX graph whose types are already what it should compute in (the fp16
    graph with fp32 inputs and outputs): a strongly typed network, so TensorRT 10 and 11 build the same thing.

    Raises:
        ImportError: TensorRT is not installed. RuntimeError: the parser or the builder failed (their messages).
    """
    trt = require('tensorrt', _WHY)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    strong = getattr(trt.NetworkDefinitionCreationFlag, 'STRONGLY_TYPED', None)
    network = builder.create_network(0 if strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f'TensorRT could not parse {onnx_path}: {errors}')
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(IO_NAMES[tower][0], *(tuple(profile[k]) for k in ('min', 'opt', 'max')))
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f'TensorRT could not build an engine from {onnx_path} (see its log above)')
    return bytes(plan)


_TORCH_DTYPES = {'FLOAT': torch.float32, 'HALF': torch.float16, 'INT32': torch.int32, 'INT64': torch.int64,
                 'BF16': torch.bfloat16}


class TensorRTTower:
    """One tower's engine on one CUDA device: ``(B, ...)`` torch tensor in, ``(B, D)`` float32 CUDA tensor out.

    Batches above the profile's max batch run in chunks; texts longer than its max length are refused.
    """

    def __init__(self, d: Path, manifest: ExportManifest, tower: str, device: torch.device) -> None:
        trt = require('tensorrt', _WHY)
        if device.type != 'cuda':
            raise ValueError(f"device={str(device)!r}: TensorRT engines run on CUDA GPUs; load with device='cuda', "
                             f"or run the ONNX graph in the same dir with backend='onnxruntime'")
        spec = manifest.towers[tower]
        info = manifest.details.get('tensorrt', {})
        self.profile = info['profiles'][tower]
        self.device, self.tower = device, tower
        self.input, self.output = IO_NAMES[tower]
        with torch.cuda.device(device):
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine((d / spec.file).read_bytes())
            if engine is None:  # built by another TensorRT version or for another GPU
                logger.warning('%s: the %s engine was built with TensorRT %s and does not load on TensorRT %s here; '
                               'rebuilding it from %s (export again to keep the new engine)', d, tower,
                               info.get('version'), trt.__version__, spec.onnx)
                engine = runtime.deserialize_cuda_engine(build_engine(d / str(spec.onnx), tower, self.profile))
            if engine is None:
                raise RuntimeError(f'{d}: TensorRT {trt.__version__} cannot load or rebuild the {tower} engine')
            self.engine = engine
            self.context = engine.create_execution_context()
        self.in_dtype = _TORCH_DTYPES[engine.get_tensor_dtype(self.input).name]
        self.embed_dim = manifest.config.embed_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        max_batch = self.profile['max'][0]
        if x.dim() == 2 and x.shape[1] > self.profile['max'][1]:
            raise ValueError(f'text: {x.shape[1]} tokens, but this TensorRT engine was built for at most '
                             f'{self.profile["max"][1]}; cut the texts (the tokenizer does), or export again')
        outs = [self._run(x[i:i + max_batch]) for i in range(0, len(x), max_batch)]
        return torch.cat(outs) if len(outs) != 1 else outs[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.in_dtype).contiguous()
        out = torch.empty(len(x), self.embed_dim, dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        self.context.set_input_shape(self.input, tuple(x.shape))
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f'TensorRT failed to run the {self.tower} engine on input {tuple(x.shape)}')
        stream.synchronize()
        return out

