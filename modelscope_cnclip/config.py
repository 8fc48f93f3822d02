"""Architecture configuration: JSON at the edges, frozen dataclasses inside.

Every architecture lives as ``model_configs/<name>.json``; :func:`available_models` scans that folder, so the
CLI choices and the test parametrisation never go stale. A model directory describes itself with the same
dictionary (``cnclip_config.json``), and the stock ModelScope hub layout (``vision_model_config.json`` +
``text_model_config.json``) converts to and from it with :func:`config_from_hub` / :func:`config_to_hub`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

__all__ = ['CLIPConfig', 'TextConfig', 'VisionConfig', 'PreprocessConfig', 'available_models', 'get_config',
           'match_architecture', 'config_from_hub', 'config_to_hub', 'OPENAI_MEAN', 'OPENAI_STD',
           'Precision', 'PRECISION_NAMES', 'Backend', 'BACKENDS', 'ExportFormat', 'EXPORT_FORMATS',
           'ExportPrecision', 'EXPORT_PRECISIONS', 'Layout', 'LAYOUTS', 'Modality', 'MODALITIES', 'Engine',
           'ENGINES', 'SamplingMode', 'SAMPLING_MODES', 'Direction', 'DIRECTIONS', 'DEFAULT_BATCH',
           'DEFAULT_SHARD_SIZE', 'DEFAULT_NUM_FRAMES', 'DEFAULT_SCHEDULE_TIMEOUT', 'natural_key']

CONFIG_DIR = Path(__file__).with_name('model_configs')
#: Data files shipped with the package (vocab, configuration.json, zero-shot templates, class names).
RESOURCES = Path(__file__).with_name('resources')

# --- the choices and defaults of the public API, as data (the CLI takes its choices from here, never a copy) ----
#: Numeric precisions a model runs in: fp32 (exact), bf16 (fast on AVX512-BF16/AMX CPUs and GPUs), fp16 (GPUs).
Precision = Literal['fp32', 'bf16', 'fp16']
PRECISION_NAMES: tuple[str, ...] = get_args(Precision)
#: What runs a model: torch (checkpoints), or a runtime for an exported dir.
Backend = Literal['torch', 'onnxruntime', 'openvino', 'tensorrt']
BACKENDS: tuple[str, ...] = get_args(Backend)
#: What ``export`` writes: ONNX graphs, OpenVINO IR, TensorRT engines.
ExportFormat = Literal['onnx', 'openvino', 'tensorrt']
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
#: What an exported tower computes in.
ExportPrecision = Literal['fp32', 'fp16', 'int8']
EXPORT_PRECISIONS: tuple[str, ...] = get_args(ExportPrecision)
#: Model dir layouts ``convert`` writes: this plugin's, ModelScope's hub layout, transformers' ChineseCLIPModel.
Layout = Literal['plugin', 'hub', 'hf']
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: What an embedding job embeds (``'auto'``: decided from the input).
Modality = Literal['auto', 'image', 'text', 'video']
MODALITIES: tuple[str, ...] = get_args(Modality)[1:]
#: Where an embedding job runs.
Engine = Literal['local', 'ray']
ENGINES: tuple[str, ...] = get_args(Engine)
#: How video frames are picked (``FrameSampling.mode``).
SamplingMode = Literal['uniform', 'fps']
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)
#: Retrieval directions: text-to-image, image-to-text.
Direction = Literal['t2i', 'i2t']
DIRECTIONS: tuple[str, ...] = get_args(Direction)
DEFAULT_BATCH = 64  # inputs per forward pass when embedding through the API
DEFAULT_SHARD_SIZE = 1024  # inputs per embeddings-dir shard
DEFAULT_NUM_FRAMES = 8  # video frames sampled per video
DEFAULT_SCHEDULE_TIMEOUT = 600.0  # seconds a Ray job waits for a node: long enough for an autoscaler to boot one

# The normalisation constants of CLIP/Chinese-CLIP; the only place they are written down.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, failing loudly on unknown keys."""
    if not isinstance(data, Mapping):
        raise TypeError(f'{where}: expected a JSON object, got {type(data).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}')
    try:
        return cls(**data)
    except TypeError as e:  # a missing required key
        raise ValueError(f'{where}: {e}') from None


def positive_ints(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    """Check that the fields ``names`` of a config object are ints > 0 (not bools).

    Raises:
        ValueError: naming ``prefix.name`` (``name`` alone when ``prefix`` is empty) and the value.
    """
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f'{prefix + "." if prefix else ""}{name}: expected a positive integer, got {value!r}')


def finite_number(obj: Any, prefix: str, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    """Check that a config object's field ``name`` is a finite number in ``[low, high)`` (``(low, high)`` with
    ``low_open``).

    Raises:
        ValueError: naming ``prefix.name`` and the value.
    """
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value >= high:
        raise ValueError(f'{prefix + "." if prefix else ""}{name}: expected a number in '
                         f'{"(" if low_open else "["}{low:g}, {high:g}), got {value!r}')


# activations transformers' BERT knows (ACT2FN), as config strings
TEXT_ACTIVATIONS = ('gelu', 'relu', 'gelu_new', 'gelu_python', 'gelu_fast', 'gelu_pytorch_tanh', 'quick_gelu',
                    'silu', 'swish', 'tanh', 'mish')


@dataclass(frozen=True)
class VisionConfig:
    """Image tower: a ViT (``layers`` is an int) or a ModifiedResNet (``layers`` is four block counts)."""

    image_size: int = 224
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 16
    head_width: int = 64

    def __post_init__(self) -> None:
        positive_ints(self, 'vision', ('image_size', 'width', 'head_width'))
        layers = self.layers
        if isinstance(layers, (list, tuple)):
            if len(layers) != 4 or not all(isinstance(n, int) and n > 0 for n in layers):
                raise ValueError(f'vision.layers: a ResNet needs four positive block counts, got {layers!r}')
            object.__setattr__(self, 'layers', tuple(layers))
            object.__setattr__(self, 'patch_size', None)
        elif not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
            raise ValueError(f'vision.layers: expected a positive int (ViT) or a list of 4 ints (ResNet), '
                             f'got {layers!r}')
        else:
            positive_ints(self, 'vision', ('patch_size',))
            if self.image_size % self.patch_size:
                raise ValueError(f'vision.patch_size={self.patch_size!r} must divide '
                                 f'vision.image_size={self.image_size}')
        if self.width % self.head_width and not self.is_resnet:
            raise ValueError(f'vision.width={self.width} is not a multiple of vision.head_width={self.head_width}')

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        """Attention heads: of every ViT block, or of the ResNet's attention pool (width * 32 channels)."""
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    """BERT text tower (the fields of :class:`transformers.BertConfig` that Chinese CLIP uses)."""

    vocab_size: int = 21128
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = 'gelu'
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        positive_ints(self, 'text', ('vocab_size', 'hidden_size', 'intermediate_size', 'num_attention_heads',
                                      'num_hidden_layers', 'max_position_embeddings', 'type_vocab_size'))
        if self.hidden_act not in TEXT_ACTIVATIONS:
            raise ValueError(f'text.hidden_act: {self.hidden_act!r} is not one of {list(TEXT_ACTIVATIONS)}')
        for name in ('hidden_dropout_prob', 'attention_probs_dropout_prob'):
            finite_number(self, 'text', name, 0, 1)
        finite_number(self, 'text', 'initializer_range', 0, math.inf)
        finite_number(self, 'text', 'layer_norm_eps', 0, 1, low_open=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f'text.hidden_size={self.hidden_size} is not a multiple of '
                             f'text.num_attention_heads={self.num_attention_heads}')


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image and a text become model input (data attached to the model)."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = 'bicubic'
    resize_mode: str = 'squash'
    context_length: int = 52

    def __post_init__(self) -> None:
        object.__setattr__(self, 'mean', tuple(float(v) for v in self.mean))
        object.__setattr__(self, 'std', tuple(float(v) for v in self.std))
        if self.interpolation not in ('bicubic', 'bilinear'):
            raise ValueError(f"interpolation={self.interpolation!r}: choose 'bicubic' or 'bilinear'")
        if self.resize_mode != 'squash':
            raise ValueError(f"resize_mode={self.resize_mode!r}: only 'squash' (Chinese CLIP's resize) is supported")
        if self.context_length < 2:
            raise ValueError(f'context_length={self.context_length} must be at least 2 ([CLS] and [SEP])')


@dataclass(frozen=True)
class CLIPConfig:
    """A whole Chinese CLIP model: both towers, the shared embedding size and the preprocessing."""

    embed_dim: int
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    context_length: int = 52

    def __post_init__(self) -> None:
        positive_ints(self, 'config', ('embed_dim', 'context_length'))
        if isinstance(self.text, TextConfig) and not 2 <= self.context_length <= self.text.max_position_embeddings:
            raise ValueError(f'config.context_length={self.context_length}: expected 2 to '
                             f'text.max_position_embeddings={self.text.max_position_embeddings}')

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.vision.image_size, context_length=self.context_length)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = 'config') -> 'CLIPConfig':
        data = dict(data)
        for key in ('name', 'guessed'):  # informational (a plugin dir's name and guessed fields)
            data.pop(key, None)
        if 'vision' in data:
            data['vision'] = _from_dict(VisionConfig, data['vision'], f'{where}.vision')
        if 'text' in data:
            data['text'] = _from_dict(TextConfig, data['text'], f'{where}.text')
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.vision.is_resnet:
            d['vision']['layers'] = list(self.vision.layers)
            d['vision'].pop('patch_size')
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> 'CLIPConfig':
        with open(path, encoding='utf-8') as f:
            return cls.from_dict(json.load(f), where=str(path))

    def save(self, path: str | Path, name: str | None = None) -> None:
        d = self.to_dict()
        if name:
            d = {'name': name, **d}
        Path(path).write_text(json.dumps(d, indent=2, ensure_ascii=False) + '\n', encoding='utf-8')


def natural_key(name: str) -> tuple[list[str | int], str]:
    """Sort key that orders the numbers inside names by value: ``RN50 < RN101``, ``ViT-L-14 < ViT-L-14-336``
    (a plain sort of the file names puts ``ViT-L-14-336.json`` first, ``-`` sorting before ``.``)."""
    parts = re.split(r'(\d+)', name)  # text, number, text, ...: the types line up between any two names
    return [int(p) if i % 2 else p.lower() for i, p in enumerate(parts)], name


@lru_cache(maxsize=None)
def _registry() -> dict[str, CLIPConfig]:
    paths = sorted(CONFIG_DIR.glob('*.json'), key=lambda p: natural_key(p.stem))
    return {p.stem: CLIPConfig.from_file(p) for p in paths}


def available_models() -> list[str]:
    """Names of the architectures shipped with the package (one JSON file each in ``model_configs/``), in natural
    order: ``['RN50', 'ViT-B-16', 'ViT-H-14', 'ViT-L-14', 'ViT-L-14-336']``. Each loads by name
    (``load('ViT-B-16')``: see :func:`modelscope_cnclip.pretrained.list_pretrained`)."""
    return list(_registry())


def get_config(name: str) -> CLIPConfig:
    """The configuration of a shipped architecture, e.g. ``get_config('ViT-B-16')``."""
    reg = _registry()
    if name not in reg:
        raise ValueError(f'Model {name!r} not found; available models = {list(reg)}')
    return reg[name]


def _shape_signature(cfg: CLIPConfig) -> tuple:
    """What the weights' shapes pin down, plus head counts (which shapes cannot tell)."""
    v, t = cfg.vision, cfg.text
    return (cfg.embed_dim, v.image_size, v.layers, v.width, v.patch_size, v.head_width, t.vocab_size, t.hidden_size,
            t.intermediate_size, t.num_attention_heads, t.num_hidden_layers, t.max_position_embeddings,
            t.type_vocab_size)


def match_architecture(cfg: CLIPConfig) -> str | None:
    """The shipped architecture name whose shapes ``cfg`` has, or ``None`` for a custom size."""
    sig = _shape_signature(cfg)
    return next((name for name, known in _registry().items() if _shape_signature(known) == sig), None)


# --- the stock ModelScope hub layout (constructor arguments of its CLIP class) ---------------------------------

_HUB_TEXT_KEYS = {  # hub key -> TextConfig field
    'vocab_size': 'vocab_size', 'text_hidden_size': 'hidden_size', 'text_intermediate_size': 'intermediate_size',
    'text_num_attention_heads': 'num_attention_heads', 'text_num_hidden_layers': 'num_hidden_layers',
    'text_max_position_embeddings': 'max_position_embeddings', 'text_type_vocab_size': 'type_vocab_size',
    'text_hidden_act': 'hidden_act', 'text_hidden_dropout_prob': 'hidden_dropout_prob',
    'text_attention_probs_dropout_prob': 'attention_probs_dropout_prob', 'text_initializer_range': 'initializer_range',
}


def _parse_layers(value: Any, where: str) -> int | tuple[int, ...]:
    # cn_clip's own RN50.json stores the string "[3,4,6,3]"; parse it as JSON, never eval it.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f'{where}.vision_layers: cannot parse {value!r}; '
                             f'use an int or a list like [3, 4, 6, 3]') from None
    return tuple(value) if isinstance(value, list) else value


def config_from_hub(vision: Mapping[str, Any], text: Mapping[str, Any], where: str = 'hub config') -> CLIPConfig:
    """Convert the two JSON dicts of a ModelScope hub dir into a :class:`CLIPConfig`."""
    vision = dict(vision)
    known_v = {'embed_dim', 'image_resolution', 'vision_layers', 'vision_width', 'vision_patch_size',
               'vision_head_width'}
    unknown = sorted(set(vision) - known_v)
    if unknown:
        raise ValueError(f'{where}: unknown vision key(s) {unknown}; expected {sorted(known_v)}')
    layers = _parse_layers(vision.get('vision_layers'), where)
    v = VisionConfig(image_size=vision['image_resolution'], layers=layers, width=vision['vision_width'],
                     patch_size=vision.get('vision_patch_size'), head_width=vision.get('vision_head_width', 64))
    unknown = sorted(set(text) - set(_HUB_TEXT_KEYS))
    if unknown:
        raise ValueError(f'{where}: unknown text key(s) {unknown}; expected {sorted(_HUB_TEXT_KEYS)}')
    t = TextConfig(**{_HUB_TEXT_KEYS[k]: val for k, val in text.items()})
    return CLIPConfig(embed_dim=vision['embed_dim'], vision=v, text=t)


def config_to_hub(cfg: CLIPConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(vision_model_config, text_model_config)`` dicts of the stock ModelScope hub layout."""
    v = cfg.vision
    vision: dict[str, Any] = {'embed_dim': cfg.embed_dim, 'image_resolution': v.image_size,
                              'vision_layers': list(v.layers) if v.is_resnet else v.layers,
                              'vision_width': v.width, 'vision_patch_size': v.patch_size}
    if not v.is_resnet:
        vision['vision_head_width'] = v.head_width
    text = {hub: getattr(cfg.text, ours) for hub, ours in _HUB_TEXT_KEYS.items()}
    return vision, text
