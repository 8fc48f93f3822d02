"""``export``: any checkpoint -> a self-describing exported dir (ONNX, OpenVINO IR or TensorRT engines).

The dir holds one graph per tower, ``vocab.txt``, the manifest (:mod:`modelscope_cnclip.runtime`) and a
``configuration.json``, so ``load(dir)``, ``pipeline(Tasks.multi_modal_embedding, model=dir)``, the CLI, embedding
jobs and indexes all take it as a model source. It is written atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from modelscope_cnclip import __version__
from modelscope_cnclip.checkpoints.layouts import default_configuration, read_source
from modelscope_cnclip.config import CLIPConfig, match_architecture
from modelscope_cnclip.deploy.graphs import (
    EXTERNAL_DATA_BYTES,
    OPSET,
    export_onnx,
    graph_files,
    read_onnx_for_openvino,
    save_graph,
    to_fp16,
    to_openvino,
)
from modelscope_cnclip.deploy.int8 import (
    DEFAULT_CALIBRATION,
    Calibration,
    Int8Gate,
    calibration_items,
    embed_rows,
    measure,
    quantize_onnx,
    quantize_openvino,
    r1_both,
    read_calibration,
)
from modelscope_cnclip.inference import build_model
from modelscope_cnclip.model import CLIP
from modelscope_cnclip.runtime import (
    FORMATS,
    IO_NAMES,
    TOWERS,
    ExportManifest,
    OpenVINOTower,
    OrtTower,
    TowerExport,
    require,
)
from modelscope_cnclip.tokenizer import Tokenizer
from modelscope_cnclip.transform import ImageTransform
from modelscope_cnclip.utils import atomic_dir

__all__ = ['export', 'ExportReport', 'EXPORT_PRECISIONS', 'PRECISIONS_BY_FORMAT', 'DEFAULT_MAX_BATCH']

logger = logging.getLogger(__name__)

ExportPrecision = Literal['fp32', 'fp16', 'int8']
EXPORT_PRECISIONS: tuple[str, ...] = ('fp32', 'fp16', 'int8')
#: what each format can hold (OpenVINO runs an fp32 IR in bf16 at load time: ``load(dir, precision='bf16')``)
PRECISIONS_BY_FORMAT = {'onnx': ('fp32', 'fp16', 'int8'), 'openvino': ('fp32', 'int8'), 'tensorrt': ('fp16', 'fp32')}
DEFAULT_MAX_BATCH = 256
DEFAULT_GATE = Int8Gate()
# the packages each format needs at export time
_NEEDS = {'onnx': ('onnx', 'onnxruntime'), 'openvino': ('onnx', 'openvino'), 'tensorrt': ('onnx', 'onnxruntime',
                                                                                        'tensorrt')}


@dataclass
class ExportReport:
    """What :func:`export` wrote.

    Attributes:
        out: the exported dir. format: ``onnx`` | ``openvino`` | ``tensorrt``.
        precision: per tower, what it computes in (a tower whose int8 failed the gate says ``fp32``).
        files: the files written, relative to ``out``; bytes: their total size.
        quantization: per tower given int8, the gate figures (see :func:`modelscope_cnclip.deploy.int8.measure`).
        seconds: wall time.
    """

    out: str
    format: str
    precision: dict[str, str]
    files: list[str]
    bytes: int
    quantization: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_options(fmt: str, precision: str, calibration: Any, max_batch: int, opset: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f'format={fmt!r}: choose one of {list(FORMATS)}')
    allowed = PRECISIONS_BY_FORMAT[fmt]
    if precision not in allowed:
        extra = " (bf16: export fp32, then load(dir, precision='bf16'))" if fmt == 'openvino' else ''
        raise ValueError(f'precision={precision!r}: a {fmt} export holds {" or ".join(allowed)}{extra}')
    if precision == 'int8' and calibration is None:
        raise ValueError('precision=int8 needs calibration inputs (--calibration): your images (a folder, a table of '
                         'paths) or image-text pairs (an official-format dir, a .jsonl with image and text '
                         'columns); int8 is calibrated and its accuracy measured on them')
    if precision != 'int8' and calibration is not None:
        raise ValueError(f'calibration is used by precision=int8 only, not {precision}; drop it')
    if max_batch < 1:
        raise ValueError(f'max_batch={max_batch}: must be >= 1')
    if not 14 <= opset <= 21:
        raise ValueError(f'opset={opset}: use an ONNX opset in 14..21 (default {OPSET})')
    for package in _NEEDS[fmt]:
        require(package, f'a {fmt} export')
    if precision == 'int8' and fmt == 'openvino':
        require('nncf', 'int8 quantization for OpenVINO')
    if fmt == 'tensorrt' and not torch.cuda.is_available():
        raise ValueError('format=tensorrt builds engines on a CUDA GPU, and none is visible here; export '
                         '--format onnx --precision fp16 instead and build the engine on the GPU machine')


def _configuration() -> dict[str, Any]:
    """A ``configuration.json`` that lets ModelScope's ``pipeline(task, model=dir)`` find the plugin's classes."""
    conf = {k: v for k, v in default_configuration().items() if k in ('framework', 'task', 'model', 'pipeline',
                                                                        'preprocessor')}
    return conf


def _reference(clip: CLIP, calib: Calibration) -> dict[str, torch.Tensor]:
    """fp32 torch embeddings of the calibration inputs (L2-normalised), in the rows' order."""
    out = {}
    with torch.inference_mode():
        if calib.pixels is not None:
            out['image'] = F.normalize(torch.cat([clip.encode_image(calib.pixels[i:i + 32])
                                                  for i in range(0, len(calib.pixels), 32)]).float(), dim=-1)
        if calib.token_ids is not None:
            rows = []
            for i in range(0, len(calib.token_ids), 32):
                x = calib.token_ids[i:i + 32]
                rows.append(clip.encode_text(x[:, :max(1, int(x.ne(0).sum(1).max()))]).float())
            out['text'] = F.normalize(torch.cat(rows), dim=-1)
    return out


class _Exporter:
    """One export in progress, into the temporary dir ``d``."""

    def __init__(self, clip: CLIP, d: Path, fmt: str, opset: int, external_data_bytes: int) -> None:
        self.clip, self.d, self.fmt, self.opset = clip, d, fmt, opset
        self.external_data_bytes = external_data_bytes
        self.work = d / '.work'
        self.work.mkdir()
        # int8: per tower, its candidate embeddings and how to write its int8 or its fp32 graph once decided
        self.names: dict[str, str] = {}
        self.candidates: dict[str, torch.Tensor] = {}
        self.write_int8: dict[str, Callable[[], Any]] = {}
        self.write_fp32: dict[str, Callable[[], Any]] = {}

    def fp32_onnx(self, tower: str) -> Path:
        path = self.work / f'{tower}.fp32.onnx'
        if not path.exists():
            export_onnx(self.clip, tower, path, opset=self.opset, external_data_bytes=self.external_data_bytes)
        return path

    def place(self, src: Path, name: str) -> str:
        """Move a graph (and its data file) from the work dir into the export under ``name``; returns ``name``.
        A data file keeps the name the graph refers to, so it is renamed only by re-saving the graph."""
        files = graph_files(src)
        if len(files) == 1:
            shutil.move(str(src), str(self.d / name))
        else:
            onnx = require('onnx', 'exporting to ONNX')
            save_graph(onnx.load(str(src), load_external_data=True), self.d / name, external=True)
        return name

    def tower(self, tower: str, precision: str, calib: Calibration | None, reference: dict[str, torch.Tensor],
              gate: Int8Gate, max_batch: int) -> TowerExport:
        fp32 = self.fp32_onnx(tower)
        if self.fmt == 'onnx':
            if precision == 'fp32':
                return TowerExport(self.place(fp32, f'{tower}.onnx'), 'fp32')
            if precision == 'fp16':
                half = self.work / f'{tower}.fp16.onnx'
                to_fp16(fp32, half, self.external_data_bytes)
                return TowerExport(self.place(half, f'{tower}.onnx'), 'fp16')
            return self._int8_onnx(tower, fp32, calib, reference, gate)
        if self.fmt == 'openvino':
            model = read_onnx_for_openvino(fp32)
            if precision == 'int8':
                return self._int8_openvino(tower, model, calib, reference, gate)
            to_openvino(model, self.d / f'{tower}.xml')
            return TowerExport(f'{tower}.xml', 'fp32')
        return self._tensorrt(tower, precision, fp32, max_batch)

    def _no_inputs(self, tower: str) -> TowerExport:
        logger.warning('no calibration %ss: the %s tower stays fp32 (give calibration texts to quantize it)',
                       tower, tower)
        self.write_fp32[tower]()
        return TowerExport(self.names[tower], 'fp32',
                           quantization={'passed': False, 'reasons': [f'no calibration {tower}s']})

    def _int8_onnx(self, tower: str, fp32: Path, calib: Calibration | None, reference: dict[str, torch.Tensor],
                   gate: Int8Gate) -> TowerExport:
        self.names[tower] = f'{tower}.onnx'
        self.write_fp32[tower] = lambda: self.place(fp32, f'{tower}.onnx')
        if tower not in reference:
            return self._no_inputs(tower)
        q = self.work / f'{tower}.int8.onnx'
        quantize_onnx(fp32, q, external_data=len(graph_files(fp32)) > 1)
        runner = OrtTower(q, tower, torch.device('cpu'))
        figures = self._gate(tower, runner, calib, reference, gate, 'onnxruntime dynamic int8 (per-channel weights)')
        self.write_int8[tower] = lambda: self.place(q, f'{tower}.onnx')
        return TowerExport(f'{tower}.onnx', 'int8' if figures['passed'] else 'fp32', quantization=figures)

    def _int8_openvino(self, tower: str, model: Any, calib: Calibration | None,
                       reference: dict[str, torch.Tensor], gate: Int8Gate) -> TowerExport:
        self.names[tower] = f'{tower}.xml'
        self.write_fp32[tower] = lambda: to_openvino(model, self.d / f'{tower}.xml')
        if tower not in reference:
            return self._no_inputs(tower)
        assert calib is not None
        inputs = calib.pixels if tower == 'image' else calib.token_ids
        quantized = quantize_openvino(model, calibration_items(inputs), tower, self.clip.config.vision.is_resnet)
        to_openvino(quantized, self.work / f'{tower}.int8.xml')
        runner = OpenVINOTower(self.work / f'{tower}.int8.xml', tower, torch.device('cpu'), 'f32')
        figures = self._gate(tower, runner, calib, reference, gate, 'nncf static int8 (OpenVINO)')
        self.write_int8[tower] = lambda: to_openvino(quantized, self.d / f'{tower}.xml')
        return TowerExport(f'{tower}.xml', 'int8' if figures['passed'] else 'fp32', quantization=figures)

    def _gate(self, tower: str, runner: Any, calib: Calibration | None, reference: dict[str, torch.Tensor],
              gate: Int8Gate, method: str) -> dict[str, Any]:
        assert calib is not None
        inputs = calib.pixels if tower == 'image' else calib.token_ids
        self.candidates[tower] = embed_rows(runner, inputs)
        figures = {'method': method, **measure(tower, reference, self.candidates[tower], calib, gate),
                   'gate': asdict(gate)}
        self._log(tower, figures)
        return figures

    @staticmethod
    def _log(tower: str, figures: dict[str, Any]) -> None:
        level = logging.INFO if figures['passed'] else logging.WARNING
        logger.log(level, 'int8 %s tower: %s (mean cosine %.5f%s)', tower,
                   'kept' if figures['passed'] else 'refused, kept fp32: ' + '; '.join(figures['reasons']),
                   figures['cosine_mean'], f', R@1 {figures["r1"]}' if 'r1' in figures else '')

    def settle_int8(self, towers: dict[str, TowerExport], calib: Calibration | None,
                    reference: dict[str, torch.Tensor], gate: Int8Gate) -> dict[str, TowerExport]:
        """Each tower passed the gate with the other in fp32; with both in int8, R@1 over pairs is measured again,
        and if it fails, the tower closer to failing (lower mean cosine) goes back to fp32. Then the graphs are
        written: int8 where kept, else the fp32 one."""
        kept = [t for t in TOWERS if towers[t].precision == 'int8']
        if len(kept) == 2 and calib is not None and calib.paired:
            fp32, both = r1_both(reference['image'], reference['text'], calib), \
                r1_both(self.candidates['image'], self.candidates['text'], calib)
            drops = {d: round(fp32[d] - both[d], 4) for d in fp32}
            failed = {d: v for d, v in drops.items() if v > gate.max_r1_drop}
            for t in TOWERS:
                towers[t].quantization['r1_both_int8'] = both
            if failed:
                worse = min(TOWERS, key=lambda t: towers[t].quantization['cosine_mean'])
                reason = (f'with both towers int8, {", ".join(f"{d} R@1 {v:.2f}" for d, v in failed.items())} '
                          f'points below fp32 (allowed {gate.max_r1_drop}); the tower with the lower mean cosine '
                          f'goes back to fp32')
                q = towers[worse].quantization
                q.update(passed=False, reasons=[*q['reasons'], reason])
                towers[worse] = TowerExport(towers[worse].file, 'fp32', quantization=q)
                self._log(worse, q)
        for t in TOWERS:
            if t in self.write_int8:
                (self.write_int8 if towers[t].precision == 'int8' else self.write_fp32)[t]()
        return towers

    def _tensorrt(self, tower: str, precision: str, fp32: Path, max_batch: int) -> TowerExport:
        from modelscope_cnclip.runtime.tensorrt import build_engine, engine_profile
        graph = fp32
        if precision == 'fp16':
            graph = self.work / f'{tower}.fp16.onnx'
            to_fp16(fp32, graph, self.external_data_bytes)
        cfg = self.clip.config
        profile = engine_profile(tower, cfg.vision.image_size, cfg.context_length, max_batch)
        (self.d / f'{tower}.plan').write_bytes(build_engine(graph, tower, profile))
        self.profiles = {**getattr(self, 'profiles', {}), tower: profile}
        return TowerExport(f'{tower}.plan', precision, onnx=self.place(graph, f'{tower}.onnx'))


def _versions(fmt: str) -> dict[str, str]:
    import importlib.metadata as md
    names = {'onnx': ('onnx', 'onnxruntime'), 'openvino': ('openvino', 'nncf'), 'tensorrt': ('tensorrt',)}[fmt]
    out = {'modelscope_cnclip': __version__, 'torch': torch.__version__}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def export(source: str | os.PathLike, out: str | os.PathLike, *, format: str = 'onnx',  # noqa: A002 - the CLI's name
           precision: ExportPrecision = 'fp32', calibration: Any = None, calibration_split: str = 'valid',
           calibration_texts: str | os.PathLike | Sequence[str] | None = None,
           calibration_size: int = DEFAULT_CALIBRATION, gate: Int8Gate = DEFAULT_GATE,
           max_batch: int = DEFAULT_MAX_BATCH, opset: int = OPSET, overwrite: bool = False,
           config: CLIPConfig | str | os.PathLike | None = None,
           external_data_bytes: int = EXTERNAL_DATA_BYTES) -> ExportReport:
    """Export a checkpoint's two towers for a runtime.

    Args:
        source: any checkpoint :func:`modelscope_cnclip.read_source` reads (plugin, hub, official ``.pt``, Hugging
            Face dir; a hub id or an architecture name).
        out: the dir to write (refused if it exists and is not empty, unless ``overwrite``).
        format: ``'onnx'`` (ONNX Runtime; OpenVINO reads it too), ``'openvino'`` (IR) or ``'tensorrt'`` (engines,
            built here: needs a CUDA GPU and the ``tensorrt`` package).
        precision: ``'fp32'`` (exact: within 1e-5 of the torch model), ``'fp16'`` (ONNX, TensorRT: for GPUs) or
            ``'int8'`` (ONNX, OpenVINO: calibrated and gated, see :mod:`modelscope_cnclip.deploy.int8`).
        calibration: int8 only: the user's images or image-text pairs (see
            :func:`~modelscope_cnclip.deploy.int8.read_calibration`), ``calibration_split`` of official data,
            ``calibration_texts`` when the source has no texts, ``calibration_size`` inputs of each modality.
        gate: when an int8 tower is kept (else it stays fp32 and the report says why, with the figures).
        max_batch: TensorRT: the profile's largest batch (larger batches run in chunks).
        opset: ONNX opset (default 17).
        config: override the architecture of a source that does not describe itself.
        external_data_bytes: towers with more weight bytes keep them in one ``<graph>.data`` file (protobuf's
            2 GB limit; ViT-H-14's fp32 image tower).
    Returns:
        An :class:`ExportReport`.
    Raises:
        ValueError: an option the format cannot do (before anything is read); FileExistsError: ``out`` is taken;
        ImportError: a package of the ``export`` extra is missing (the message names the install command).
    """
    started = time.perf_counter()
    _check_options(format, precision, calibration, max_batch, opset)
    dst = Path(os.path.expanduser(str(out)))
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f'{dst} exists and is not empty; choose a new directory or pass overwrite=True '
                              f'(--overwrite)')
    ckpt = read_source(source, config)
    clip = build_model(ckpt)
    cfg = ckpt.config
    calib, reference = None, {}
    if calibration is not None:
        calib = read_calibration(calibration, ImageTransform(cfg.preprocess), Tokenizer(ckpt.vocab_file,
                                 cfg.context_length), split=calibration_split, texts=calibration_texts,
                                 limit=calibration_size)
        reference = _reference(clip, calib)
    with atomic_dir(dst) as tmp:
        exporter = _Exporter(clip, tmp, format, opset, external_data_bytes)
        towers = {t: exporter.tower(t, precision, calib, reference, gate, max_batch) for t in TOWERS}
        if precision == 'int8':
            towers = exporter.settle_int8(towers, calib, reference, gate)
        shutil.rmtree(exporter.work)
        shutil.copyfile(ckpt.vocab_file, tmp / 'vocab.txt')
        details: dict[str, Any] = {'opset': opset, 'versions': _versions(format), 'io': IO_NAMES}
        if calib is not None:
            details['calibration'] = calib.describe()
        if format == 'tensorrt':
            trt = require('tensorrt', 'a TensorRT export')
            details['tensorrt'] = {'version': trt.__version__, 'profiles': exporter.profiles,
                                   'device': torch.cuda.get_device_name()}
        source_name = ckpt.source if not Path(ckpt.source).exists() else str(Path(ckpt.source).resolve())
        manifest = ExportManifest(format, cfg, float(clip.logit_scale.detach()), clip.fingerprint(), towers,
                                  clip.num_params, source_name, match_architecture(cfg) or 'custom', details)
        manifest.write(tmp)
        (tmp / 'configuration.json').write_text(json.dumps(_configuration(), indent=2) + '\n', encoding='utf-8')
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob('*') if p.is_file())
        size = sum((tmp / f).stat().st_size for f in files)
    report = ExportReport(str(dst), format, {t: towers[t].precision for t in TOWERS}, files, size,
                          {t: towers[t].quantization for t in TOWERS if towers[t].quantization},
                          calib.describe() if calib else None, round(time.perf_counter() - started, 1))
    logger.info('exported %s to %s (%s): %s', ckpt.name, dst, format, report.precision)
    return report

