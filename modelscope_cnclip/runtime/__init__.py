"""Exported models: the ``cnclip_export.json`` manifest of an exported dir and the runtimes that run its towers
(ONNX Runtime, OpenVINO, TensorRT) behind the interface the torch :class:`~modelscope_cnclip.model.CLIP` offers
:mod:`modelscope_cnclip.inference`, so ``load('out/')`` gives the same :class:`~modelscope_cnclip.CNClip` API, input
handling and errors on either.

An exported dir is self-describing: the manifest carries the architecture (and so the preprocessing), the logit
scale, the source model's fingerprint and parameter counts; ``vocab.txt`` sits beside it. Each tower is its own graph
with dynamic batch (and text length): ``pixel_values`` ``(B, 3, R, R)`` float32 -> ``image_features`` ``(B, D)``,
``input_ids`` ``(B, L)`` int64 (``[PAD]=0``) -> ``text_features`` ``(B, D)``, unnormalised, as the official
``encode_image`` / ``encode_text`` return them. Writing exports: :mod:`modelscope_cnclip.deploy`.

The runtimes are optional (the ``export`` extra); nothing here imports them before an exported dir is loaded.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelscope_cnclip.config import BACKENDS, EXPORT_FORMATS, CLIPConfig
from modelscope_cnclip.utils import atomic_write_bytes

__all__ = ['MANIFEST', 'FORMATS', 'BACKENDS', 'EXPORT_EXTRA', 'TowerExport', 'ExportManifest', 'is_export_dir',
           'read_manifest', 'require', 'ExportedCLIP', 'default_backend', 'OrtTower', 'OpenVINOTower']

logger = logging.getLogger(__name__)

MANIFEST = 'cnclip_export.json'
FORMAT, VERSION = 'cnclip-export', 1
FORMATS = EXPORT_FORMATS
TOWERS = ('image', 'text')
#: graph input and output names, per tower
IO_NAMES = {'image': ('pixel_values', 'image_features'), 'text': ('input_ids', 'text_features')}
EXPORT_EXTRA = 'pip install "modelscope_cnclip[export]"'
# The package each runtime needs and the extra that installs it.
_RUNTIME_PACKAGES = {'onnxruntime': ('onnxruntime', EXPORT_EXTRA),
                     'openvino': ('openvino', EXPORT_EXTRA),
                     'tensorrt': ('tensorrt', 'pip install tensorrt (a CUDA machine with a matching driver)')}
# Which runtimes can run the files of each format (the first is the default).
_RUNNABLE = {'onnx': ('onnxruntime', 'openvino'), 'openvino': ('openvino',),
             'tensorrt': ('tensorrt', 'onnxruntime', 'openvino')}


def require(package: str, why: str) -> Any:
    """Import an optional runtime or export package, or raise an ImportError that names the install command."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError as e:
        hint = _RUNTIME_PACKAGES.get(package.split('.')[0], (None, EXPORT_EXTRA))[1]
        raise ImportError(f'{why} needs the {package.split(".")[0]!r} package, which is not installed ({e}); '
                          f'install it with: {hint}') from e


@dataclass(frozen=True)
class TowerExport:
    """One tower's file in an exported dir.

    Attributes:
        file: the graph, relative to the dir (``image.onnx``, ``text.xml``, ``image.plan``).
        precision: what its weights compute in: ``fp32``, ``fp16`` or ``int8``.
        onnx: for a TensorRT engine, the ONNX graph it was built from (so a new TensorRT version can rebuild it).
        quantization: for int8 (or a tower int8 was refused for), the measured gate figures.
    """

    file: str
    precision: str
    onnx: str | None = None
    quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ExportManifest:
    """The ``cnclip_export.json`` of an exported dir: everything needed to run it with no other file but the graphs
    and ``vocab.txt``."""

    format: str
    config: CLIPConfig
    logit_scale: float
    fingerprint: str
    towers: dict[str, TowerExport]
    num_params: dict[str, int]
    source: str = ''
    arch: str = 'custom'
    details: dict[str, Any] = field(default_factory=dict)  # opset, package versions, TensorRT profile, ...

    def to_dict(self) -> dict[str, Any]:
        return {'format': FORMAT, 'version': VERSION, 'backend_format': self.format, 'arch': self.arch,
                'source': self.source, 'fingerprint': self.fingerprint, 'logit_scale': self.logit_scale,
                'num_params': self.num_params, 'towers': {k: t.to_dict() for k, t in self.towers.items()},
                'config': self.config.to_dict(), 'details': self.details}

    def write(self, d: str | os.PathLike) -> None:
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + '\n'
        atomic_write_bytes(Path(d) / MANIFEST, text.encode('utf-8'))

    @property
    def precision(self) -> str:
        """``'fp32'`` when both towers share one precision, else ``'image:int8,text:fp32'``."""
        p = {k: t.precision for k, t in self.towers.items()}
        return p['image'] if p['image'] == p['text'] else f'image:{p["image"]},text:{p["text"]}'


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dir written by :func:`modelscope_cnclip.deploy.export`."""
    try:
        return (Path(os.path.expanduser(str(path))) / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def read_manifest(d: str | os.PathLike) -> ExportManifest:
    """Read and check an exported dir's manifest (and that its files are there).

    Raises:
        ValueError: not an export manifest, a newer format version, or a malformed field.
        FileNotFoundError: a tower's graph or ``vocab.txt`` is missing from the dir.
    """
    d = Path(os.path.expanduser(str(d)))
    path = d / MANIFEST
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: invalid JSON ({e}); export the model again') from None
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f'{path}: not a {FORMAT!r} manifest; export the model again with `cnclip export`')
    version = data.get('version', 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f'{path}: malformed manifest (version {version!r} is not an integer); export the model again')
    if version > VERSION:
        raise ValueError(f'{path}: format version {data["version"]} is newer than this plugin reads ({VERSION}); '
                         f'upgrade modelscope_cnclip')
    try:
        fmt = data['backend_format']
        if fmt not in FORMATS:
            raise ValueError(f'backend_format {fmt!r} is not one of {list(FORMATS)}')
        towers = {k: TowerExport(**data['towers'][k]) for k in TOWERS}
        for k, tower in towers.items():
            for field_name in ('file', 'onnx'):
                name = getattr(tower, field_name)
                if field_name == 'file' or name is not None:
                    _check_file_name(name, f'towers.{k}.{field_name}')
            if tower.precision not in ('fp32', 'fp16', 'int8'):
                raise ValueError(f'towers.{k}.precision {tower.precision!r} is not fp32, fp16 or int8')
        scale = float(data['logit_scale'])
        if not math.isfinite(scale):
            raise ValueError(f'logit_scale {data["logit_scale"]!r} is not a finite number')
        manifest = ExportManifest(
            format=fmt, config=CLIPConfig.from_dict(data['config'], where=f'{path}: config'),
            logit_scale=scale, fingerprint=str(data['fingerprint']), towers=towers,
            num_params={k: int(v) for k, v in data['num_params'].items()}, source=str(data.get('source', '')),
            arch=str(data.get('arch', 'custom')), details=dict(data.get('details', {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f'{path}: malformed manifest ({type(e).__name__}: {e}); export the model again') from None
    for tower in towers.values():
        for name in filter(None, (tower.file, tower.onnx)):
            if not (d / name).is_file():
                raise FileNotFoundError(f'{d}: the manifest names {name}, which is missing; copy the whole exported '
                                        f'dir, or export again')
    if not (d / 'vocab.txt').is_file():
        raise FileNotFoundError(f'{d}: vocab.txt is missing; copy the whole exported dir, or export again')
    return manifest


def _check_file_name(name: Any, field_name: str) -> None:
    """A graph named by a manifest is a plain file name in the exported dir: never a path that leaves it."""
    if not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or '\\' in name \
            or os.path.isabs(name):
        raise ValueError(f'{field_name} {name!r} is not a plain file name in the exported dir')


def default_backend(fmt: str) -> str:
    """The runtime an exported format runs on unless ``backend=`` says otherwise."""
    return _RUNNABLE[fmt][0]


def _num_threads() -> int:
    # one knob for every backend: torch's intra-op threads (OMP_NUM_THREADS / torch.set_num_threads)
    return max(1, torch.get_num_threads())


# --- runners: one tower's graph on one runtime; numpy in, numpy out --------------------------------------------------

def _unreadable(path: Path, runtime: str, error: BaseException) -> ValueError:
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    size = path.stat().st_size if path.exists() else 0
    return ValueError(f'{path}: {runtime} cannot read this graph ({size:,} bytes; truncated or corrupt?): {first}; '
                      f'export the model again (cnclip export)')


class OrtTower:
    """One tower's graph on ONNX Runtime (CPU, or CUDA): numpy array in, ``(B, D)`` float32 array out."""

    def __init__(self, path: Path, tower: str, device: torch.device) -> None:
        ort = require('onnxruntime', 'running an exported ONNX model')
        available = ort.get_available_providers()
        providers = ['CPUExecutionProvider']
        if device.type == 'cuda':
            if 'CUDAExecutionProvider' not in available:
                raise ValueError(f"device={str(device)!r}: this onnxruntime has no CUDA provider ({available}); "
                                 f"install onnxruntime-gpu, or load with device='cpu'")
            providers.insert(0, ('CUDAExecutionProvider', {'device_id': device.index or 0}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = _num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise _unreadable(path, 'ONNX Runtime', e) from None
        self.input, self.output = IO_NAMES[tower]
        self.providers = self.session.get_providers()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {self.input: x})[0]


class OpenVINOTower:
    """One tower's graph (ONNX or IR) on OpenVINO's CPU plugin, computing in ``hint`` (``f32`` or ``bf16``)."""

    def __init__(self, path: Path, tower: str, device: torch.device, hint: str) -> None:
        ov = require('openvino', 'running an exported model on OpenVINO')
        if device.type != 'cpu':
            raise ValueError(f"device={str(device)!r}: the OpenVINO backend runs on the CPU here; load with "
                             f"device='cpu', or use backend='onnxruntime' or 'tensorrt' on a GPU")
        core = ov.Core()
        # OpenVINO's CPU plugin defaults to bf16 where the CPU has it: ask for fp32 explicitly on the exact path.
        try:
            model = core.read_model(str(path))
        except RuntimeError as e:
            raise _unreadable(path, 'OpenVINO', e) from None
        self.compiled = core.compile_model(model, 'CPU', {
            'INFERENCE_PRECISION_HINT': hint, 'INFERENCE_NUM_THREADS': _num_threads(),
            'PERFORMANCE_HINT': 'LATENCY'})
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer([x])[self.output], copy=True)  # the request reuses its output buffer


class ExportedCLIP:
    """An exported dir ready to run: the subset of :class:`~modelscope_cnclip.model.CLIP` that inference uses.

    Args:
        d: the exported dir.
        backend: ``'onnxruntime'``, ``'openvino'`` or ``'tensorrt'``; default: the dir's own format's runtime.
        device: where to run (``cpu``; ``cuda`` for ONNX Runtime's CUDA provider and TensorRT).
        precision: ``None`` or the exported precision; ``'bf16'`` on OpenVINO runs the fp32 (or int8) graph's float
            operations in bf16 (fast on CPUs with AVX512-BF16/AMX).

    Raises:
        ValueError: a backend that cannot run this format, or a precision it cannot provide.
        ImportError: the runtime is not installed (the message names the extra).
    """

    def __init__(self, d: str | os.PathLike, *, backend: str | None = None, device: torch.device | None = None,
                 precision: str | None = None) -> None:
        self.dir = Path(os.path.expanduser(str(d)))
        self.manifest = m = read_manifest(self.dir)
        self.config: CLIPConfig = m.config
        self.backend = backend or default_backend(m.format)
        if self.backend not in _RUNNABLE[m.format]:
            runnable = _RUNNABLE[m.format]
            raise ValueError(f'backend={self.backend!r} cannot run a {m.format} export ({self.dir}); choose one of '
                             f'{list(runnable)}, or export again with --format '
                             f'{"onnx" if self.backend == "onnxruntime" else self.backend}')
        device = device or torch.device('cpu')
        self.precision = self._precision(precision)
        runners = {}
        for tower in TOWERS:
            runners[tower] = self._runner(tower, device)
        self._image, self._text = runners['image'], runners['text']
        out_device = device if self.backend == 'tensorrt' else torch.device('cpu')
        self.device: torch.device = out_device
        self.dtype = torch.float32
        self.logit_scale = torch.tensor(m.logit_scale, dtype=torch.float32)
        self.num_params = dict(m.num_params)
        logger.info('loaded %s export %s on %s (%s)', m.format, self.dir, self.backend, self.precision)

    def _precision(self, requested: str | None) -> str:
        exported = self.manifest.precision
        if requested in (None, exported):
            return exported
        floats = {t.precision for t in self.manifest.towers.values()} - {'int8'}
        if self.backend == 'openvino' and floats <= {'fp32'}:
            # OpenVINO computes an fp32 graph's (and an int8 graph's float) operations in bf16 when asked
            as_bf16 = exported.replace('fp32', 'bf16') if 'fp32' in exported else f'{exported}+bf16'
            if requested in ('bf16', as_bf16):  # what CNClip.precision then says, so it reloads the same way
                return as_bf16
        choices = [exported] + (['bf16'] if self.backend == 'openvino' and floats <= {'fp32'} else [])
        raise ValueError(f'precision={requested!r}: {self.dir} is a {exported} {self.manifest.format} export run on '
                         f'{self.backend}, which computes in {" or ".join(choices)}; leave precision unset, or '
                         f'export the model again with --precision {requested}')

    def _runner(self, tower: str, device: torch.device) -> Any:
        spec = self.manifest.towers[tower]
        if self.backend == 'tensorrt':
            from modelscope_cnclip.runtime.tensorrt import TensorRTTower  # CUDA only
            return TensorRTTower(self.dir, self.manifest, tower, device)
        path = self.dir / (spec.onnx or spec.file)
        if self.backend == 'onnxruntime':
            return OrtTower(path, tower, device)
        hint = 'bf16' if 'bf16' in self.precision else 'f32'
        return OpenVINOTower(path, tower, device, hint)

    # --- the CLIP interface -----------------------------------------------------------------------------------
    def eval(self) -> 'ExportedCLIP':
        return self

    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` normalised pixels -> ``(B, D)`` float32 image features (unnormalised)."""
        if self.backend == 'tensorrt':
            return self._image(pixel_values)
        x = np.ascontiguousarray(pixel_values.detach().to('cpu', torch.float32).numpy())
        return torch.from_numpy(self._image(x)).float()

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids (``[PAD]=0``) -> ``(B, D)`` float32 text features (unnormalised)."""
        if self.backend == 'tensorrt':
            return self._text(input_ids)
        x = np.ascontiguousarray(input_ids.detach().to('cpu', torch.int64).numpy())
        return torch.from_numpy(self._text(x)).float()

    def describe(self) -> str:
        return f'{self.manifest.format} export {self.dir} on {self.backend} ({self.precision})'
